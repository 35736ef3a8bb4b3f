"""llama3 (Llama 3.1/3.2 JSON tool calling): `{"name": ..., "parameters": {...}}`, optionally after
`<|python_tag|>`, several separated by `;`. Without the tag the output must start with `{` to be a call."""

from __future__ import annotations

from lightllm.server.function_call.base import (Checkpoint, ScanResult, Segment, ToolCallDetector, load_json,
                                                match_json, skip_ws)

PYTHON_TAG = "<|python_tag|>"
_PLAIN = "plain"  # scan state: past the output's start, which was no call


class Llama3Detector(ToolCallDetector):
    name = "llama3"
    markers = (PYTHON_TAG,)

    def scan(self, text: str, final: bool) -> ScanResult:
        return self.scan_from(text, final, None)

    def scan_from(self, text: str, final: bool, state: object) -> ScanResult:
        """A stream resumes at the held-back tail of plain text (`_PLAIN`: the output did not open with a
        call, so only a python tag can start one)."""
        tag = text.find(PYTHON_TAG)
        lead = skip_ws(text, 0)
        if tag >= 0 and (state is _PLAIN or text[lead:lead + 1] != "{"):
            return self._calls(text, [Segment(text[:tag])], tag + len(PYTHON_TAG), final)
        if state is not _PLAIN:
            if lead < len(text) and text[lead] == "{":
                return self._calls(text, [], lead, final)
            if lead == len(text) and not final:
                return ScanResult([], 0)  # only whitespace so far: a call may still start
        seg, decided = self.text_with_holdback(text, 0, final)
        return ScanResult([seg], decided, checkpoint=None if final else Checkpoint(decided, 1, _PLAIN))

    def _calls(self, text: str, segments: list[Segment], pos: int, final: bool) -> ScanResult:
        while True:
            i = skip_ws(text, pos)
            while i < len(text) and (text[i] == ";" or text.startswith(PYTHON_TAG, i)):
                i = skip_ws(text, i + (1 if text[i] == ";" else len(PYTHON_TAG)))
            if i >= len(text):
                return ScanResult(segments, len(text) if final else pos)
            if text[i] != "{":
                return self._rest_as_text(text, segments, pos, final)
            end = match_json(text, i)
            if end is None:
                if final:
                    return self._rest_as_text(text, segments, pos, True)
                return ScanResult(segments, pos)
            call = self.call_from_object(load_json(text[i:end]))
            if call is None:
                return self._rest_as_text(text, segments, pos, final)
            segments.append(Segment(call=call))
            pos = end

    def _rest_as_text(self, text: str, segments: list[Segment], pos: int, final: bool) -> ScanResult:
        if not any(s.call for s in segments):
            pos = 0  # nothing parsed: the whole output is plain text
            segments = []
        seg, decided = self.text_with_holdback(text, pos, final)
        return ScanResult(segments + [seg], decided)

