"""POST /v1/completions (prompt as text, list of texts, token ids or lists of token ids)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from lightllm.server import structured
from lightllm.server.errors import APIError, stream_error_event
from lightllm.server.generation import GenerationChunk
from lightllm.server.ids import new_id
from lightllm.server.openai.common import merge_streams, now, sampling_params, sse, usage
from lightllm.server.openai.protocol import CompletionRequest
from lightllm.server.openapi import STREAMING_OK
from lightllm.server.state import ServerState, collect_all, until_disconnect

router = APIRouter()


def _prompts(state: ServerState, req: CompletionRequest) -> list[list[int]]:
    """The prompts as token ids (empty ones fail validation, or the length check if a text encodes to none)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        texts: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        texts = [prompt]
    else:
        texts = list(prompt)
    return [state.tokenizer.encode(item, add_special_tokens=req.add_special_tokens) if isinstance(item, str)
            else list(item) for item in texts]


def _logprobs_body(chunks: list[GenerationChunk], offset: int = 0) -> dict[str, Any]:
    tokens = [t for c in chunks for t in c.tokens]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{s: lp for _, s, lp in (t.top_logprobs or [])} for t in tokens],
            "text_offset": offsets}


@router.post("/v1/completions", responses=STREAMING_OK)
async def completions(req: CompletionRequest, request: Request):
    state: ServerState = request.app.state.server
    state.check_capacity()
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")
    if req.echo and req.stream:
        raise APIError(400, "echo is not supported with stream", param="echo", code="unsupported_parameter")
    if req.best_of not in (None, 1, req.n):
        raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported_parameter")
    grammar = structured.openai_constraint(state, req)
    lora = state.adapter_for(req.model)
    prompts = []
    streams = []
    for ids in _prompts(state, req):
        ids, max_new = state.fit_length(ids, req.max_tokens if req.max_tokens is not None else 16,
                                        prompt_param="prompt")
        prompts.append(ids)
        for i in range(req.n):
            streams.append(state.stream(ids, sampling_params(req, max_new, req.logprobs, i, grammar, lora=lora),
                                        stop=req.stop_list(), skip_special_tokens=req.skip_special_tokens,
                                        rid=new_id("cmpl-")))
    response_id = new_id("cmpl-")
    prompt_tokens = sum(len(ids) for ids in prompts)
    if req.stream:
        return StreamingResponse(_stream(state, req, response_id, streams, prompt_tokens), media_type="text/event-stream")

    results = await until_disconnect(request, collect_all(streams))
    choices = []
    completion_tokens = 0
    cached: dict[int, int] = {}
    for index, (text, chunks) in enumerate(results):
        completion_tokens += chunks[-1].completion_tokens
        cached[index] = chunks[-1].cached_tokens
        prefix = ""
        if req.echo:
            prefix = state.tokenizer.decode(prompts[index // req.n])
        choices.append({"index": index, "text": prefix + text,
                        "logprobs": _logprobs_body(chunks, len(prefix)) if req.logprobs is not None else None,
                        "finish_reason": chunks[-1].finish_reason})
    return {"id": response_id, "object": "text_completion", "created": now(), "model": state.served_name(req.model),
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens, _cached_total(cached, req.n)),
            "system_fingerprint": None}


def _cached_total(cached: dict[int, int], n: int) -> int:
    """Prompt tokens served by the prefix cache, once per prompt (its n choices share the prompt)."""
    per_prompt: dict[int, int] = {}
    for index, tokens in cached.items():
        per_prompt[index // n] = max(per_prompt.get(index // n, 0), tokens)
    return sum(per_prompt.values())


async def _stream(state: ServerState, req: CompletionRequest, response_id: str, streams: list, prompt_tokens: int):
    created = now()
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous_usage = include_usage and req.stream_options.continuous_usage_stats
    completion_tokens: dict[int, int] = {}
    cached: dict[int, int] = {}
    merged = merge_streams(streams)
    try:
        async for index, gen in merged:
            completion_tokens[index] = gen.completion_tokens
            cached[index] = gen.cached_tokens
            if not gen.text and not gen.finished and not gen.tokens:
                continue
            body: dict[str, Any] = {"id": response_id, "object": "text_completion", "created": created,
                                    "model": state.served_name(req.model), "system_fingerprint": None,
                                    "choices": [{"index": index, "text": gen.text,
                                                 "logprobs": _logprobs_body([gen]) if req.logprobs is not None else None,
                                                 "finish_reason": gen.finish_reason if gen.finished else None}]}
            if include_usage:  # usage so far on every chunk with continuous_usage_stats (vLLM's option)
                body["usage"] = (usage(prompt_tokens, sum(completion_tokens.values()), _cached_total(cached, req.n))
                                 if continuous_usage else None)
            yield sse(body)
        if include_usage:
            yield sse({"id": response_id, "object": "text_completion", "created": created,
                       "model": state.served_name(req.model),
                       "system_fingerprint": None, "choices": [],
                       "usage": usage(prompt_tokens, sum(completion_tokens.values()), _cached_total(cached, req.n))})
    except Exception as exc:  # the stream has begun: the error travels as its last event
        yield sse(stream_error_event(exc, response_id))
    finally:
        await merged.aclose()
    yield sse("[DONE]")
