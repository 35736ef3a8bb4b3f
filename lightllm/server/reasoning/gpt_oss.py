"""gpt-oss (OpenAI's harmony format). The output is a sequence of messages,

    <|channel|>analysis<|message|>REASONING<|end|><|start|>assistant<|channel|>final<|message|>ANSWER<|return|>

(the prompt ends with `<|start|>assistant`, so the first message has no `<|start|>`). `analysis` bodies
are the reasoning, `final` bodies and `commentary` preambles (no recipient) the answer. Messages addressed
to a recipient (a tool call such as `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>
{...}<|call|>`) stay in the answer whole, with their markup, for the gpt-oss tool parser or the client.
Output that does not use the channel markup at all is answer text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightllm.server.holdback import partial_marker_len
from lightllm.server.reasoning.base import ReasoningCheckpoint, ReasoningDetector, ReasoningSplit

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")


def _first_end(text: str, start: int) -> tuple[int, str] | None:
    hits = [(text.find(end, start), end) for end in ENDS]
    hits = [h for h in hits if h[0] >= 0]
    return min(hits) if hits else None


@dataclass(frozen=True)
class _Body:
    """Resume inside a message body whose text is reasoning (`analysis`) or answer."""

    reasoning: bool


_PLAIN = "plain"  # resume in answer text that uses no harmony markup: all of it is answer


class GptOssDetector(ReasoningDetector):
    """Streams resume (see base.py) at message boundaries, inside a reasoning or answer body (its text up to
    a tail that may still become an end marker is decided), and in plain answer text."""

    name = "gpt-oss"

    def split(self, text: str, final: bool) -> ReasoningSplit:
        return self.split_from(text, final, None)

    def split_from(self, text: str, final: bool, state: Any) -> ReasoningSplit:
        if state is _PLAIN:
            return ReasoningSplit("", text, None if final else ReasoningCheckpoint(len(text), 0, len(text), _PLAIN))
        reasoning: list[str] = []
        content: list[str] = []
        sizes = [0, 0]  # characters in reasoning and content so far
        checkpoint: ReasoningCheckpoint | None = None  # the furthest point a stream can resume from

        def add(to_reasoning: bool, part: str) -> None:
            (reasoning if to_reasoning else content).append(part)
            sizes[0 if to_reasoning else 1] += len(part)

        def resume_at(at: int, resume_state: Any) -> ReasoningCheckpoint:
            return ReasoningCheckpoint(at, sizes[0], sizes[1], resume_state)

        body_state = state if isinstance(state, _Body) else None
        pos = 0
        while pos < len(text) or body_state is not None:
            if body_state is not None:  # the checkpoint is inside a reasoning or answer body
                body_start, own_body, to_reasoning = 0, True, body_state.reasoning
                body_state = None
            else:
                head = pos
                if text.startswith(START, head):
                    head = text.find(CHANNEL, head)
                    if head < 0:
                        if final:
                            add(False, text[pos:])
                        break
                if not text.startswith(CHANNEL, head):
                    if not final and (START.startswith(text[head:]) or CHANNEL.startswith(text[head:])):
                        break  # markup still arriving
                    add(False, text[head:])  # not harmony markup: plain answer text
                    checkpoint = resume_at(len(text), _PLAIN)
                    break
                body_start = text.find(MESSAGE, head)
                if body_start < 0:
                    if final:
                        add(False, text[pos:])
                    break
                channel = text[head + len(CHANNEL):body_start].split()
                body_start += len(MESSAGE)
                kind = channel[0] if channel else ""
                addressed = "to=" in text[pos:body_start]  # a recipient in the role or channel header
                to_reasoning = kind == "analysis"
                # reasoning, the answer, or a preamble (commentary for the user); else kept whole with its markup
                own_body = to_reasoning or kind == "final" or (kind == "commentary" and not addressed)
            end = _first_end(text, body_start)
            if end is None:
                body = text[body_start:]
                if not final:
                    body = body[:len(body) - partial_marker_len(body, ENDS)]
                stop = len(text)
            else:
                body = text[body_start:end[0]]
                stop = end[0] + len(end[1])
            if own_body:
                add(to_reasoning, body)
                if end is None and not final:
                    checkpoint = resume_at(body_start + len(body), _Body(to_reasoning))
            elif end is not None or final:
                add(False, text[pos:stop])  # commentary etc.: kept whole, once complete
            else:
                break
            pos = stop
            if end is not None:
                checkpoint = resume_at(pos, None)  # a message boundary
        return ReasoningSplit("".join(reasoning), "".join(content), None if final else checkpoint)
