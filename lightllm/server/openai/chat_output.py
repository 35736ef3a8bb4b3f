"""A chat completion's output → OpenAI message fields: reasoning first, then tool calls in the answer.

The reasoning detector splits the raw output; the tool detector sees only the answer part. A call
written inside the reasoning block ends it where the format's peers say so (see reasoning/base.py): the
answer then starts at the call's marker. Streaming chains the two re-scan-and-diff parsers, so the
streamed `reasoning_content`, `content` and `tool_calls` reassemble to the non-streamed message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from lightllm.server.function_call import ToolContext
from lightllm.server.function_call.base import ToolCallDetector, ToolStreamParser
from lightllm.server.generation import GenerationChunk
from lightllm.server.reasoning.base import ReasoningDetector, ReasoningStreamParser


@dataclass
class ParsedMessage:
    content: str | None
    reasoning: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ChatOutputParser:
    """How one request's output is read: `reasoning` is already adapted to the request's prompt."""

    reasoning: ReasoningDetector | None
    tools: ToolContext | None

    def __post_init__(self) -> None:
        # A free-running tool parser (tool_choice auto) also decides where a call ends the reasoning block.
        if self.reasoning is not None and self.parses_tools and self.tools.mode == "auto":
            self.reasoning = self.reasoning.with_tool_calls(partial(_starts_call, self.tools.detector))

    @property
    def parses_tools(self) -> bool:
        return self.tools is not None and self.tools.parses

    @property
    def needs_special_tokens(self) -> bool:
        return (self.parses_tools and self.tools.detector.needs_special_tokens) or \
            (self.reasoning is not None and self.reasoning.needs_special_tokens)

    def parse(self, text: str) -> ParsedMessage:
        reasoning = None
        if self.reasoning is not None:
            split = self.reasoning.split(text, final=True)
            reasoning, text = split.reasoning or None, split.content
        if not self.parses_tools:
            return ParsedMessage(text if text or reasoning is None else None, reasoning)
        content, calls = self.tools.parse(text)
        if not calls:
            return ParsedMessage(text if text or reasoning is None else None, reasoning)
        return ParsedMessage(content or None, reasoning, calls)

    def stream(self) -> "ChatStreamParser":
        return ChatStreamParser(self)


def _starts_call(detector: ToolCallDetector, text: str, final: bool) -> bool | None:
    """Whether a complete call opens `text` (None: it may, once more text arrives)."""
    for seg in detector.scan(text, final).segments:
        if seg.call is not None:
            return seg.call.complete
        if seg.text:
            return False
    return False if final else None


class ChatStreamParser:
    """Text deltas in, OpenAI `delta` dicts out (`reasoning_content`, `content` or `tool_calls`)."""

    def __init__(self, parser: ChatOutputParser):
        self.reasoning = ReasoningStreamParser(parser.reasoning) if parser.reasoning is not None else None
        self.tools: ToolStreamParser | None = parser.tools.stream_parser() if parser.parses_tools else None
        self.made_calls = False

    def feed(self, delta: str) -> list[dict[str, Any]]:
        return self._route(*(self.reasoning.feed(delta) if self.reasoning else ("", delta)), final=False)

    def finish(self) -> list[dict[str, Any]]:
        return self._route(*(self.reasoning.finish() if self.reasoning else ("", "")), final=True)

    def on_chunk(self, chunk: GenerationChunk) -> list[dict[str, Any]]:
        """The deltas of one generation chunk: its new text, and the held-back rest when it is the last."""
        deltas = self.feed(chunk.text) if chunk.text else []
        return deltas + self.finish() if chunk.finished else deltas

    def _route(self, reasoning: str, answer: str, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = [{"reasoning_content": reasoning}] if reasoning else []
        if self.tools is None:
            if answer:
                deltas.append({"content": answer})
            return deltas
        tool_deltas = self.tools.feed(answer) if answer else []
        if final:
            tool_deltas += self.tools.finish()
        self.made_calls |= any("tool_calls" in d for d in tool_deltas)
        return deltas + tool_deltas
