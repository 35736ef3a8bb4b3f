"""POST /v1/responses (plain and streamed), GET and DELETE /v1/responses/{id}."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from lightllm.server.errors import APIError
from lightllm.server.ids import new_id
from lightllm.server.openai.chat import PreparedChat
from lightllm.server.openai.responses.convert import input_items, prepare, to_chat_request
from lightllm.server.openai.responses.events import response_events
from lightllm.server.openai.responses.objects import (base_body, call_item, finished_body, message_item,
                                                      reasoning_item)
from lightllm.server.openai.responses.protocol import ResponsesRequest
from lightllm.server.openai.responses.store import ResponseStore, response_store
from lightllm.server.openapi import STREAMING_OK
from lightllm.server.state import ServerState, collect_all, until_disconnect

router = APIRouter()


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
    prepared = prepare(state, to_chat_request(req, items))
    return _Turn(req, items, prepared, base_body(req, state, new_id("resp_"), int(time.time())))


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
        output.append(reasoning_item(new_id("rs_"), parsed.reasoning))
    if parsed.content:
        output.append(message_item(new_id("msg_"), parsed.content, status))
    for call in parsed.tool_calls[:req.max_tool_calls]:
        output.append(call_item(new_id("fc_"), call["id"], call["function"]["name"], call["function"]["arguments"],
                                 "completed"))
    body = finished_body(turn.base, output, finish_reason, len(turn.prepared.prompt_ids), last)
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


def _stream(turn: _Turn, store: ResponseStore | None) -> AsyncIterator[str]:
    on_done = (lambda body: store.put(turn.items, body)) if store is not None else None
    return response_events(turn.prepared, turn.base, on_done)
