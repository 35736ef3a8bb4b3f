"""DeepSeek tool calls (the markers use U+FF5C '｜' and U+2581 '▁'):

- deepseekv3 (DeepSeek-V3 / R1): `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`
- deepseekv31 (DeepSeek-V3.1): `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`
"""

from __future__ import annotations

import re

from lightllm.server.function_call.base import ParsedCall
from lightllm.server.function_call.sections import SectionDetector, SectionMarkers

CALLS_BEGIN = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
CALLS_END = "<\uff5ctool\u2581calls\u2581end\uff5c>"
CALL_BEGIN = "<\uff5ctool\u2581call\u2581begin\uff5c>"
CALL_END = "<\uff5ctool\u2581call\u2581end\uff5c>"
SEP = "<\uff5ctool\u2581sep\uff5c>"
MARKERS = SectionMarkers(CALLS_BEGIN, CALL_BEGIN, CALL_END, CALLS_END)

_V3_BODY = re.compile(r"\s*function\s*" + re.escape(SEP) + r"\s*([^\n]+?)\s*\n\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*$",
                      re.DOTALL)


class DeepSeekV3Detector(SectionDetector):
    name = "deepseekv3"
    section = MARKERS

    def parse_body(self, body: str, index: int) -> ParsedCall | None:
        match = _V3_BODY.match(body)
        if match is None:
            return None
        return self.call_from_parts(match.group(1), match.group(2))


class DeepSeekV31Detector(SectionDetector):
    name = "deepseekv31"
    section = MARKERS

    def parse_body(self, body: str, index: int) -> ParsedCall | None:
        name, sep, args = body.partition(SEP)
        if not sep:
            return None
        return self.call_from_parts(name.strip(), args)
