"""POST /v1/responses (OpenAI's Responses API), plain and streamed, on top of the chat path.

A request is translated into a ChatCompletionRequest (input items → messages, flat function tools →
chat tools, `text.format` → response_format, `reasoning.effort` → reasoning_effort), prepared by
`prepare_chat`, and its output read back as Responses output items: a `reasoning` item, a `message`
item, one `function_call` item per call. Streams translate the chat stream parser's deltas into the
typed events the SDK's `responses.stream` accumulates. `store` keeps the last responses in memory so
that `previous_response_id` continues a conversation.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from lightllm.server.errors import APIError, stream_error_event
from lightllm.server.generation import GenerationChunk
from lightllm.server.openai.chat import PreparedChat, prepare_chat
from lightllm.server.openai.protocol import ChatCompletionRequest
from lightllm.server.openai.responses_protocol import (FunctionCallItem, FunctionCallOutputItem, FunctionTool,
                                                       InputMessage, ReasoningItem, ResponsesRequest)
from lightllm.server.openapi import STREAMING_OK
from lightllm.server.state import ServerState, collect_all, until_disconnect

router = APIRouter()

STORE_MAX_RESPONSES = 1000  # stored responses kept for previous_response_id, least recently used out first
STORE_MAX_BYTES = 256 << 20  # and at most this much conversation text (each response counts its whole history)

_ITEM_MODELS: dict[str, type[BaseModel]] = {"message": InputMessage, "function_call": FunctionCallItem,
                                            "function_call_output": FunctionCallOutputItem,
                                            "reasoning": ReasoningItem}
# Chat-side parameter names → the Responses request's, for errors raised by the chat path.
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
           "reasoning_effort": "reasoning.effort", "response_format": "text.format"}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ----------------------------------------------------------------------------------------------------------
# The store: previous_response_id continues a conversation


@dataclass
class StoredResponse:
    items: list[dict[str, Any]]  # the conversation's input items, earlier turns included (no instructions)
    body: dict[str, Any]  # the response object (its output items follow `items` in the conversation)
    size: int


class ResponseStore:
    """Stored responses in memory, least recently used evicted first, bounded in count and in bytes."""

    def __init__(self, max_responses: int = STORE_MAX_RESPONSES, max_bytes: int = STORE_MAX_BYTES):
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def put(self, items: list[dict[str, Any]], body: dict[str, Any]) -> None:
        size = len(json.dumps(items, ensure_ascii=False)) + len(json.dumps(body["output"], ensure_ascii=False))
        if size > self.max_bytes:
            return
        self.delete(body["id"])
        self._entries[body["id"]] = StoredResponse(items, body, size)
        self.bytes += size
        while len(self._entries) > self.max_responses or self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.size

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry.size
        return entry is not None


def response_store(request: Request) -> ResponseStore:
    app_state = request.app.state
    store = getattr(app_state, "responses_store", None)
    if store is None:
        store = app_state.responses_store = ResponseStore()
    return store


# ----------------------------------------------------------------------------------------------------------
# Request translation


def _validate(model: type[BaseModel], value: Any, param: str) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise APIError(400, f"{param}{'.' + where if where else ''}: {first.get('msg', 'invalid value')}",
                       param=param, code="invalid_value") from None


def _part_text(part: Any, param: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
        return part["text"]
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return part["refusal"]
    if kind in ("input_text", "output_text", "text", "refusal"):
        raise APIError(400, f"{param}: a {kind} part needs a string 'text'", param=param)
    raise APIError(400, f"content part type {kind!r} is not supported: this server takes text parts only "
                        "(input_text, output_text)", param=f"{param}.type", code="unsupported_value")


def _content_text(content: str | list[Any], param: str) -> str:
    if isinstance(content, str):
        return content
    return "".join(_part_text(part, f"{param}[{i}]") for i, part in enumerate(content))


def input_items(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's own input as a list of items (a string is one user message)."""
    if isinstance(req.input, str):
        return [{"type": "message", "role": "user", "content": req.input}]
    return list(req.input)


