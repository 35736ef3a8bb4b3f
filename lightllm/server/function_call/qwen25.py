"""qwen25 (Hermes style): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks.

Also accepts what small Qwen coder models emit instead: the fenced form (a ```json block holding one
{"name", "arguments"} object) and a bare such object opening the output, when the name is one of the
request's tools. An unterminated last block is parsed when its JSON is complete; a block that is not a
valid call of a known tool stays text.
"""

from __future__ import annotations

from lightllm.server.function_call.base import (ScanResult, Segment, ToolCallDetector, load_json, match_json,
                                                skip_ws)

BLOCKS = (("<tool_call>", "</tool_call>"), ("```json", "```"))


class Qwen25Detector(ToolCallDetector):
    name = "qwen25"
    markers = tuple(start for start, _ in BLOCKS)

    def scan(self, text: str, final: bool) -> ScanResult:
        segments: list[Segment] = []
        pos = 0
        lead = skip_ws(text, 0)
        if lead < len(text) and text[lead] == "{":  # a bare call object opening the output
            end = match_json(text, lead)
            if end is None:
                return ScanResult([Segment(text)] if final else [], len(text) if final else 0)
            call = self.call_from_object(load_json(text[lead:end]))
            if call is not None:
                segments.append(Segment(call=call))
                pos = end
        while True:
            found = [(text.find(start, pos), start, end) for start, end in BLOCKS]
            found = [f for f in found if f[0] >= 0]
            if not found:
                seg, decided = self.text_with_holdback(text, pos, final)
                segments.append(seg)
                return ScanResult(segments, decided)
            start, open_tag, close_tag = min(found)
            segments.append(Segment(text[pos:start]))
            body = skip_ws(text, start + len(open_tag))
            obj_end = match_json(text, body) if body < len(text) and text[body] == "{" else None
            close = text.find(close_tag, obj_end if obj_end is not None else start + len(open_tag))
            if obj_end is None and body < len(text) and text[body] != "{":
                obj_end = -1  # not JSON: the block is text once it closes
            if obj_end is None:  # JSON still streaming in
                if final:
                    segments.append(Segment(text[start:]))
                    return ScanResult(segments, len(text))
                return ScanResult(segments, start)
            call = self.call_from_object(load_json(text[body:obj_end])) if obj_end > 0 else None
            if call is not None:
                segments.append(Segment(call=call))
                if close < 0:
                    return ScanResult(segments, len(text) if final else obj_end)
                pos = close + len(close_tag)
                continue
            if close < 0:  # not a call: text, once the block ends
                if final:
                    segments.append(Segment(text[start:]))
                    return ScanResult(segments, len(text))
                return ScanResult(segments, start)
            segments.append(Segment(text[start:close + len(close_tag)]))
            pos = close + len(close_tag)
