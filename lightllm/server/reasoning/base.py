"""Reasoning detector interface and the streaming machinery shared by every reasoning format.

A detector `split`s a whole output text into the reasoning part and the answer part. As with the
tool-call detectors, the split must be prefix-stable: what it decides for a prefix of the output stays
the same for every extension (a tail that could still turn into a tag is withheld until it is known).
Streaming re-splits the growing text and emits only what is newly decided, so the streamed
`reasoning_content` and `content` reassemble to exactly the non-streamed split for any chunking.

Where the chat template puts the opening tag into the prompt (Qwen3-thinking, DeepSeek-R1, DeepSeek-V3.1
with `thinking`), the output starts inside the block: `for_prompt` decides that per request.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightllm.server.holdback import partial_marker_len


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str  # the reasoning decided so far (whitespace around it trimmed)
    content: str  # the answer decided so far (leading whitespace trimmed when a block preceded it)


def _block_body(raw: str, final: bool, end_tag: str) -> str:
    """Reasoning text of a block not closed (yet): trimmed, minus a tail that may still become the end
    tag or turn out to be whitespace before it."""
    if final:
        return raw.strip()
    hold = partial_marker_len(raw, (end_tag,))
    return raw[:len(raw) - hold].strip()


class ReasoningDetector:
    """Interface: `split(text, final)`; `for_prompt` returns the detector to use for one request."""

    name = "base"
    # Reasoning markers are special tokens in some vocabularies (harmony's always): keep them in the text.
    needs_special_tokens = True

    def for_prompt(self, prompt: str) -> "ReasoningDetector":
        return self

    def split(self, text: str, final: bool) -> ReasoningSplit:
        raise NotImplementedError


class ThinkTagDetector(ReasoningDetector):
    """`<think>reasoning</think>answer` and the same shape with other tags.

    The block counts only when it opens the output (after optional whitespace) or when the output starts
    inside it (`in_block`: forced by the format or by the prompt ending with the opening tag). A start
    tag later in the text is plain content, as is everything when no block opens the output.
    """

    def __init__(self, name: str, start_tag: str, end_tag: str, force_reasoning: bool = False,
                 in_block: bool | None = None):
        self.name = name
        self.start_tag = start_tag
        self.end_tag = end_tag
        self.force_reasoning = force_reasoning
        self.in_block = force_reasoning if in_block is None else in_block

    def for_prompt(self, prompt: str) -> "ThinkTagDetector":
        tail = prompt.rstrip()
        opened = tail.endswith(self.start_tag)
        return ThinkTagDetector(self.name, self.start_tag, self.end_tag, self.force_reasoning,
                                self.force_reasoning or opened)

    def split(self, text: str, final: bool) -> ReasoningSplit:
        lead = len(text) - len(text.lstrip())
        rest = text[lead:]
        if rest.startswith(self.start_tag):
            body_start = lead + len(self.start_tag)  # a model may repeat the tag its prompt already opened
        elif not final and self.start_tag.startswith(rest):
            return ReasoningSplit("", "")  # whitespace or part of the opening tag so far: undecided
        elif self.in_block:
            body_start = 0
        else:
            return ReasoningSplit("", text)
        close = text.find(self.end_tag, body_start)
        if close < 0:
            return ReasoningSplit(_block_body(text[body_start:], final, self.end_tag), "")
        return ReasoningSplit(text[body_start:close].strip(), text[close + len(self.end_tag):].lstrip())


class ReasoningStreamParser:
    """Feeds text deltas; returns (new reasoning text, new answer text) per delta."""

    def __init__(self, detector: ReasoningDetector):
        self.detector = detector
        self.buffer = ""
        self.reasoning_sent = 0
        self.content_sent = 0

    def feed(self, delta: str) -> tuple[str, str]:
        self.buffer += delta
        return self._diff(self.detector.split(self.buffer, final=False))

    def finish(self) -> tuple[str, str]:
        return self._diff(self.detector.split(self.buffer, final=True))

    def _diff(self, split: ReasoningSplit) -> tuple[str, str]:
        reasoning = split.reasoning[self.reasoning_sent:]
        content = split.content[self.content_sent:]
        self.reasoning_sent = max(self.reasoning_sent, len(split.reasoning))
        self.content_sent = max(self.content_sent, len(split.content))
        return reasoning, content
