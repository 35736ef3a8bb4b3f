"""qwen25 (Hermes style): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks.

Also accepts what small Qwen coder models emit instead: the fenced form (a ```json block holding one
{"name", "arguments"} object) and a bare such object opening the output, when the name is one of the
request's tools. An unterminated last block is parsed when its JSON is complete; a block that is not a
valid call of a known tool stays text.

Streaming resumes (see base.py) at the start of a block still arriving, carrying its JSON scan, and in
plain text at the held-back tail that may still become a marker.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightllm.server.function_call.base import (Checkpoint, JsonScan, ScanResult, Segment, ToolCallDetector,
                                                load_json, skip_ws)

BLOCKS = (("<tool_call>", "</tool_call>"), ("```json", "```"))


@dataclass
class _Lead:
    """At the output's start, a bare call object is arriving: its JSON scan so far."""

    json: JsonScan


@dataclass
class _Block:
    """A block opens at the checkpoint: its tags and the scan of its JSON so far (None: not begun)."""

    open_tag: str
    close_tag: str
    json: JsonScan | None


_TEXT = "text"  # the checkpoint is in plain text after the output's start was decided


class Qwen25Detector(ToolCallDetector):
    name = "qwen25"
    markers = tuple(start for start, _ in BLOCKS)

    def scan(self, text: str, final: bool) -> ScanResult:
        return self.scan_from(text, final, None)

    def scan_from(self, text: str, final: bool, state: object) -> ScanResult:
        segments: list[Segment] = []
        pos = 0
        if state is None or isinstance(state, _Lead):
            lead = skip_ws(text, 0)
            if lead == len(text) and not final:
                return self._scan(text, final, 0, segments, None, resumable=False)  # the start is undecided
            if lead < len(text) and text[lead] == "{":  # a bare call object opening the output
                json = state.json if isinstance(state, _Lead) else JsonScan(lead)
                end = json.end(text)
                if end is None:
                    if final:
                        return ScanResult([Segment(text)], len(text))
                    return ScanResult([], 0, checkpoint=Checkpoint(0, 0, _Lead(json)))
                call = self.call_from_object(load_json(text[lead:end]))
                if call is not None:
                    segments.append(Segment(call=call))
                    pos = end
        return self._scan(text, final, pos, segments, state if isinstance(state, _Block) else None)

    def _scan(self, text: str, final: bool, pos: int, segments: list[Segment], block: _Block | None,
              resumable: bool = True) -> ScanResult:
        resumable = resumable and not final

        def waiting(start: int, decided: int, state: _Block) -> ScanResult:
            checkpoint = Checkpoint(start, len(segments), state) if resumable else None
            return ScanResult(segments, decided, checkpoint=checkpoint)

        while True:
            if block is not None:  # resuming inside the block that opens at the checkpoint
                start, open_tag, close_tag, json = 0, block.open_tag, block.close_tag, block.json
                block = None
            else:
                found = [(text.find(start, pos), start, end) for start, end in BLOCKS]
                found = [f for f in found if f[0] >= 0]
                if not found:
                    seg, decided = self.text_with_holdback(text, pos, final)
                    segments.append(seg)
                    # no marker can begin before `decided` any more (only the held tail may start one)
                    checkpoint = Checkpoint(decided, len(segments), _TEXT) if resumable else None
                    return ScanResult(segments, decided, checkpoint=checkpoint)
                start, open_tag, close_tag = min(found)
                segments.append(Segment(text[pos:start]))
                json = None
            body = skip_ws(text, start + len(open_tag))
            if json is None and body < len(text) and text[body] == "{":
                json = JsonScan(body)
            if json is not None:
                obj_end = json.end(text)
            else:
                obj_end = -1 if body < len(text) else None  # -1, not JSON: the block is text once it closes
            if obj_end is None:  # JSON still streaming in
                if final:
                    segments.append(Segment(text[start:]))
                    return ScanResult(segments, len(text))
                return waiting(start, start, _Block(open_tag, close_tag, json and json.shifted(start)))
            close = text.find(close_tag, obj_end if obj_end > 0 else start + len(open_tag))
            call = self.call_from_object(load_json(text[body:obj_end])) if obj_end > 0 else None
            if call is not None:
                if close < 0:
                    result = waiting(start, len(text) if final else obj_end,
                                     _Block(open_tag, close_tag, json.shifted(start)))
                    segments.append(Segment(call=call))
                    return result
                segments.append(Segment(call=call))
                pos = close + len(close_tag)
                continue
            if close < 0:  # not a call: text, once the block ends
                if final:
                    segments.append(Segment(text[start:]))
                    return ScanResult(segments, len(text))
                return waiting(start, start, _Block(open_tag, close_tag, None))
            segments.append(Segment(text[start:close + len(close_tag)]))
            pos = close + len(close_tag)
