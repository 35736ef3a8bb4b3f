"""gpt-oss (OpenAI's harmony format): a call is a message addressed to a function,

    <|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>

The recipient may also sit in the role header (`<|start|>assistant to=functions.NAME<|channel|>commentary
json<|message|>`), the content type may be written `<|constrain|>json` or a bare `json`, and `<|call|>`
(a stop token) may be missing at the end of the output. The body must be a JSON object or empty
(`{}`); a body that is not, or a function the request did not offer, leaves the message as text.

With the gpt-oss reasoning parser in front, this detector sees the answer part of the output: `final`
bodies and preambles already unwrapped, and call messages whole. Without it (separate_reasoning off)
the other messages stay in the text with their markup. Unlike the other formats, text after a call
(a `final` message following the calls) is still content: the segments are returned text first, calls
after, which keeps both growing only at their ends while streaming.
"""

from __future__ import annotations

import re

from lightllm.server.function_call.base import ParsedCall, ScanResult, Segment, ToolCallDetector

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")
_RECIPIENT = re.compile(r"(?:^|\s)to=functions\.([^\s<]+)")


def _first_end(text: str, start: int) -> tuple[int, str] | None:
    hits = [(i, end) for end in ENDS if (i := text.find(end, start)) >= 0]
    return min(hits) if hits else None


class GptOssToolDetector(ToolCallDetector):
    name = "gpt-oss"
    markers = (START, CHANNEL)

    def _message_start(self, text: str, pos: int) -> int:
        hits = [i for m in self.markers if (i := text.find(m, pos)) >= 0]
        return min(hits) if hits else -1

    def _call(self, header: str, body: str) -> ParsedCall | None:
        match = _RECIPIENT.search(header.replace(CONSTRAIN, " "))
        if match is None:
            return None
        return self.call_from_parts(match.group(1), body)

    def scan(self, text: str, final: bool) -> ScanResult:
        texts: list[Segment] = []
        calls: list[Segment] = []
        pos = 0
        while True:
            start = self._message_start(text, pos)
            if start < 0:
                seg, decided = self.text_with_holdback(text, pos, final)
                texts.append(seg)
                return ScanResult(texts + calls, decided)
            texts.append(Segment(text[pos:start]))
            body_start = text.find(MESSAGE, start)
            if body_start < 0:  # header still arriving, or cut off by the end of the output
                if final:
                    texts.append(Segment(text[start:]))
                return ScanResult(texts + calls, len(text) if final else start)
            end = _first_end(text, body_start + len(MESSAGE))
            if end is None and not final:
                return ScanResult(texts + calls, start)
            body_end, stop = (end[0], end[0] + len(end[1])) if end else (len(text), len(text))
            call = self._call(text[start:body_start], text[body_start + len(MESSAGE):body_end])
            if call is None:
                texts.append(Segment(text[start:stop]))  # not a call of an offered function: stays text
            else:
                calls.append(Segment(call=call))
            pos = stop
