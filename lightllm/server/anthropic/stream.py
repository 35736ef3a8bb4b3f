"""Anthropic SSE events from the chat stream parser's OpenAI-style deltas.

`reasoning_content` → a thinking block (thinking_delta), `content` → a text block (text_delta), each new
tool call index → a tool_use block whose arguments stream as input_json_delta. A block is closed when the
next one opens or the message ends; block indexes count from 0 in the order blocks open.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from lightllm.server.anthropic.convert import message, stop_reason, thinking_block
from lightllm.server.errors import anthropic_stream_error_event
from lightllm.server.generation import GenerationChunk
from lightllm.server.openai.chat_output import ChatStreamParser


def event(name: str, payload: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


class BlockEvents:
    """Turns deltas into content_block_start / _delta / _stop events."""

    def __init__(self) -> None:
        self.count = 0  # blocks opened so far
        self.open: str | None = None  # "thinking" | "text" | "tool_use" while a block is open
        self.tool_blocks: dict[int, int] = {}  # tool call index → block index

    def _start(self, kind: str, block: dict[str, Any]) -> list[str]:
        events = self.close()
        events.append(event("content_block_start", {"type": "content_block_start", "index": self.count,
                                                    "content_block": block}))
        self.open = kind
        self.count += 1
        return events

    def _delta(self, delta: dict[str, Any], index: int | None = None) -> str:
        return event("content_block_delta", {"type": "content_block_delta",
                                             "index": self.count - 1 if index is None else index, "delta": delta})

    def feed(self, delta: dict[str, Any]) -> list[str]:
        events: list[str] = []
        if delta.get("reasoning_content"):
            if self.open != "thinking":
                events += self._start("thinking", thinking_block(""))
            events.append(self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]}))
        if delta.get("content"):
            if self.open != "text":
                events += self._start("text", {"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls") or []:
            if call["index"] not in self.tool_blocks:
                events += self._start("tool_use", {"type": "tool_use", "id": call["id"],
                                                   "name": call["function"]["name"], "input": {}})
                self.tool_blocks[call["index"]] = self.count - 1
            arguments = call["function"].get("arguments")
            if arguments:
                events.append(self._delta({"type": "input_json_delta", "partial_json": arguments},
                                          self.tool_blocks[call["index"]]))
        return events

    def close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [event("content_block_stop", {"type": "content_block_stop", "index": self.count - 1})]


async def message_events(msg_id: str, model: str, input_tokens: int, stream: AsyncIterator[GenerationChunk],
                         parser: ChatStreamParser) -> AsyncIterator[str]:
    """The whole event stream of one message; an error after it began is one `error` event, then the end."""
    yield event("message_start", {"type": "message_start",
                                  "message": message(msg_id, model, [], None, None, input_tokens, 0)})
    yield event("ping", {"type": "ping"})
    blocks = BlockEvents()
    output_tokens = 0
    finish_reason = stop_string = None
    try:
        async for gen in stream:
            output_tokens = gen.completion_tokens
            if gen.finished:
                finish_reason, stop_string = gen.finish_reason, gen.stop_string
            for delta in parser.on_chunk(gen):
                for text in blocks.feed(delta):
                    yield text
        for text in blocks.close():
            yield text
        reason = stop_reason(finish_reason, stop_string, parser.made_calls)
        yield event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": reason, "stop_sequence": stop_string},
                                      "usage": {"output_tokens": output_tokens}})
        yield event("message_stop", {"type": "message_stop"})
    except Exception as exc:  # the stream has begun: the error travels as its last event
        yield event("error", anthropic_stream_error_event(exc, msg_id))
    finally:
        await stream.aclose()
