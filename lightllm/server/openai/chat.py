"""POST /v1/chat/completions, plain and streamed, with tool calls."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from lightllm.engine.protocol import GrammarSpec, ReasoningGate
from lightllm.server.errors import APIError, stream_error_event
from lightllm.server.generation import GenerationChunk
from lightllm.server import structured
from lightllm.server.function_call import ToolContext, prepare_tool_context
from lightllm.server.openai.chat_output import ChatOutputParser
from lightllm.server.openapi import STREAMING_OK
from lightllm.server.reasoning.base import ReasoningDetector, ThinkTagDetector
from lightllm.server.ids import new_id
from lightllm.server.multimodal import RequestImage, check_count, encode_with_images, layout_text, load_image
from lightllm.server.openai.common import chat_logprob_entries, merge_streams, now, sampling_params, sse, usage
from lightllm.server.openai.protocol import ChatCompletionRequest, ChatMessage
from lightllm.server.state import ServerState, collect_all, until_disconnect

router = APIRouter()


def _template_message(msg: ChatMessage, image_text: str) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "system" if msg.role == "developer" else msg.role, "content": msg.text(image_text)}
    if msg.name:
        out["name"] = msg.name
    if msg.tool_call_id:
        out["tool_call_id"] = msg.tool_call_id
    if msg.tool_calls:
        calls = []
        for call in msg.tool_calls:
            args = call.function.arguments
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    raise APIError(400, f"tool call {call.function.name!r} has arguments that are not valid JSON",
                                   param="messages") from None
            calls.append({"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}})
        out["tool_calls"] = calls
    return out


def render_prompt(state: ServerState, req: ChatCompletionRequest, tools: ToolContext | None,
                  image_text: str = "") -> str:
    """The chat text; each image part is `image_text` (the model's image marker) where it stands."""
    import jinja2

    messages = [_template_message(m, image_text) for m in req.messages]
    if tools is not None:
        messages = tools.adapt_messages(messages)
    kwargs = dict(req.chat_template_kwargs or {})
    if tools is not None and tools.template_tools is not None:
        kwargs["tools"] = tools.template_tools
    template = state.tokenizer.chat_template
    if template is None:
        raise APIError(400, "this model has no chat template; start the server with --chat_template FILE")
    if req.reasoning_effort is not None:
        if "reasoning_effort" not in template:
            raise APIError(400, "reasoning_effort is not supported by this model: its chat template has no "
                                "reasoning effort setting", param="reasoning_effort")
        kwargs.setdefault("reasoning_effort", req.reasoning_effort)
    if req.continue_final_message:
        if req.add_generation_prompt:
            raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true: set "
                                "add_generation_prompt to false to continue the final message",
                           param="continue_final_message")
        if messages[-1]["role"] != "assistant" or messages[-1].get("tool_calls"):
            raise APIError(400, "continue_final_message needs the last message to be an assistant message with "
                                "text and no tool calls", param="messages")
    try:
        return state.tokenizer.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=req.add_generation_prompt,
                                                   continue_final_message=req.continue_final_message, **kwargs)
    except jinja2.TemplateError as exc:
        raise APIError(400, f"chat template error: {exc}", param="messages") from exc
    except ValueError as exc:  # the template does not render the final message's text as it was given
        if not req.continue_final_message:
            raise
        raise APIError(400, f"cannot continue the final message: {exc}", param="messages") from None


@dataclass
class PreparedChat:
    """A chat request ready to run: its prompt, one generation stream per choice, and how to read the
    output. Other API shapes (Responses, Anthropic Messages) translate their request into a
    ChatCompletionRequest, prepare it here and shape the results their own way."""

    prompt_ids: list[int]
    streams: list[AsyncIterator[GenerationChunk]]
    output: ChatOutputParser
    tools: ToolContext | None

    def finish_reason(self, parsed_calls: bool, reason: str | None) -> str | None:
        return self.tools.finish_reason(reason) if parsed_calls and self.tools is not None else reason


def prepare_chat(state: ServerState, req: ChatCompletionRequest, rid_prefix: str = "chatcmpl-") -> PreparedChat:
    """Validate, render and tokenize the request and start its generations (they run once iterated)."""
    state.check_capacity()
    lora = state.adapter_for(req.model)
    tools = prepare_tool_context(req, state)
    # one output constraint: a forced tool call's grammar, response_format or a peer's structured-output field
    grammar = structured.openai_constraint(state, req, tools.grammar if tools is not None else None)
    images, image_text = request_images(state, req)
    prompt = render_prompt(state, req, tools, image_text)
    prompt_ids, image_inputs = encode_with_images(
        state, prompt, images, lambda text: state.tokenizer.encode(text, add_special_tokens=False), "messages")
    max_new_param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if images:  # never truncated (--long_truncation_mode could cut an image's run): too long is a 400
        max_new = state.check_length(len(prompt_ids), req.max_completion_tokens or req.max_tokens, max_new_param)
    else:
        prompt_ids, max_new = state.fit_length(prompt_ids, req.max_completion_tokens or req.max_tokens,
                                               param=max_new_param)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    reasoning = state.new_reasoning_detector() if req.separate_reasoning else None
    reasoning = reasoning.for_prompt(prompt) if reasoning is not None else None
    gate = None
    if grammar is not None and reasoning is not None:
        # Constrained output (forced tool calls, response_format, ...) constrains the answer: a think-tag
        # model thinks freely first. Other formats (harmony) get the grammar from the first token, no reasoning.
        gate = reasoning_gate(state.tokenizer, reasoning, grammar)
        if gate is None:
            reasoning = None
    output = ChatOutputParser(reasoning, tools)
    # Tool and reasoning markers are special tokens in some vocabularies: keep them while parsing.
    skip_special = req.skip_special_tokens and not output.needs_special_tokens
    streams = [state.stream(prompt_ids, sampling_params(req, max_new, logprobs, i, grammar, gate, lora),
                            stop=req.stop_list(), skip_special_tokens=skip_special, rid=new_id(rid_prefix),
                            images=image_inputs)
               for i in range(req.n)]
    if tools is not None and tools.mode == "required":
        streams = [tools.limit_repeats(s, reasoning) for s in streams]
    return PreparedChat(prompt_ids, streams, output, tools)


