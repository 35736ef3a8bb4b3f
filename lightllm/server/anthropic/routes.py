"""POST /v1/messages (plain and SSE) and POST /v1/messages/count_tokens: Anthropic's Messages API on top of
the chat route's prepare_chat. Errors on these routes take Anthropic's shape (lightllm.server.errors)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from lightllm.server.anthropic.convert import content_blocks, message, stop_reason, to_chat_request
from lightllm.server.anthropic.protocol import AnthropicErrorResponse, CountTokensRequest, MessagesRequest, TokenCount
from lightllm.server.anthropic.stream import message_events
from lightllm.server.function_call import prepare_tool_context
from lightllm.server.ids import new_id
from lightllm.server.multimodal import encode_with_images
from lightllm.server.openai.chat import prepare_chat, render_prompt, request_images
from lightllm.server.openapi import STREAMING_OK, error_responses
from lightllm.server.state import ServerState, collect, until_disconnect

router = APIRouter()
ERRORS = error_responses(400, 401, 404, 413, 500, 503, model=AnthropicErrorResponse)


@router.post("/v1/messages", responses={**ERRORS, **STREAMING_OK})
async def create_message(req: MessagesRequest, request: Request):
    state: ServerState = request.app.state.server
    prepared = prepare_chat(state, to_chat_request(req), rid_prefix="msg-")
    msg_id = new_id("msg_")
    stream, output = prepared.streams[0], prepared.output
    if req.stream:
        return StreamingResponse(message_events(msg_id, state.served_name(req.model), len(prepared.prompt_ids), stream,
                                                output.stream()), media_type="text/event-stream")
    text, chunks = await until_disconnect(request, collect(stream))
    last = chunks[-1]
    parsed = output.parse(text)
    return message(msg_id, state.served_name(req.model), content_blocks(parsed, output.reasoning is not None),
                   stop_reason(last.finish_reason, last.stop_string, bool(parsed.tool_calls)), last.stop_string,
                   len(prepared.prompt_ids), last.completion_tokens)


@router.post("/v1/messages/count_tokens", response_model=TokenCount, responses=ERRORS)
async def count_tokens(req: CountTokensRequest, request: Request):
    """Tokens of the rendered prompt (system, messages and tools), as /v1/messages would send them."""
    state: ServerState = request.app.state.server
    chat = to_chat_request(req)
    images, image_text = request_images(state, chat)
    prompt = render_prompt(state, chat, prepare_tool_context(chat, state), image_text)
    ids, _ = encode_with_images(state, prompt, images, lambda text: state.tokenizer.encode(
        text, add_special_tokens=False), "messages")  # each image's tokens, as /v1/messages counts them
    return {"input_tokens": len(ids)}
