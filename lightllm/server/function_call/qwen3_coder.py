"""qwen3_coder (Qwen3-Coder, Qwen3-Next): XML-style calls whose parameter values are text,

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Beijing
    </parameter>
    </function>
    </tool_call>

typed by the tool's JSON schema (see values.py). One newline around each value belongs to the layout and
is removed. The `<tool_call>` wrapper is sometimes left out; a bare `<function=…>…</function>` block is a
call too. A last parameter without `</parameter>` ends at `</function>`, as the peers accept.
"""

from __future__ import annotations

import re

from lightllm.server.function_call.base import ParsedCall
from lightllm.server.function_call.sections import BlockDetector
from lightllm.server.function_call.values import convert_value, property_schema

_FUNCTION = re.compile(r"(?:<tool_call>\s*)?<function=([^>\n]+)>(.*?)</function>\s*(?:</tool_call>)?$", re.DOTALL)
_PARAM = re.compile(r"\s*<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)


def _layout_trimmed(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


class Qwen3CoderDetector(BlockDetector):
    name = "qwen3_coder"
    blocks = (("<tool_call>", "</tool_call>"), ("<function=", "</function>"))

    def parse_block(self, block: str) -> ParsedCall | None:
        match = _FUNCTION.match(block)
        if match is None:
            return None
        name, body = match.group(1).strip(), match.group(2)
        if not self.known(name):
            return None
        args: dict = {}
        pos = 0
        while body[pos:].strip():
            param = _PARAM.match(body, pos)
            if param is None or param.end() == pos:
                return None
            key = param.group(1).strip()
            args[key] = convert_value(_layout_trimmed(param.group(2)), property_schema(self.schemas.get(name), key))
            pos = param.end()
        return self.make_call(name, args)
