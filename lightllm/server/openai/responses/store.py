"""Stored responses: `previous_response_id` continues a conversation, `GET/DELETE /v1/responses/{id}`."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fastapi import Request

STORE_MAX_RESPONSES = 1000  # stored responses kept for previous_response_id, least recently used out first
STORE_MAX_BYTES = 256 << 20  # and at most this much conversation text (each response counts its whole history)


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
