"""deepseekv32 (DeepSeek-V3.2): DSML markup, parameters as text with a `string` flag:

    <｜DSML｜function_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Hangzhou</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜function_calls>

`string="true"` values are taken verbatim; the others are JSON (typed by the tool's schema when they
are not valid JSON).
"""

from __future__ import annotations

import json
import re

from lightllm.server.function_call.base import ParsedCall
from lightllm.server.function_call.sections import SectionDetector, SectionMarkers
from lightllm.server.function_call.values import convert_value, property_schema

DSML = "\uff5cDSML\uff5c"
_HEAD = re.compile(r'\s+name="([^"]+)"\s*>')
_PARAM = re.compile(rf'\s*<{DSML}parameter\s+name="([^"]+)"(?:\s+string="(true|false)")?\s*>(.*?)</{DSML}parameter>\s*',
                    re.DOTALL)


class DeepSeekV32Detector(SectionDetector):
    name = "deepseekv32"
    section = SectionMarkers(f"<{DSML}function_calls>", f"<{DSML}invoke", f"</{DSML}invoke>",
                             f"</{DSML}function_calls>")

    def parse_body(self, body: str, index: int) -> ParsedCall | None:
        head = _HEAD.match(body)
        if head is None or not self.known(head.group(1)):
            return None
        name = head.group(1)
        args: dict = {}
        pos = head.end()
        while body[pos:].strip():
            param = _PARAM.match(body, pos)
            if param is None:
                return None
            key, is_string, value = param.group(1), param.group(2), param.group(3)
            if is_string == "true":
                args[key] = value
            else:
                try:
                    args[key] = json.loads(value)
                except json.JSONDecodeError:
                    args[key] = convert_value(value, property_schema(self.schemas.get(name), key))
            pos = param.end()
        return self.make_call(name, args)
