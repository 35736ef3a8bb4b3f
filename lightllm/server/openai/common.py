"""Helpers shared by the chat and text completion routes: sampling params, usage, SSE, stream merging."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from lightllm.engine.protocol import GrammarSpec, ReasoningGate, SamplingParams
from lightllm.server.generation import GenerationChunk, TokenInfo
from lightllm.server.openai.protocol import SamplingFields


def sampling_params(req: SamplingFields, max_new_tokens: int, logprobs: int | None, index: int = 0,
                    grammar: GrammarSpec | None = None, grammar_gate: ReasoningGate | None = None,
                    lora: str | None = None) -> SamplingParams:
    temperature = 1.0 if req.temperature is None else req.temperature
    return SamplingParams(
        max_new_tokens=max_new_tokens, min_new_tokens=req.min_tokens,
        temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k,
        min_p=req.min_p, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        # n > 1 with a seed: each choice gets its own, still reproducible, stream
        seed=None if req.seed is None else req.seed + index, ignore_eos=req.ignore_eos,
        stop_token_ids=list(req.stop_token_ids or []),
        logit_bias={int(k): float(v) for k, v in (req.logit_bias or {}).items()},
        logprobs=logprobs, grammar=grammar, grammar_gate=grammar_gate, lora=lora)


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def chat_logprob_entries(tokens: list[TokenInfo]) -> list[dict[str, Any]]:
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [dict(entry(t.text, t.logprob), top_logprobs=[entry(s, lp) for _, s, lp in (t.top_logprobs or [])])
            for t in tokens]


async def merge_streams(streams: list[AsyncIterator[GenerationChunk]]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Interleave several choices' streams as their chunks arrive; closing this closes them all."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[GenerationChunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((i, chunk))
        except Exception as exc:
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