def request_images(state: ServerState, req: ChatCompletionRequest) -> tuple[list[RequestImage], str]:
    """The request's images in message order, each loaded and checked (400s: server/multimodal.py), and
    the text that stands for an image in the chat text (the model's image marker; "" without images)."""
    urls = [(i, url) for i, msg in enumerate(req.messages) for url in msg.image_urls()]
    if not urls:
        return [], ""
    image_text = layout_text(state.engine.info, state.tokenizer, state.model_name, "messages").image_text
    check_count(len(urls), state.args, "messages")
    return [load_image(url, state.args, f"messages[{i}].content") for i, url in urls], image_text


def reasoning_gate(tokenizer: Any, reasoning: ReasoningDetector, grammar: GrammarSpec) -> ReasoningGate | None:
    """Where the grammar starts for a thinking model: after its think block's end tag (None: the format has
    no such tags, or the constraint is a plain token mask that applies to every token)."""
    if not isinstance(reasoning, ThinkTagDetector) or grammar.kind == "token_ids":
        return None
    start, end = (tuple(tokenizer.encode(tag, add_special_tokens=False)) for tag in (reasoning.start_tag,
                                                                                      reasoning.end_tag))
    return ReasoningGate(start, end, reasoning.in_block)


@router.post("/v1/chat/completions", responses=STREAMING_OK)
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state: ServerState = request.app.state.server
    prepared = prepare_chat(state, req)
    prompt_ids, streams, output = prepared.prompt_ids, prepared.streams, prepared.output
    response_id = new_id("chatcmpl-")
    if req.stream:
        return StreamingResponse(_stream(state, req, response_id, streams, len(prompt_ids), output),
                                 media_type="text/event-stream")

    results = await until_disconnect(request, collect_all(streams))
    choices = []
    completion_tokens = cached = 0
    for index, (text, chunks) in enumerate(results):
        last = chunks[-1]
        completion_tokens += last.completion_tokens
        cached = max(cached, last.cached_tokens)
        parsed = output.parse(text)
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content, "refusal": None}
        if output.reasoning is not None:
            message["reasoning_content"] = parsed.reasoning
        finish_reason = prepared.finish_reason(bool(parsed.tool_calls), last.finish_reason)
        if parsed.tool_calls:
            message["tool_calls"] = parsed.tool_calls
        logprobs_body = None
        if req.logprobs:
            logprobs_body = {"content": chat_logprob_entries([t for c in chunks for t in c.tokens]), "refusal": None}
        choices.append({"index": index, "message": message, "logprobs": logprobs_body, "finish_reason": finish_reason})
    return {"id": response_id, "object": "chat.completion", "created": now(), "model": state.served_name(req.model),
            "choices": choices, "usage": usage(len(prompt_ids), completion_tokens, cached),
            "system_fingerprint": None}


async def _stream(state: ServerState, req: ChatCompletionRequest, response_id: str, streams: list, prompt_len: int,
                  output: ChatOutputParser):
    created = now()
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous_usage = include_usage and req.stream_options.continuous_usage_stats

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None,
              logprobs: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"id": response_id, "object": "chat.completion.chunk", "created": created,
                                "model": state.served_name(req.model), "system_fingerprint": None,
                                "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                             "finish_reason": finish_reason}]}
        if include_usage:  # usage so far on every chunk with continuous_usage_stats (vLLM's option)
            body["usage"] = usage(prompt_len, sum(completion_tokens.values()), cached) if continuous_usage else None
        return sse(body)

    parsers = [output.stream() for _ in streams]
    completion_tokens: dict[int, int] = {}
    cached = 0
    merged = merge_streams(streams)
    try:
        for index in range(len(streams)):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for index, gen in merged:
            completion_tokens[index] = gen.completion_tokens
            cached = max(cached, gen.cached_tokens)
            logprobs = None
            if req.logprobs and gen.tokens:
                logprobs = {"content": chat_logprob_entries(gen.tokens), "refusal": None}
            parser = parsers[index]
            for delta in parser.on_chunk(gen):
                yield chunk(index, delta, logprobs=logprobs)
                logprobs = None
            if logprobs is not None:  # a token whose text is held back still reports its logprob
                yield chunk(index, {}, logprobs=logprobs)
            if gen.finished:
                reason = gen.finish_reason
                if parser.made_calls:
                    reason = output.tools.finish_reason(reason)
                yield chunk(index, {}, finish_reason=reason)
        if include_usage:
            yield sse({"id": response_id, "object": "chat.completion.chunk", "created": created,
                       "model": state.served_name(req.model), "system_fingerprint": None, "choices": [],
                       "usage": usage(prompt_len, sum(completion_tokens.values()), cached)})
    except Exception as exc:  # the stream has begun: the error travels as its last event
        yield sse(stream_error_event(exc, response_id))
    finally:
        await merged.aclose()
    yield sse("[DONE]")
