"""Streaming: the chat stream parser's deltas → the typed SSE events the SDK's `responses.stream` reads."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from lightllm.server.errors import stream_error_event
from lightllm.server.generation import GenerationChunk
from lightllm.server.openai.chat import PreparedChat
from lightllm.server.ids import new_id
from lightllm.server.openai.responses.objects import call_item, finished_body, message_item, reasoning_item


class ResponseEvents:
    """Chat stream deltas (`reasoning_content`, `content`, `tool_calls`) → Responses SSE events. One item
    receives deltas at a time: text of another kind, or a new tool call index, closes it and opens the next."""

    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls
        self.sequence = 0
        self.items: list[dict[str, Any]] = []
        self.open: int | None = None  # index of the item receiving deltas
        self.pieces: list[str] = []  # the open item's text or arguments so far, joined when it closes
        self.calls: dict[int, int] = {}  # chat tool-call index → output index of its function_call item

    def event(self, kind: str, **fields: Any) -> str:
        """One SSE event; its data is serialised now, so later changes to the items do not show in it."""
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    def error(self, exc: BaseException, response_id: str) -> str:
        err = stream_error_event(exc, response_id)["error"]
        return self.event("error", code=err.get("code") or err.get("type"), message=err["message"],
                          param=err.get("param"))

    def delta(self, delta: dict[str, Any]) -> list[str]:
        events: list[str] = []
        if delta.get("reasoning_content"):
            events += self._text("reasoning", delta["reasoning_content"])
        if delta.get("content"):
            events += self._text("message", delta["content"])
        for call in delta.get("tool_calls") or []:
            if self.max_calls is None or call["index"] < self.max_calls:
                events += self._call(call)
        return events

    def close(self, status: str = "completed") -> list[str]:
        """Close the open item: its `.done` events, then `response.output_item.done` with the whole item."""
        index, self.open = self.open, None
        if index is None:
            return []
        item = self.items[index]
        text, self.pieces = "".join(self.pieces), []  # once per item: a delta costs no copy of what came before
        if item["type"] == "function_call":
            item["arguments"] = text
        else:
            item["content"][0]["text"] = text
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "function_call":
            item["status"] = status
            events = [self.event("response.function_call_arguments.done", arguments=item["arguments"], **where)]
        else:
            part = item["content"][0]
            if item["type"] == "message":
                item["status"] = status
                done = self.event("response.output_text.done", content_index=0, text=part["text"], logprobs=[], **where)
            else:
                done = self.event("response.reasoning_text.done", content_index=0, text=part["text"], **where)
            events = [done, self.event("response.content_part.done", content_index=0, part=part, **where)]
        return events + [self.event("response.output_item.done", output_index=index, item=item)]

    def _add(self, item: dict[str, Any]) -> list[str]:
        events = self.close()
        self.items.append(item)
        index = self.open = len(self.items) - 1
        if item["type"] == "function_call":
            return events + [self.event("response.output_item.added", output_index=index, item=item)]
        return events + [self.event("response.output_item.added", output_index=index, item={**item, "content": []}),
                         self.event("response.content_part.added", item_id=item["id"], output_index=index,
                                    content_index=0, part=item["content"][0])]

    def _text(self, kind: str, text: str) -> list[str]:
        events: list[str] = []
        if self.open is None or self.items[self.open]["type"] != kind:
            item = (message_item(new_id("msg_"), "", "in_progress") if kind == "message"
                    else reasoning_item(new_id("rs_"), ""))
            events += self._add(item)
        item = self.items[self.open]
        self.pieces.append(text)
        where = {"item_id": item["id"], "output_index": self.open, "content_index": 0}
        if kind == "message":
            return events + [self.event("response.output_text.delta", delta=text, logprobs=[], **where)]
        return events + [self.event("response.reasoning_text.delta", delta=text, **where)]

    def _call(self, call: dict[str, Any]) -> list[str]:
        events: list[str] = []
        fn = call.get("function") or {}
        if call["index"] not in self.calls:
            events += self._add(call_item(new_id("fc_"), call.get("id") or new_id("call_"), fn.get("name") or "", "",
                                           "in_progress"))
            self.calls[call["index"]] = self.open
        index = self.calls[call["index"]]
        item = self.items[index]
        arguments = fn.get("arguments") or ""
        if arguments:  # calls stream in order: the open (last) call grows
            if index == self.open:
                self.pieces.append(arguments)
            else:  # an earlier, closed call (not sent by our parsers): its item holds its text
                item["arguments"] += arguments
            events.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                     output_index=index, delta=arguments))
        return events


async def response_events(prepared: PreparedChat, base: dict[str, Any],
                          on_done: Any = None) -> AsyncIterator[str]:
    """The SSE events of one streamed response; `on_done(body)` receives the finished response object."""
    events = ResponseEvents(base.get("max_tool_calls"))
    stream = prepared.streams[0]
    yield events.event("response.created", response=base)
    yield events.event("response.in_progress", response=base)
    parser = prepared.output.stream()
    last: GenerationChunk | None = None
    try:
        async for chunk in stream:
            last = chunk
            for delta in parser.on_chunk(chunk):
                for event in events.delta(delta):
                    yield event
        finish_reason = last.finish_reason if last else None
        for event in events.close("incomplete" if finish_reason == "length" else "completed"):
            yield event
        body = finished_body(base, events.items, finish_reason, len(prepared.prompt_ids), last)
        if on_done is not None:
            on_done(body)
        yield events.event("response.incomplete" if body["status"] == "incomplete" else "response.completed",
                           response=body)
    except Exception as exc:  # the stream has begun: the error travels as its last event
        yield events.error(exc, base["id"])
    finally:
        await stream.aclose()
