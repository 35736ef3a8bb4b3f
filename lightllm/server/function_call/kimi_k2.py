"""kimi_k2 (Kimi-K2): `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{...}<|tool_call_end|>…<|tool_calls_section_end|>`.

The call id is the model's own `functions.NAME:IDX` (its template feeds ids back in that form)."""

from __future__ import annotations

import re
from dataclasses import replace

from lightllm.server.function_call.base import ParsedCall
from lightllm.server.function_call.sections import SectionDetector, SectionMarkers

ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
_CALL_ID = re.compile(r"\s*((?:functions\.)?([A-Za-z0-9_\-.]+?)(?::(\d+))?)\s*$")


class KimiK2Detector(SectionDetector):
    name = "kimi_k2"
    section = SectionMarkers("<|tool_calls_section_begin|>", "<|tool_call_begin|>", "<|tool_call_end|>",
                             "<|tool_calls_section_end|>")

    def parse_body(self, body: str, index: int) -> ParsedCall | None:
        head, sep, args = body.partition(ARGUMENT_BEGIN)
        match = _CALL_ID.match(head)
        if not sep or match is None:
            return None
        call = self.call_from_parts(match.group(2), args)
        if call is None:
            return None
        call_id = match.group(1) if match.group(3) is not None else f"functions.{match.group(2)}:{index}"
        return replace(call, call_id=call_id)
