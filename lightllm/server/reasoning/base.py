"""Reasoning detector interface and the streaming machinery shared by every reasoning format.

A detector `split`s a whole output text into the reasoning part and the answer part. As with the
tool-call detectors, the split must be prefix-stable: what it decides for a prefix of the output stays
the same for every extension (a tail that could still turn into a tag is withheld until it is known).
Streaming re-splits the growing text and emits only what is newly decided, so the streamed
`reasoning_content` and `content` reassemble to exactly the non-streamed split for any chunking. A split
may carry a `ReasoningCheckpoint` (where the text before is decided for good, and the state there) so the
stream parser re-splits only the text after it: the work per delta stays bounded however long the output.

Where the chat template puts the opening tag into the prompt (Qwen3-thinking, DeepSeek-R1, DeepSeek-V3.1
with `thinking`), the output starts inside the block: `for_prompt` decides that per request.

A tool call may also end the block (models call tools straight from their thinking): a `section_marker`
(Kimi-K2's calls section) always does; a `call_marker` (`<tool_call>` for Qwen3 and GLM-4.5) does when the
request's tool parser reads a complete call starting there (`with_tool_calls`), the first of these and
the end tag winning. The marker then begins the answer, where the tool parser finds the call.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightllm.server.holdback import partial_marker_len

StartsCall = Callable[[str, bool], "bool | None"]  # (text, final) → does a complete tool call open it?


@dataclass(frozen=True)
class ReasoningCheckpoint:
    """For every extension of the text, splitting it whole gives reasoning[:reasoning] and content[:content]
    of this split for text[:pos], followed by `split_from(text[pos:], final, state)`."""

    pos: int
    reasoning: int
    content: int
    state: Any


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str  # the reasoning decided so far (whitespace around it trimmed)
    content: str  # the answer decided so far (leading whitespace trimmed when a block preceded it)
    checkpoint: ReasoningCheckpoint | None = None  # set only by non-final splits of detectors that resume


@dataclass(frozen=True)
class _InBlock:
    """The checkpoint is inside the reasoning block; `started`: reasoning text came before it, so
    whitespace at the checkpoint is inside the reasoning (not trimmed)."""

    started: bool


@dataclass(frozen=True)
class _Answer:
    """The checkpoint is in the answer; `trim`: no answer text yet after a block (leading whitespace goes)."""

    trim: bool


class ReasoningDetector:
    """Interface: `split(text, final)`; `for_prompt` returns the detector to use for one request."""

    name = "base"
    # Reasoning markers are special tokens in some vocabularies (harmony's always): keep them in the text.
    needs_special_tokens = True

    def for_prompt(self, prompt: str) -> "ReasoningDetector":
        return self

    def with_tool_calls(self, starts_call: StartsCall) -> "ReasoningDetector":
        """The detector for a request whose tool parser runs: `starts_call(text, final)` says whether a
        complete call opens `text` (None: not known yet)."""
        return self

    def split(self, text: str, final: bool) -> ReasoningSplit:
        raise NotImplementedError

    def split_from(self, text: str, final: bool, state: Any) -> ReasoningSplit:
        """Split text that starts at a checkpoint this detector returned (state None: the output's start)."""
        return self.split(text, final)


class ThinkTagDetector(ReasoningDetector):
    """`<think>reasoning</think>answer` and the same shape with other tags.

    The block counts only when it opens the output (after optional whitespace) or when the output starts
    inside it (`in_block`: forced by the format or by the prompt ending with the opening tag). A start
    tag later in the text is plain content, as is everything when no block opens the output.
    """

    def __init__(self, name: str, start_tag: str, end_tag: str, force_reasoning: bool = False,
                 in_block: bool | None = None, section_markers: tuple[str, ...] = (),
                 call_markers: tuple[str, ...] = ()):
        self.name = name
        self.start_tag = start_tag
        self.end_tag = end_tag
        self.force_reasoning = force_reasoning
        self.in_block = force_reasoning if in_block is None else in_block
        self.section_markers = section_markers
        self.call_markers = call_markers
        self.starts_call: StartsCall | None = None

    def for_prompt(self, prompt: str) -> "ThinkTagDetector":
        tail = prompt.rstrip()
        adapted = copy.copy(self)
        adapted.in_block = self.force_reasoning or tail.endswith(self.start_tag)
        return adapted

    def with_tool_calls(self, starts_call: StartsCall) -> "ThinkTagDetector":
        adapted = copy.copy(self)
        adapted.starts_call = starts_call
        return adapted

    @property
    def _ending_markers(self) -> tuple[str, ...]:
        return self.section_markers + (self.call_markers if self.starts_call is not None else ())

    def _call_ends_block(self, text: str, body_start: int, close: int, final: bool) -> tuple[int, bool] | None:
        """The first marker in the block's body that ends it, as (its index, True); (its index, False) when
        one may but is not decided yet; None when none does. A call marker counts when a complete call
        starts there, and, if the end tag follows, ends before it."""
        limit = close if close >= 0 else len(text)
        pos = body_start
        while True:
            hits = [(i, m) for m in self._ending_markers if 0 <= (i := text.find(m, pos, limit))]
            if not hits:
                return None
            at, marker = min(hits)
            if marker in self.section_markers:
                return at, True
            verdict = self.starts_call(text[at:close], True) if close >= 0 else self.starts_call(text[at:], final)
            if verdict is None:
                return at, False
            if verdict:
                return at, True
            pos = at + len(marker)

    def split(self, text: str, final: bool) -> ReasoningSplit:
        return self.split_from(text, final, None)

    def split_from(self, text: str, final: bool, state: Any) -> ReasoningSplit:
        if isinstance(state, _Answer):
            return _answer(text, 0, state.trim, final)
        if isinstance(state, _InBlock):
            return self._block(text, 0, state.started, final)
        lead = len(text) - len(text.lstrip())
        rest = text[lead:]
        if rest.startswith(self.start_tag):
            body_start = lead + len(self.start_tag)  # a model may repeat the tag its prompt already opened
        elif not final and self.start_tag.startswith(rest):
            return ReasoningSplit("", "")  # whitespace or part of the opening tag so far: undecided
        elif self.in_block:
            body_start = 0
        else:
            return _answer(text, 0, False, final)
        return self._block(text, body_start, False, final)

    def _block(self, text: str, body_start: int, started: bool, final: bool) -> ReasoningSplit:
        """The reasoning block's body from `body_start` (`started`: reasoning text came before it): trimmed,
        minus a tail that may still become the end tag or turn out to be whitespace before it."""
        close = text.find(self.end_tag, body_start)
        ending = self._call_ends_block(text, body_start, close, final) if self._ending_markers else None
        if ending is not None and ending[1]:  # a tool call ends the block: the answer starts at its marker
            return _answer(text, ending[0], True, final, _trim(text[body_start:ending[0]], started))
        if close >= 0:  # (with the end tag known, whether a call ends the block is decided)
            reasoning = _trim(text[body_start:close], started)
            return _answer(text, close + len(self.end_tag), True, final, reasoning)
        if ending is not None:  # a call may be starting: the reasoning waits before its marker
            raw = text[body_start:ending[0]]
        else:
            hold = 0 if final else partial_marker_len(text, (self.end_tag,) + self._ending_markers, body_start)
            raw = text[body_start:len(text) - hold]
        reasoning = _trim(raw, started)
        if final:
            return ReasoningSplit(reasoning, "")
        # resume just after the last reasoning character (still at the body's start while there is none)
        pos = body_start + len(raw.rstrip()) if reasoning else body_start
        checkpoint = ReasoningCheckpoint(pos, len(reasoning), 0, _InBlock(started or bool(reasoning)))
        return ReasoningSplit(reasoning, "", checkpoint)


def _trim(body: str, started: bool) -> str:
    return body.rstrip() if started else body.strip()


def _answer(text: str, start: int, trim: bool, final: bool, reasoning: str = "") -> ReasoningSplit:
    """text[start:] is all answer (leading whitespace trimmed while `trim`), after `reasoning`."""
    content = text[start:].lstrip() if trim else text[start:]
    if final:
        return ReasoningSplit(reasoning, content)
    return ReasoningSplit(reasoning, content, ReasoningCheckpoint(len(text), len(reasoning), len(content),
                                                                  _Answer(trim and not content)))


class ReasoningStreamParser:
    """Feeds text deltas; returns (new reasoning text, new answer text) per delta."""

    def __init__(self, detector: ReasoningDetector):
        self.detector = detector
        self.text = ""  # the output from the last checkpoint on
        self.state: Any = None  # the detector's state at that checkpoint (None: the output's start)
        self.reasoning_sent = 0  # of the reasoning and answer split from `text`, what was sent
        self.content_sent = 0

    def feed(self, delta: str) -> tuple[str, str]:
        self.text += delta
        split = self.detector.split_from(self.text, False, self.state)
        out = self._diff(split)
        cp = split.checkpoint
        if cp is not None:
            self.text, self.state = self.text[cp.pos:], cp.state
            self.reasoning_sent -= cp.reasoning
            self.content_sent -= cp.content
        return out

    def finish(self) -> tuple[str, str]:
        return self._diff(self.detector.split_from(self.text, True, self.state))

    def _diff(self, split: ReasoningSplit) -> tuple[str, str]:
        reasoning = split.reasoning[self.reasoning_sent:]
        content = split.content[self.content_sent:]
        self.reasoning_sent = max(self.reasoning_sent, len(split.reasoning))
        self.content_sent = max(self.content_sent, len(split.content))
        return reasoning, content
