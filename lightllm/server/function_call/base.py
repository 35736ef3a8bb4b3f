"""Detector interface and the streaming machinery shared by every tool-call format.

A detector only has to `scan` a whole text into decided segments (text or calls) and say how much of
the text is decided. Decisions must be prefix-stable: a segment decided for a prefix stays the same for
every extension. Streaming then re-scans the growing buffer and emits only what is newly decided, so
streamed output reassembles to exactly the non-streamed parse for any chunking of the same text.

Calls from untrusted (free-running) output are decided only once complete, so a block that turns out to
be malformed can still fall back to text. Calls from grammar-constrained output are `trusted`: they are
emitted as soon as the name is known and their raw argument text streams as it grows.

Re-scanning the whole text per delta would make a stream quadratic in its length. So a detector may
also return a `Checkpoint`: a position whose text before it is decided for every extension, and the
scan state there (`scan_from` resumes from it). The stream parser keeps only the text from its last
checkpoint, so the work per delta is bounded by the call being written (text before a completed call,
or before any possible marker start, never changes). A detector without checkpoints is re-scanned whole.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Callable

from lightllm.server.holdback import partial_marker_len


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object (possibly partial while streaming a trusted call)
    complete: bool = True
    call_id: str | None = None  # set by formats whose output names the call (kimi_k2); else generated
    # Only in a scan resumed inside a call's arguments (a trusted call streaming): `arguments` then holds
    # the text after the checkpoint, continuing the call left open there.
    continues: bool = False


@dataclass
class Segment:
    text: str = ""
    call: ParsedCall | None = None


@dataclass
class Checkpoint:
    """Where a scan can resume: for every extension of the text, scanning it whole gives the first
    `segments` segments of this result for text[:pos], then what `scan_from(text[pos:], final, state)`
    gives (positions in `state` count from `pos`)."""

    pos: int
    segments: int
    state: Any
    # The checkpoint is inside the arguments of the call in segment `segments` (a trusted call streaming):
    # this many characters of them come from text[:pos]; a resumed scan continues the call (`continues`).
    open_args: int | None = None


@dataclass
class ScanResult:
    segments: list[Segment]
    decided: int  # text[:decided] is final; the rest may still change meaning
    stop: bool = False  # nothing useful can follow (a repeated call): generation may end here
    checkpoint: Checkpoint | None = None  # set only by non-final scans of detectors that resume


class ToolCallDetector:
    """Base class: subclasses implement `scan`."""

    name = "base"
    markers: tuple[str, ...] = ()
    # Tool-call markers that are special tokens in the model's vocabulary must survive detokenization.
    needs_special_tokens = True

    def __init__(self, tool_names: set[str], schemas: dict[str, dict[str, Any]] | None = None,
                 id_factory: Callable[[], str] | None = None, strict: set[str] | None = None):
        self.tool_names = tool_names
        self.schemas = schemas or {}  # tool name → its `parameters` JSON schema (for text-valued formats)
        self._id_factory = id_factory or self.default_call_id
        self.strict = strict or set()  # tools declared `strict`: a call must satisfy the schema to count

    def scan(self, text: str, final: bool) -> ScanResult:
        raise NotImplementedError

    def scan_from(self, text: str, final: bool, state: Any) -> ScanResult:
        """Scan text that starts at a checkpoint this detector returned (state None: the output's start)."""
        return self.scan(text, final)

    @staticmethod
    def default_call_id() -> str:
        """The call-id style of this format (OpenAI's `call_…` unless a format needs its own)."""
        return "call_" + secrets.token_hex(12)

    def new_call_id(self) -> str:
        return self._id_factory()

    # ---------------------------------------------------------------------------------- helpers

    def known(self, name: Any) -> bool:
        return isinstance(name, str) and bool(name) and (not self.tool_names or name in self.tool_names)

    def call_from_object(self, obj: Any) -> ParsedCall | None:
        """{"name", "arguments"|"parameters"} → call, or None when it is not a valid call of a known tool."""
        if not isinstance(obj, dict) or not self.known(obj.get("name")):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some models double-encode the arguments
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                return None
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return None
        return self.make_call(obj["name"], args)

    def make_call(self, name: str, args: dict[str, Any]) -> ParsedCall | None:
        """The call, or None when it is no valid call: an unknown tool, or a `strict` tool's arguments that
        break its schema (then the text stays text, as a malformed call does)."""
        if not self.known(name):
            return None
        if name in self.strict and not _satisfies(args, self.schemas.get(name)):
            return None
        return ParsedCall(name, json.dumps(args, ensure_ascii=False))

    def call_from_parts(self, name: str, arguments_text: str) -> ParsedCall | None:
        """A call written as a name and a JSON arguments text; None unless that text is a JSON object."""
        args = load_json(arguments_text.strip()) if arguments_text.strip() else {}
        if not isinstance(args, dict):
            return None
        return self.call_from_object({"name": name, "arguments": args})

    def text_with_holdback(self, text: str, start: int, final: bool) -> tuple[Segment, int]:
        """Text from `start` to the end, minus a tail that could be the beginning of a marker."""
        if final:
            return Segment(text[start:]), len(text)
        hold = partial_marker_len(text, self.markers, start)
        return Segment(text[start:len(text) - hold]), len(text) - hold


def _satisfies(value: Any, schema: dict[str, Any] | None) -> bool:
    import jsonschema

    if not schema:
        return True
    return jsonschema.validators.validator_for(schema)(schema).is_valid(value)


def match_json(text: str, start: int) -> int | None:
    """End (exclusive) of the JSON object/array opening at text[start], string-aware; None if not closed yet."""
    return JsonScan(start).end(text)


class JsonScan:
    """`match_json` that resumes where it stopped, for a text that only grows: each character is read once
    however many deltas the value arrives in."""

    __slots__ = ("i", "depth", "in_string", "escaped", "found")

    def __init__(self, start: int):
        self.i = start  # next character to read
        self.depth = 0
        self.in_string = self.escaped = False
        self.found: int | None = None

    def end(self, text: str) -> int | None:
        if self.found is not None:
            return self.found
        depth, in_string, escaped = self.depth, self.in_string, self.escaped
        for i in range(self.i, len(text)):
            ch = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    self.found = i + 1
                    return self.found
        self.i, self.depth, self.in_string, self.escaped = len(text), depth, in_string, escaped
        return None

    def shifted(self, offset: int) -> "JsonScan":
        """The same progress in a text whose first `offset` characters were cut off."""
        moved = JsonScan(self.i - offset)
        moved.depth, moved.in_string, moved.escaped = self.depth, self.in_string, self.escaped
        moved.found = None if self.found is None else self.found - offset
        return moved


def load_json(span: str) -> Any:
    try:
        return json.loads(span)
    except json.JSONDecodeError:
        return None


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def assemble(segments: list[Segment]) -> tuple[str, list[ParsedCall]]:
    """Content is the text before the first call (all text when there is none); text after it is dropped."""
    content: list[str] = []
    calls: list[ParsedCall] = []
    for seg in segments:
        if seg.call is not None:
            calls.append(seg.call)
        elif not calls:
            content.append(seg.text)
    return "".join(content), calls


class ToolStreamParser:
    """Feeds text deltas to a detector and returns OpenAI `delta` dicts (content or tool_calls).

    It keeps the text from the detector's last checkpoint on (`text`) and a summary of what came before it:
    the length of the content decided there, its part not sent yet (only ever whitespace, held until a
    call or the end decides it) and the number of calls."""

    def __init__(self, detector: ToolCallDetector, max_calls: int | None = None):
        self.detector = detector
        self.max_calls = max_calls
        self.text = ""  # the output from the last checkpoint on
        self.state: Any = None  # the detector's scan state at that checkpoint (None: the output's start)
        self.done_content = 0  # length of the content decided before the checkpoint
        self.done_unsent = ""  # of that content, what was not sent yet
        self.done_has_text = False  # whether that content has more than whitespace
        self.done_calls = 0  # calls begun before the checkpoint (the last one may be open: see open_args)
        self.open_args = 0  # characters of the open call's arguments that came before the checkpoint
        self.content_sent = 0
        self.args_sent: list[int] = []  # per emitted call: characters of arguments already sent
        self.ids: list[str] = []

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self.text += delta
        result = self.detector.scan_from(self.text, False, self.state)
        deltas = self._diff(result.segments, final=False)
        if result.checkpoint is not None:
            self._advance(result)
        return deltas

    def finish(self) -> list[dict[str, Any]]:
        return self._diff(self.detector.scan_from(self.text, True, self.state).segments, final=True)

    def _advance(self, result: ScanResult) -> None:
        """Fold the segments before the checkpoint into the summary and drop their text."""
        cp = result.checkpoint
        for seg in result.segments[:cp.segments]:
            if seg.call is not None:
                self.done_calls += not seg.call.continues
            elif not self.done_calls:
                start = self.done_content
                self.done_content += len(seg.text)
                self.done_unsent += seg.text[max(0, self.content_sent - start):]
                self.done_has_text = self.done_has_text or bool(seg.text.strip())
        if cp.open_args is not None:
            call = result.segments[cp.segments].call
            self.open_args = self.open_args + cp.open_args if call.continues else cp.open_args
            self.done_calls += not call.continues
        self.text, self.state = self.text[cp.pos:], cp.state

    def _diff(self, segments: list[Segment], final: bool) -> list[dict[str, Any]]:
        tail: list[str] = []
        calls: list[ParsedCall] = []
        for seg in segments:
            if seg.call is not None:
                calls.append(seg.call)
            elif not calls and not self.done_calls:  # content is the text before the first call
                tail.append(seg.text)
        tail_content = "".join(tail)
        first = self.done_calls - (1 if calls and calls[0].continues else 0)  # the index of calls[0]
        if self.max_calls is not None:
            calls = calls[:max(0, self.max_calls - first)]
        deltas: list[dict[str, Any]] = []
        total = self.done_content + len(tail_content)
        has_calls = bool(calls) or self.done_calls > 0
        # Whitespace-only content is held: it is dropped if a call follows, kept if none does.
        if total > self.content_sent and (self.done_has_text or tail_content.strip() or (final and not has_calls)):
            deltas.append({"content": self.done_unsent + tail_content[max(0, self.content_sent - self.done_content):]})
            self.content_sent, self.done_unsent = total, ""
        for index, call in enumerate(calls, start=first):
            if index == len(self.args_sent):
                self.ids.append(call.call_id or self.detector.new_call_id())
                self.args_sent.append(0)
                deltas.append({"tool_calls": [{"index": index, "id": self.ids[index], "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
            before = self.open_args if call.continues else 0  # its arguments before the checkpoint
            if before + len(call.arguments) > self.args_sent[index]:
                deltas.append({"tool_calls": [{"index": index, "function": {
                    "name": None, "arguments": call.arguments[self.args_sent[index] - before:]}}]})
                self.args_sent[index] = before + len(call.arguments)
        return deltas


def parse_complete(detector: ToolCallDetector, text: str,
                   max_calls: int | None = None) -> tuple[str | None, list[dict[str, Any]]]:
    """Non-streaming parse → (content or None, OpenAI tool_calls list).

    A call cut off by the length limit (a trusted call whose arguments never closed) is not a call: its
    arguments are not valid JSON, so it is left out; with no complete call the output is returned as text."""
    content, calls = assemble(detector.scan(text, final=True).segments)
    if max_calls is not None:
        calls = calls[:max_calls]
    calls = [c for c in calls if c.complete]
    if not calls:
        return text, []
    return (content if content.strip() else None), [
        {"id": c.call_id or detector.new_call_id(), "type": "function",
         "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
