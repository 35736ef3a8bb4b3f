"""glm47 / glm45 (GLM-4.5, 4.6, 4.7): one `<tool_call>` block per call, the function name first, then
`<arg_key>K</arg_key><arg_value>V</arg_value>` pairs (GLM-4.5 puts newlines between them, 4.7 does not):

    <tool_call>get_weather
    <arg_key>city</arg_key>
    <arg_value>Beijing</arg_value>
    </tool_call>

Values are text, typed by the tool's JSON schema (see values.py).
"""

from __future__ import annotations

import re

from lightllm.server.function_call.base import ParsedCall
from lightllm.server.function_call.sections import BlockDetector
from lightllm.server.function_call.values import convert_value, property_schema

_BLOCK = re.compile(r"<tool_call>\s*([^<\s][^<\n]*?)\s*((?:<arg_key>.*)?)</tool_call>$", re.DOTALL)
_PAIR = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>\s*", re.DOTALL)


class Glm47Detector(BlockDetector):
    name = "glm47"
    blocks = (("<tool_call>", "</tool_call>"),)

    def parse_block(self, block: str) -> ParsedCall | None:
        match = _BLOCK.match(block)
        if match is None or not self.known(match.group(1)):
            return None
        name, body = match.group(1), match.group(2)
        args: dict = {}
        pos = 0
        while pos < len(body):
            pair = _PAIR.match(body, pos)
            if pair is None:
                return None  # stray text between pairs: not this format
            key = pair.group(1).strip()
            args[key] = convert_value(pair.group(2), property_schema(self.schemas.get(name), key))
            pos = pair.end()
        return self.make_call(name, args)
