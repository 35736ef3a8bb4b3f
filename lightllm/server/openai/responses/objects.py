"""The response object and its output items (`message`, `reasoning`, `function_call`)."""

from __future__ import annotations

import time
from typing import Any

from lightllm.server.generation import GenerationChunk
from lightllm.server.openai.responses.convert import tools_of
from lightllm.server.openai.responses.protocol import ResponsesRequest
from lightllm.server.state import ServerState


def usage_body(prompt_tokens: int, output_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


def base_body(req: ResponsesRequest, state: ServerState, response_id: str, created: int) -> dict[str, Any]:
    """The response object before any output (what `response.created` carries)."""
    _, tools = tools_of(req)
    fmt = req.text.format if req.text is not None else None
    text: dict[str, Any] = {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}}
    if req.text is not None and req.text.verbosity is not None:
        text["verbosity"] = req.text.verbosity
    return {
        "id": response_id, "object": "response", "created_at": created, "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None, "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens, "max_tool_calls": req.max_tool_calls,
        "metadata": req.metadata or {}, "model": state.served_name(req.model),
        "output": [], "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": req.reasoning.effort if req.reasoning else None,
                      "summary": req.reasoning.summary if req.reasoning else None},
        "store": req.store, "temperature": 1.0 if req.temperature is None else req.temperature, "text": text,
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto", "tools": tools,
        "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled", "usage": None, "user": req.user}


def finished_body(base: dict[str, Any], output: list[dict[str, Any]], finish_reason: str | None,
                   prompt_tokens: int, last: GenerationChunk | None) -> dict[str, Any]:
    incomplete = finish_reason == "length"
    return {**base, "status": "incomplete" if incomplete else "completed", "completed_at": int(time.time()),
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None, "output": output,
            "usage": usage_body(prompt_tokens, last.completion_tokens if last else 0, last.cached_tokens if last else 0)}


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}
