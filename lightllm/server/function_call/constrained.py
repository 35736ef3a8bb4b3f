"""Parsers for grammar-constrained tool output (tool_choice "required" or a named function).

The grammar guarantees the shape, so these are `trusted`: a call is announced as soon as its name is
known and its raw argument text streams as it grows (and is passed through verbatim, as vLLM does).
- required: `[{"name": "<tool>", "parameters": {...}}, ...]`
- named: the chosen function's arguments object alone.

Streams resume (see base.py) inside the arguments of the call that streams, carrying its JSON scan, and
in the required array after each complete call, carrying the calls seen so far.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any, Callable

from lightllm.server.function_call.base import (Checkpoint, JsonScan, ParsedCall, ScanResult, Segment,
                                                ToolCallDetector, skip_ws)

_ITEM_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"parameters"\s*:\s*')


@dataclass(frozen=True)
class _InArguments:
    """Resume inside the streaming call's arguments: its name and JSON scan (positions from the checkpoint).
    `before` collects their text before the checkpoint, which the required mode needs once the call is
    complete (to know a repeat of it); one list per stream, extended as the checkpoint moves on."""

    name: str
    json: JsonScan
    before: list[str]


@dataclass(frozen=True)
class _BetweenItems:
    """Resume in the required array after a complete call: the calls seen (see RequiredDetector)."""

    seen: frozenset[str]


def _partial_call(text: str, name: str, start: int,
                  json: JsonScan | None = None) -> tuple[ParsedCall, int | None, JsonScan | None]:
    """The call whose arguments object starts at `start`; the end index when it is complete; the JSON scan
    (resumed from `json` when given)."""
    if json is None:
        if start >= len(text) or text[start] != "{":
            return ParsedCall(name, "", complete=False), None, None
        json = JsonScan(start)
    end = json.end(text)
    if end is None:
        return ParsedCall(name, text[start:], complete=False), None, json
    return ParsedCall(name, text[start:end]), end, json


def _streaming(call: ParsedCall, text: str, start: int, json: JsonScan | None, segments: int, final: bool,
               before: list[str] | None = None) -> Checkpoint | None:
    """The checkpoint at the end of a trusted call's arguments still arriving (from `start` in `text`)."""
    if final or json is None:
        return None
    before = [] if before is None else before
    before.append(text[start:])
    return Checkpoint(len(text), segments, _InArguments(call.name, json.shifted(len(text)), before),
                      open_args=len(text) - start)


def _resumed(state: _InArguments, text: str) -> tuple[ParsedCall, int | None, JsonScan | None]:
    """The streaming call's arguments continued from the checkpoint inside them."""
    call, end, json = _partial_call(text, state.name, 0, state.json)
    return replace(call, continues=True), end, json


def _opening(text: str, opener: str, final: bool) -> tuple[int, ScanResult | None]:
    """Index of the expected opening bracket, or the result to return when the output is still empty or
    does not open with it (then it is plain text)."""
    i = skip_ws(text, 0)
    if i >= len(text):
        return i, ScanResult([Segment(text)] if final else [], len(text) if final else 0)
    if text[i] != opener:
        return i, ScanResult([Segment(text)], len(text))
    return i, None


def _call_key(call: ParsedCall) -> str:
    return call.name + "\0" + json.dumps(json.loads(call.arguments), sort_keys=True, ensure_ascii=False)


class RequiredDetector(ToolCallDetector):
    """The required-mode array. Its first call streams as it grows; later calls are decided only once
    complete, so a call that repeats an earlier one (same name and arguments: a weak model looping at
    temperature > 0) is dropped before any of it is sent, and the scan reports `stop` so generation ends
    there instead of running to max_tokens."""

    name = "required"

    def scan(self, text: str, final: bool) -> ScanResult:
        return self.scan_from(text, final, None)

    def scan_from(self, text: str, final: bool, state: Any) -> ScanResult:
        segments: list[Segment] = []
        checkpoint: Checkpoint | None = None
        if isinstance(state, _InArguments):  # inside the first call, which streams
            call, end, scan = _resumed(state, text)
            if end is None:
                return ScanResult([Segment(call=call)], len(text),
                                  checkpoint=_streaming(call, text, 0, scan, 0, final, state.before))
            segments.append(Segment(call=call))
            seen = {_call_key(ParsedCall(call.name, "".join(state.before) + call.arguments))}
            earlier_calls, i = True, end
            checkpoint = None if final else Checkpoint(i, 1, _BetweenItems(frozenset(seen)))
        elif isinstance(state, _BetweenItems):
            seen, earlier_calls, i = set(state.seen), True, 0
        else:
            i, early = _opening(text, "[", final)
            if early is not None:
                return early
            seen, earlier_calls, i = set(), False, i + 1
        while True:
            i = skip_ws(text, i)
            while i < len(text) and text[i] in ",}":
                i = skip_ws(text, i + 1)
            if i >= len(text) or text[i] == "]":
                break
            head = _ITEM_HEAD.match(text, i)
            if head is None:
                break  # the item's head is still arriving
            name = json.loads(f'"{head.group(1)}"')
            call, end, scan = _partial_call(text, name, head.end())
            if end is None:
                if not segments and not earlier_calls:  # the first call streams as it grows
                    segments.append(Segment(call=call))
                    checkpoint = _streaming(call, text, head.end(), scan, 0, final)
                break
            key = _call_key(call)
            if key in seen:
                return ScanResult(segments, len(text), stop=True)
            seen.add(key)
            segments.append(Segment(call=call))
            i = end
            checkpoint = None if final else Checkpoint(i, len(segments), _BetweenItems(frozenset(seen)))
        if final and not segments and not earlier_calls:
            return ScanResult([Segment(text)], len(text))
        return ScanResult(segments, len(text) if final else i, checkpoint=checkpoint)


class NamedDetector(ToolCallDetector):
    name = "named"

    def __init__(self, tool_names: set[str], function_name: str, schemas: dict[str, dict[str, Any]] | None = None,
                 id_factory: Callable[[], str] | None = None):
        super().__init__(tool_names, schemas, id_factory)
        self.function_name = function_name

    def scan(self, text: str, final: bool) -> ScanResult:
        return self.scan_from(text, final, None)

    def scan_from(self, text: str, final: bool, state: Any) -> ScanResult:
        if isinstance(state, _InArguments):
            call, end, scan = _resumed(state, text)
            i = 0
        else:
            i, early = _opening(text, "{", final)
            if early is not None:
                return early
            call, end, scan = _partial_call(text, self.function_name, i)
        checkpoint = _streaming(call, text, i, scan, 0, final) if end is None else None
        return ScanResult([Segment(call=call)], len(text) if final or end is None else end, checkpoint=checkpoint)
