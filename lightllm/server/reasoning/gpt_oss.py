"""gpt-oss (OpenAI's harmony format). The output is a sequence of messages,

    <|channel|>analysis<|message|>REASONING<|end|><|start|>assistant<|channel|>final<|message|>ANSWER<|return|>

(the prompt ends with `<|start|>assistant`, so the first message has no `<|start|>`). `analysis` bodies
are the reasoning, `final` bodies and `commentary` preambles (no recipient) the answer. Messages addressed
to a recipient (a tool call such as `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>
{...}<|call|>`) stay in the answer whole, with their markup, for the gpt-oss tool parser or the client.
Output that does not use the channel markup at all is answer text.
"""

from __future__ import annotations

from lightllm.server.holdback import partial_marker_len
from lightllm.server.reasoning.base import ReasoningDetector, ReasoningSplit

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")


def _first_end(text: str, start: int) -> tuple[int, str] | None:
    hits = [(text.find(end, start), end) for end in ENDS]
    hits = [h for h in hits if h[0] >= 0]
    return min(hits) if hits else None


class GptOssDetector(ReasoningDetector):
    name = "gpt-oss"

    def split(self, text: str, final: bool) -> ReasoningSplit:
        reasoning: list[str] = []
        content: list[str] = []
        pos = 0
        while pos < len(text):
            head = pos
            if text.startswith(START, head):
                head = text.find(CHANNEL, head)
                if head < 0:
                    if final:
                        content.append(text[pos:])
                    break
            if not text.startswith(CHANNEL, head):
                if not final and (START.startswith(text[head:]) or CHANNEL.startswith(text[head:])):
                    break  # markup still arriving
                content.append(text[head:])  # not harmony markup: plain answer text
                break
            body_start = text.find(MESSAGE, head)
            if body_start < 0:
                if final:
                    content.append(text[pos:])
                break
            channel = text[head + len(CHANNEL):body_start].split()
            body_start += len(MESSAGE)
            end = _first_end(text, body_start)
            if end is None:
                body = text[body_start:]
                if not final:
                    body = body[:len(body) - partial_marker_len(body, ENDS)]
                stop = len(text)
            else:
                body = text[body_start:end[0]]
                stop = end[0] + len(end[1])
            kind = channel[0] if channel else ""
            addressed = "to=" in text[pos:body_start]  # a recipient in the role or channel header
            if kind == "analysis":
                reasoning.append(body)
            elif kind == "final" or (kind == "commentary" and not addressed):  # a preamble is for the user
                content.append(body)
            elif end is not None or final:
                content.append(text[pos:stop])  # commentary etc.: kept whole, once complete
            else:
                break
            pos = stop
        return ReasoningSplit("".join(reasoning), "".join(content))
