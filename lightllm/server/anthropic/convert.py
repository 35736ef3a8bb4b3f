"""Anthropic Messages ⇄ chat completions: the request becomes a ChatCompletionRequest (run by prepare_chat);
the parsed output becomes Anthropic content blocks and a stop reason."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from lightllm.server.anthropic.protocol import (CountTokensRequest, ImageBlock, MessagesRequest, TextBlock,
                                                ToolChoiceTool, ToolResultBlock, ToolUseBlock)
from lightllm.server.errors import APIError
from lightllm.server.openai.chat_output import ParsedMessage
from lightllm.server.openai.protocol import ChatCompletionRequest


def _messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    """Anthropic turns → chat messages: an assistant turn's tool_use blocks become its tool_calls (the block
    id is the call id); a user turn's tool_result blocks become `tool` messages, its text one user message."""
    out: list[dict[str, Any]] = []
    system = req.system_text()
    if system is not None:
        out.append({"role": "system", "content": system})
    for msg in req.messages:
        if isinstance(msg.content, str):
            out.append({"role": msg.role, "content": msg.content})
            continue
        if msg.role == "assistant":
            text = "".join(b.text for b in msg.content if isinstance(b, TextBlock))
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
                     for b in msg.content if isinstance(b, ToolUseBlock)]
            out.append({"role": "assistant", "content": text or None, "tool_calls": calls or None})
            continue
        parts: list[dict[str, Any]] = []  # chat content parts of the user text (and images) so far
        for block in msg.content:
            if isinstance(block, TextBlock):
                parts.append({"type": "text", "text": block.text})
            elif isinstance(block, ImageBlock):
                parts.append({"type": "image_url", "image_url": {"url": block.url()}})
            elif isinstance(block, ToolResultBlock):
                if parts:  # text written before a result stays before it
                    out.append({"role": "user", "content": _user_content(parts)})
                    parts = []
                content = block.text()
                out.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "content": f"Error: {content}" if block.is_error else content})
        if parts or not any(isinstance(b, ToolResultBlock) for b in msg.content):
            out.append({"role": "user", "content": _user_content(parts)})
    return out


def _user_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text only: one string (as before images); with images, the parts in order."""
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _tool_fields(req: CountTokensRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if req.tools:  # an empty list is no tools, as it is for Anthropic
        fields["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                             "parameters": t.input_schema}} for t in req.tools]
    choice = req.tool_choice
    if choice is not None and (req.tools or choice.type in ("any", "tool")):  # auto/none without tools: no-ops
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}} \
            if isinstance(choice, ToolChoiceTool) else {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        fields["parallel_tool_calls"] = not getattr(choice, "disable_parallel_tool_use", False)
    return fields


def to_chat_request(req: CountTokensRequest) -> ChatCompletionRequest:
    """The equivalent chat completion request (sampling fields too, for a MessagesRequest)."""
    messages = _messages(req)
    fields: dict[str, Any] = {"model": req.model, "messages": messages, **_tool_fields(req)}
    last = messages[-1]
    if last["role"] == "assistant" and last["content"] and not last.get("tool_calls"):
        # A final assistant turn is a prefill: the reply continues it (and leaves it out, as Anthropic does).
        fields.update(add_generation_prompt=False, continue_final_message=True)
    if isinstance(req, MessagesRequest):
        fields.update(max_tokens=req.max_tokens, stop=req.stop_sequences, stream=req.stream,
                      temperature=req.temperature, top_p=req.top_p,
                      top_k=-1 if req.top_k is None else req.top_k)
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:  # checks the OpenAI model makes beyond ours
        first = exc.errors()[0]
        raise APIError(400, f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


def stop_reason(finish_reason: str | None, stop_string: str | None, made_calls: bool) -> str:
    if finish_reason == "length":
        return "max_tokens"
    if made_calls:
        return "tool_use"
    return "stop_sequence" if stop_string is not None else "end_turn"


def thinking_block(text: str) -> dict[str, Any]:
    # No signature: nothing here verifies thinking blocks sent back, so it is empty.
    return {"type": "thinking", "thinking": text, "signature": ""}


def tool_use_block(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": json.loads(arguments) if arguments else {}}


def content_blocks(parsed: ParsedMessage, with_thinking: bool) -> list[dict[str, Any]]:
    """thinking (only with a reasoning parser), then text, then one tool_use block per call."""
    blocks: list[dict[str, Any]] = []
    if with_thinking and parsed.reasoning:
        blocks.append(thinking_block(parsed.reasoning))
    if parsed.content:
        blocks.append({"type": "text", "text": parsed.content})
    for call in parsed.tool_calls:
        blocks.append(tool_use_block(call["id"], call["function"]["name"], call["function"]["arguments"]))
    return blocks


def message(msg_id: str, model: str, content: list[dict[str, Any]], reason: str | None, stop_sequence: str | None,
            input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}
