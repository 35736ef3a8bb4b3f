"""Parsers for grammar-constrained tool output (tool_choice "required" or a named function).

The grammar guarantees the shape, so these are `trusted`: a call is announced as soon as its name is
known and its raw argument text streams as it grows (and is passed through verbatim, as vLLM does).
- required: `[{"name": "<tool>", "parameters": {...}}, ...]`
- named: the chosen function's arguments object alone.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from lightllm.server.function_call.base import ParsedCall, ScanResult, Segment, ToolCallDetector, match_json, skip_ws

_ITEM_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"parameters"\s*:\s*')


def _partial_call(text: str, name: str, start: int) -> tuple[ParsedCall, int | None]:
    """The call whose arguments object starts at `start`; the end index when it is complete."""
    if start >= len(text) or text[start] != "{":
        return ParsedCall(name, "", complete=False), None
    end = match_json(text, start)
    if end is None:
        return ParsedCall(name, text[start:], complete=False), None
    return ParsedCall(name, text[start:end]), end


def _opening(text: str, opener: str, final: bool) -> tuple[int, ScanResult | None]:
    """Index of the expected opening bracket, or the result to return when the output is still empty or
    does not open with it (then it is plain text)."""
    i = skip_ws(text, 0)
    if i >= len(text):
        return i, ScanResult([Segment(text)] if final else [], len(text) if final else 0)
    if text[i] != opener:
        return i, ScanResult([Segment(text)], len(text))
    return i, None


def _call_key(call: ParsedCall) -> str:
    return call.name + "\0" + json.dumps(json.loads(call.arguments), sort_keys=True, ensure_ascii=False)


class RequiredDetector(ToolCallDetector):
    """The required-mode array. Its first call streams as it grows; later calls are decided only once
    complete, so a call that repeats an earlier one (same name and arguments: a weak model looping at
    temperature > 0) is dropped before any of it is sent, and the scan reports `stop` so generation ends
    there instead of running to max_tokens."""

    name = "required"

    def scan(self, text: str, final: bool) -> ScanResult:
        i, early = _opening(text, "[", final)
        if early is not None:
            return early
        segments: list[Segment] = []
        seen: set[str] = set()
        i += 1
        while True:
            i = skip_ws(text, i)
            while i < len(text) and text[i] in ",}":
                i = skip_ws(text, i + 1)
            if i >= len(text) or text[i] == "]":
                break
            head = _ITEM_HEAD.match(text, i)
            if head is None:
                break  # the item's head is still arriving
            name = json.loads(f'"{head.group(1)}"')
            call, end = _partial_call(text, name, head.end())
            if end is None:
                if not segments:
                    segments.append(Segment(call=call))
                break
            key = _call_key(call)
            if key in seen:
                return ScanResult(segments, len(text), stop=True)
            seen.add(key)
            segments.append(Segment(call=call))
            i = end
        if final and not segments:
            return ScanResult([Segment(text)], len(text))
        return ScanResult(segments, len(text) if final else i)


class NamedDetector(ToolCallDetector):
    name = "named"

    def __init__(self, tool_names: set[str], function_name: str, schemas: dict[str, dict[str, Any]] | None = None,
                 id_factory: Callable[[], str] | None = None):
        super().__init__(tool_names, schemas, id_factory)
        self.function_name = function_name

    def scan(self, text: str, final: bool) -> ScanResult:
        i, early = _opening(text, "{", final)
        if early is not None:
            return early
        call, end = _partial_call(text, self.function_name, i)
        return ScanResult([Segment(call=call)], len(text) if final or end is None else end)