def to_messages(items: list[dict[str, Any]], instructions: str | None) -> list[dict[str, Any]]:
    """Input items → chat messages. Consecutive function calls (and the assistant text right before them)
    form one assistant message with `tool_calls`; a function_call_output is a `tool` message."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for i, raw in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(raw, dict):
            raise APIError(400, f"{param}: an input item must be an object", param=param)
        kind = raw.get("type") or ("message" if "role" in raw else None)
        model = _ITEM_MODELS.get(kind) if isinstance(kind, str) else None
        if model is None:
            raise APIError(400, f"input item type {kind!r} is not supported (supported: message, function_call, "
                                "function_call_output, reasoning)", param=f"{param}.type", code="unsupported_value")
        item = _validate(model, {**raw, "type": kind}, param)
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": _content_text(item.content, f"{param}.content")})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else _content_text(item.output, f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
        # reasoning items: not rendered (templates drop past turns' reasoning as well)
    return messages


def _tools(req: ResponsesRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """→ (chat tools, the tools as the response echoes them)."""
    chat_tools, echo = [], []
    for i, raw in enumerate(req.tools or []):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind != "function":
            raise APIError(400, f"tool type {kind!r} is not supported: only 'function' tools are (this server "
                                "runs no built-in tools)", param=f"tools[{i}].type", code="unsupported_value")
        tool = _validate(FunctionTool, raw, f"tools[{i}]")
        strict = True if tool.strict is None else tool.strict  # the Responses API's default
        chat_tools.append({"type": "function", "function": {
            "name": tool.name, "description": tool.description, "parameters": tool.parameters, "strict": strict}})
        echo.append({"type": "function", "name": tool.name, "description": tool.description,
                     "parameters": tool.parameters, "strict": strict})
    return chat_tools, echo


def _tool_choice(req: ResponsesRequest, has_tools: bool) -> Any:
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise APIError(400, f"tool_choice type {choice.get('type')!r} is not supported: use 'auto', 'required', "
                                "'none' or {'type': 'function', 'name': ...}", param="tool_choice",
                           code="unsupported_value")
        if not isinstance(choice.get("name"), str):
            raise APIError(400, "tool_choice: a function choice needs a 'name'", param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    if not has_tools and choice in ("auto", "none"):
        return None  # no tools: nothing to choose (the chat path would refuse a choice without tools)
    return choice


def _response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise APIError(400, "text.format json_schema needs a `schema`", param="text.format")
    return {"type": "json_schema", "json_schema": {"name": fmt.name or "response", "schema": fmt.schema_,
                                                   "strict": fmt.strict, "description": fmt.description}}


def to_chat_request(req: ResponsesRequest, items: list[dict[str, Any]]) -> ChatCompletionRequest:
    if req.background:
        raise APIError(400, "background responses are not supported", param="background", code="unsupported_value")
    tools, _ = _tools(req)
    choice = _tool_choice(req, bool(tools))
    response_format = _response_format(req)
    if response_format is not None and (choice == "required" or isinstance(choice, dict)):
        raise APIError(400, "use either text.format json or a forced tool_choice, not both", param="text.format")
    body: dict[str, Any] = {
        "model": req.model, "messages": to_messages(items, req.instructions), "temperature": req.temperature,
        "top_p": req.top_p, "max_completion_tokens": req.max_output_tokens, "tools": tools or None,
        "tool_choice": choice, "parallel_tool_calls": req.parallel_tool_calls and req.max_tool_calls != 1,
        "response_format": response_format,
        "reasoning_effort": req.reasoning.effort if req.reasoning is not None else None, "user": req.user}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        param = _PARAMS.get(loc[0], loc[0]) if loc else None
        raise APIError(400, f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid"),
                       param=param, code="invalid_value") from None


def _prepare(state: ServerState, chat_req: ChatCompletionRequest) -> PreparedChat:
    try:
        return prepare_chat(state, chat_req, rid_prefix="resp")
    except APIError as exc:
        exc.param = _PARAMS.get(exc.param, exc.param)
        raise


# ----------------------------------------------------------------------------------------------------------
# Response objects


def _usage(prompt_tokens: int, output_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


def _base_body(req: ResponsesRequest, state: ServerState, response_id: str, created: int) -> dict[str, Any]:
    """The response object before any output (what `response.created` carries)."""
    _, tools = _tools(req)
    fmt = req.text.format if req.text is not None else None
    text: dict[str, Any] = {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}}
    if req.text is not None and req.text.verbosity is not None:
        text["verbosity"] = req.text.verbosity
    return {
        "id": response_id, "object": "response", "created_at": created, "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None, "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens, "max_tool_calls": req.max_tool_calls,
        "metadata": req.metadata or {}, "model": state.model_name,
        "output": [], "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": req.reasoning.effort if req.reasoning else None,
                      "summary": req.reasoning.summary if req.reasoning else None},
        "store": req.store, "temperature": 1.0 if req.temperature is None else req.temperature, "text": text,
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto", "tools": tools,
        "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled", "usage": None, "user": req.user}


def _finished_body(base: dict[str, Any], output: list[dict[str, Any]], finish_reason: str | None,
                   prompt_tokens: int, last: GenerationChunk | None) -> dict[str, Any]:
    incomplete = finish_reason == "length"
    return {**base, "status": "incomplete" if incomplete else "completed", "completed_at": int(time.time()),
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None, "output": output,
            "usage": _usage(prompt_tokens, last.completion_tokens if last else 0, last.cached_tokens if last else 0)}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


# ----------------------------------------------------------------------------------------------------------
# Routes


@dataclass
class _Turn:
    req: ResponsesRequest
    items: list[dict[str, Any]]  # the whole conversation's input items, for the store
    prepared: PreparedChat
    base: dict[str, Any]


def _start(req: ResponsesRequest, request: Request) -> _Turn:
    state: ServerState = request.app.state.server
    items = input_items(req)
    if req.previous_response_id is not None:
        previous = response_store(request).get(req.previous_response_id)
        if previous is None:
            raise APIError(400, f"Previous response with id {req.previous_response_id!r} not found.",
                           param="previous_response_id", code="previous_response_not_found")
        items = previous.items + previous.body["output"] + items
    prepared = _prepare(state, to_chat_request(req, items))
    return _Turn(req, items, prepared, _base_body(req, state, _id("resp"), int(time.time())))


@router.post("/v1/responses", responses=STREAMING_OK)
async def create_response(req: ResponsesRequest, request: Request):
    turn = _start(req, request)
    store = response_store(request) if req.store else None
    if req.stream:
        return StreamingResponse(_stream(turn, store), media_type="text/event-stream")
    (text, chunks), = await until_disconnect(request, collect_all(turn.prepared.streams))
    last = chunks[-1] if chunks else None
    finish_reason = last.finish_reason if last else None
    status = "incomplete" if finish_reason == "length" else "completed"
    parsed = turn.prepared.output.parse(text)
    output = []
    if parsed.reasoning:
        output.append(_reasoning_item(_id("rs"), parsed.reasoning))
    if parsed.content:
        output.append(_message_item(_id("msg"), parsed.content, status))
    for call in parsed.tool_calls[:req.max_tool_calls]:
        output.append(_call_item(_id("fc"), call["id"], call["function"]["name"], call["function"]["arguments"],
                                 "completed"))
    body = _finished_body(turn.base, output, finish_reason, len(turn.prepared.prompt_ids), last)
    if store is not None:
        store.put(turn.items, body)
    return body


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    entry = response_store(request).get(response_id)
    if entry is None:
        raise APIError(404, f"Response with id {response_id!r} not found.", param="response_id")
    return entry.body


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    if not response_store(request).delete(response_id):
        raise APIError(404, f"Response with id {response_id!r} not found.", param="response_id")
    return {"id": response_id, "object": "response.deleted", "deleted": True}


# ----------------------------------------------------------------------------------------------------------
# Streaming


class ResponseEvents:
    """Chat stream deltas (`reasoning_content`, `content`, `tool_calls`) → Responses SSE events. One item
    receives deltas at a time: text of another kind, or a new tool call index, closes it and opens the next."""

    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls
        self.sequence = 0
        self.items: list[dict[str, Any]] = []
        self.open: int | None = None  # index of the item receiving deltas
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
            item = _message_item(_id("msg"), "", "in_progress") if kind == "message" else _reasoning_item(_id("rs"), "")
            events += self._add(item)
        item = self.items[self.open]
        item["content"][0]["text"] += text
        where = {"item_id": item["id"], "output_index": self.open, "content_index": 0}
        if kind == "message":
            return events + [self.event("response.output_text.delta", delta=text, logprobs=[], **where)]
        return events + [self.event("response.reasoning_text.delta", delta=text, **where)]

    def _call(self, call: dict[str, Any]) -> list[str]:
        events: list[str] = []
        fn = call.get("function") or {}
        if call["index"] not in self.calls:
            events += self._add(_call_item(_id("fc"), call.get("id") or _id("call"), fn.get("name") or "", "",
                                           "in_progress"))
            self.calls[call["index"]] = self.open
        index = self.calls[call["index"]]
        item = self.items[index]
        arguments = fn.get("arguments") or ""
        if arguments:  # calls stream in order: only the open (last) call grows
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
            deltas = parser.feed(chunk.text) if chunk.text else []
            if chunk.finished:
                deltas += parser.finish()
            for delta in deltas:
                for event in events.delta(delta):
                    yield event
        finish_reason = last.finish_reason if last else None
        for event in events.close("incomplete" if finish_reason == "length" else "completed"):
            yield event
        body = _finished_body(base, events.items, finish_reason, len(prepared.prompt_ids), last)
        if on_done is not None:
            on_done(body)
        yield events.event("response.incomplete" if body["status"] == "incomplete" else "response.completed",
                           response=body)
    except Exception as exc:  # the stream has begun: the error travels as its last event
        yield events.error(exc, base["id"])
    finally:
        await stream.aclose()


def _stream(turn: _Turn, store: ResponseStore | None) -> AsyncIterator[str]:
    on_done = (lambda body: store.put(turn.items, body)) if store is not None else None
    return response_events(turn.prepared, turn.base, on_done)
