"""mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (pre-v11, any key order) and the v11+
`[TOOL_CALLS]name[ARGS]{...}` / `[TOOL_CALLS]name{...}` forms. Call ids are 9 alphanumerics."""

from __future__ import annotations

import json
import re
import secrets
import string

from lightllm.server.function_call.base import (Checkpoint, ParsedCall, ScanResult, Segment, ToolCallDetector,
                                                load_json, match_json, skip_ws)

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = re.compile(r"\[CALL_ID\][A-Za-z0-9]*")
NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_ID_ALPHABET = string.ascii_letters + string.digits


class MistralDetector(ToolCallDetector):
    name = "mistral"
    markers = (TOOL_CALLS,)

    @staticmethod
    def default_call_id() -> str:
        """Mistral templates need ids of exactly 9 alphanumerics."""
        return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))

    def scan(self, text: str, final: bool) -> ScanResult:
        tag = text.find(TOOL_CALLS)
        if tag < 0:
            seg, decided = self.text_with_holdback(text, 0, final)
            # nothing here depends on where the output starts: a stream resumes at the held-back tail
            return ScanResult([seg], decided, checkpoint=None if final else Checkpoint(decided, 1, None))
        segments = [Segment(text[:tag])]
        body = skip_ws(text, tag + len(TOOL_CALLS))
        if body >= len(text):
            return self._undecided(text, segments, final)
        if text[body] == "[" and not text.startswith(ARGS, body) and not CALL_ID.match(text, body):
            return self._array(text, segments, body, final)
        return self._compact(text, segments, tag, final)

    def _undecided(self, text: str, segments: list[Segment], final: bool) -> ScanResult:
        if final:
            return ScanResult([Segment(text)] if not any(s.call for s in segments) else segments, len(text))
        return ScanResult(segments, 0)

    def _array(self, text: str, segments: list[Segment], body: int, final: bool) -> ScanResult:
        end = match_json(text, body)
        if end is None:
            return self._undecided(text, segments, final)
        items = load_json(text[body:end])
        calls = [self.call_from_object(item) for item in items] if isinstance(items, list) and items else [None]
        if any(c is None for c in calls):
            seg, decided = self.text_with_holdback(text, 0, final)
            return ScanResult([seg], decided)
        return ScanResult(segments + [Segment(call=c) for c in calls], len(text) if final else end)

    def _compact(self, text: str, segments: list[Segment], tag: int, final: bool) -> ScanResult:
        pos = tag
        while text.startswith(TOOL_CALLS, pos):
            i = skip_ws(text, pos + len(TOOL_CALLS))
            name = NAME.match(text, i)
            j = name.end() if name else i
            id_match = CALL_ID.match(text, j)
            if id_match:
                j = id_match.end()
            if text.startswith(ARGS, j):
                j += len(ARGS)
            j = skip_ws(text, j)
            if j >= len(text) or (not final and _partial_marker(text[j:])):
                return self._undecided(text, segments, final)
            end = match_json(text, j) if text[j] == "{" else -1
            if end is None:
                return self._undecided(text, segments, final)
            args = load_json(text[j:end]) if end > 0 else None
            if not name or not self.known(name.group()) or not isinstance(args, dict):
                if any(s.call for s in segments):
                    return ScanResult(segments, len(text) if final else pos)
                seg, decided = self.text_with_holdback(text, 0, final)
                return ScanResult([seg], decided)
            segments.append(Segment(call=ParsedCall(name.group(), _dumps(args))))
            pos = skip_ws(text, end)
        return ScanResult(segments, len(text) if final else pos)


def _partial_marker(tail: str) -> bool:
    """True while an [ARGS] / [CALL_ID] marker may still be arriving."""
    return ARGS.startswith(tail) or "[CALL_ID]".startswith(tail)


def _dumps(args: dict) -> str:
    return json.dumps(args, ensure_ascii=False)
