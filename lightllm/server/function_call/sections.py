"""Scanning shared by the formats that wrap calls in begin/end markers inside a calls section
(DeepSeek-V3/V3.1, Kimi-K2): `SECTION_BEGIN (CALL_BEGIN body CALL_END)* SECTION_END`.

Text before the section is content. A call is decided when its end marker arrives (or, at the end of
the output, when its body is complete). A closed call the format cannot parse, or that names an unknown
tool, is skipped and the calls after it still count (as vLLM's and LightLLM's parsers do); a section
without one valid call, or one broken by text that is no call, leaves the whole output text.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightllm.server.function_call.base import Checkpoint, ParsedCall, ScanResult, Segment, ToolCallDetector, skip_ws


@dataclass(frozen=True)
class SectionMarkers:
    section_begin: str
    call_begin: str
    call_end: str
    section_end: str


class SectionDetector(ToolCallDetector):
    """Subclasses set `section` and implement `parse_body(body, final_body)`."""

    section: SectionMarkers

    @property
    def markers(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.section.section_begin,)

    def parse_body(self, body: str, index: int) -> ParsedCall | None:
        """The call written between CALL_BEGIN and CALL_END (index: its position in the section)."""
        raise NotImplementedError

    def scan(self, text: str, final: bool) -> ScanResult:
        begin = text.find(self.section.section_begin)
        if begin < 0:
            seg, decided = self.text_with_holdback(text, 0, final)
            # nothing here depends on where the output starts: a stream resumes at the held-back tail
            return ScanResult([seg], decided, checkpoint=None if final else Checkpoint(decided, 1, None))
        result = self._section(text, begin, final)
        if not final:  # the text before the section is content for good: a stream resumes at the section
            result.checkpoint = Checkpoint(begin, 1, None)
        return result

    def _section(self, text: str, begin: int, final: bool) -> ScanResult:
        m = self.section
        segments = [Segment(text[:begin])]
        pos = begin + len(m.section_begin)
        index = 0
        while True:
            i = skip_ws(text, pos)
            if text.startswith(m.section_end, i) or (i >= len(text) and final):
                if not any(s.call for s in segments):
                    return self._rest_as_text(text, segments, begin, final)
                return ScanResult(segments, len(text) if final else i + len(m.section_end))
            if i >= len(text):
                return ScanResult(segments, pos)
            if not text.startswith(m.call_begin, i):
                if not final and any(marker.startswith(text[i:]) for marker in (m.call_begin, m.section_end)):
                    return ScanResult(segments, pos)  # a marker is still arriving
                return self._rest_as_text(text, segments, begin, final)
            body_start = i + len(m.call_begin)
            end = text.find(m.call_end, body_start)
            if end < 0:
                if not final:
                    return ScanResult(segments, pos)
                call = self.parse_body(text[body_start:], index)  # cut by EOS after a complete body
                if call is None:
                    return self._rest_as_text(text, segments, begin, final)
                segments.append(Segment(call=call))
                return ScanResult(segments, len(text))
            call = self.parse_body(text[body_start:end], index)
            if call is not None:  # a complete call that does not parse is skipped; the section goes on
                segments.append(Segment(call=call))
            index += 1
            pos = end + len(m.call_end)

    @staticmethod
    def _rest_as_text(text: str, segments: list[Segment], begin: int, final: bool) -> ScanResult:
        # Content is the text before the first call, so once a call was parsed the rest is dropped;
        # with none parsed the whole output is text (decided only at the end: a later call may follow).
        if any(s.call for s in segments):
            return ScanResult(segments, len(text))
        if not final:
            return ScanResult(segments, begin)
        return ScanResult([Segment(text)], len(text))


@dataclass(frozen=True)
class _OpenBlock:
    """A block opens at the checkpoint; its closing tag cannot start before `search_from`."""

    open_tag: str
    close_tag: str
    search_from: int


class BlockDetector(ToolCallDetector):
    """Formats that write each call as one tagged block (GLM `<tool_call>NAME<arg_key>…</tool_call>`,
    qwen3_coder `<tool_call><function=NAME>…</function></tool_call>`). Subclasses set `blocks` (pairs of
    opening and closing tags) and implement `parse_block(block)`, which gets the block with its tags."""

    blocks: tuple[tuple[str, str], ...]

    @property
    def markers(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(open_tag for open_tag, _ in self.blocks)

    def parse_block(self, block: str) -> ParsedCall | None:
        raise NotImplementedError

    def scan(self, text: str, final: bool) -> ScanResult:
        return self.scan_from(text, final, None)

    def scan_from(self, text: str, final: bool, state: object) -> ScanResult:
        """Streams resume in plain text at the held-back tail, and at the start of a block still arriving
        (`_OpenBlock`: where the search for its closing tag goes on)."""
        segments: list[Segment] = []
        pos = 0
        block = state if isinstance(state, _OpenBlock) else None
        while True:
            if block is not None:
                start, open_tag, close_tag, search_from = 0, block.open_tag, block.close_tag, block.search_from
                block = None
            else:
                found = [(text.find(open_tag, pos), open_tag, close_tag) for open_tag, close_tag in self.blocks]
                found = [f for f in found if f[0] >= 0]
                if not found:
                    seg, decided = self.text_with_holdback(text, pos, final)
                    segments.append(seg)
                    checkpoint = None if final else Checkpoint(decided, len(segments), None)
                    return ScanResult(segments, decided, checkpoint=checkpoint)
                start, open_tag, close_tag = min(found)
                segments.append(Segment(text[pos:start]))
                search_from = len(open_tag)
            close = text.find(close_tag, start + search_from)
            if close < 0:
                if not final:
                    # a closing tag can only end beyond the text seen so far
                    resume = _OpenBlock(open_tag, close_tag, max(search_from, len(text) - start - len(close_tag) + 1))
                    return ScanResult(segments, start, checkpoint=Checkpoint(start, len(segments), resume))
                call = self.parse_block(text[start:])  # cut by the end of the output
                segments.append(Segment(call=call) if call is not None else Segment(text[start:]))
                return ScanResult(segments, len(text))
            end = close + len(close_tag)
            call = self.parse_block(text[start:end])
            segments.append(Segment(call=call) if call is not None else Segment(text[start:end]))
            pos = end
