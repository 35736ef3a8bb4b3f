"""vLLM's `POST /tokenize` and `POST /detokenize`, and OpenAI's `GET /v1/models` / `/v1/models/{id}`."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field

from lightllm.server.errors import APIError
from lightllm.server.limits import MAX_TOOLS
from lightllm.server.multimodal import encode_with_images
from lightllm.server.openai.chat import render_prompt, request_images
from lightllm.server.openai.protocol import (CONTINUE_FINAL_MESSAGE_RULE, ChatCompletionRequest, ChatMessage, TokenId,
                                             Tool, _Lenient)
from lightllm.server.state import ServerState

router = APIRouter()


class TokenizeRequest(_Lenient):
    """Either `prompt` (text) or `messages` (rendered with the chat template first), as vLLM takes them."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"anyOf": [  # exactly one of them, as the route checks; the chat fields only with messages
            {"required": ["prompt"], "properties": {
                "prompt": {"type": "string"}, "messages": {"type": "null"}, "tools": {"type": "null"},
                "chat_template_kwargs": {"type": "null"}, "add_generation_prompt": {"const": True},
                "continue_final_message": {"const": False}}},
            {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}}]},
        CONTINUE_FINAL_MESSAGE_RULE]})

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)  # as chat completions take them
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # as chat completions take it: the count of a prefilled reply
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (the template has them)
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[TokenId]


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request):
    state: ServerState = request.app.state.server
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of `prompt` and `messages`", param="prompt")
    if req.messages is not None:
        chat = ChatCompletionRequest(messages=req.messages, tools=req.tools,
                                     add_generation_prompt=req.add_generation_prompt,
                                     continue_final_message=req.continue_final_message,
                                     chat_template_kwargs=req.chat_template_kwargs)
        from lightllm.server.function_call import prepare_tool_context

        images, image_text = request_images(state, chat)
        text = render_prompt(state, chat, prepare_tool_context(chat, state), image_text)
        special = bool(req.add_special_tokens)
    else:
        chat_only = {"tools": req.tools is not None, "chat_template_kwargs": req.chat_template_kwargs is not None,
                     "add_generation_prompt": not req.add_generation_prompt,
                     "continue_final_message": req.continue_final_message}
        for field, sent in chat_only.items():
            if sent:
                raise APIError(400, f"{field} applies to `messages` (the chat template), not to a `prompt`",
                               param=field)
        images, text = [], req.prompt
        special = req.add_special_tokens is not False
    # each image's tokens, as chat counts them
    ids, _ = encode_with_images(state, text, images, lambda s: state.tokenizer.encode(s, add_special_tokens=special),
                                "messages")
    return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
            "token_strs": state.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request):
    state: ServerState = request.app.state.server
    vocab = state.engine.info.vocab_size
    bad = [t for t in req.tokens if t < 0 or t >= vocab]
    if bad:
        raise APIError(400, f"token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}", param="tokens")
    return {"prompt": state.tokenizer.decode(req.tokens)}


def _model_card(state: ServerState, adapter: str | None = None) -> dict[str, Any]:
    """The base model's card, or a LoRA adapter's (vLLM's shape: root its folder, parent the base model)."""
    if adapter is not None:
        return {"id": adapter, "object": "model", "created": int(time.time()), "owned_by": "lightllm",
                "root": state.lora_adapters[adapter], "parent": state.model_name, "max_model_len": state.max_model_len}
    return {"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "lightllm",
            "root": state.model_name, "parent": None, "max_model_len": state.max_model_len}


@router.get("/v1/models")
async def list_models(request: Request):
    state: ServerState = request.app.state.server
    return {"object": "list", "data": [_model_card(state)] + [_model_card(state, name) for name in state.lora_adapters]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request):
    state: ServerState = request.app.state.server
    if model_id != state.model_name and model_id not in state.lora_adapters:
        raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    return _model_card(state, None if model_id == state.model_name else model_id)
