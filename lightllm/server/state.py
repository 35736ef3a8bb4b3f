"""What every route needs: the tokenizer, the engine connection, limits, and shared request helpers."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import Request

from lightllm.engine.protocol import SamplingParams
from lightllm.server.engine_client import EngineClient, EngineDied
from lightllm.server.errors import APIError
from lightllm.server.generation import GenerationChunk, GenerationError, generate_text
from lightllm.server.reasoning.base import ReasoningDetector
from lightllm.server.reasoning.registry import reasoning_detector

T = TypeVar("T")


@dataclass
class ServerState:
    args: Any
    tokenizer: Any
    engine: EngineClient
    model_name: str
    max_model_len: int
    eog_token_ids: list[int]
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    inflight: int = 0
    counters: dict[str, int] = field(default_factory=lambda: {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0})

    def new_reasoning_detector(self) -> ReasoningDetector | None:
        return reasoning_detector(self.reasoning_parser) if self.reasoning_parser else None

    def check_capacity(self) -> None:
        if not self.engine.alive:
            raise APIError(503, f"the engine is not running: {self.engine.dead_reason}")
        if self.inflight >= self.args.max_concurrent_requests:
            raise APIError(503, "server overloaded: too many requests in flight; retry later",
                           code="server_overloaded")

    def check_length(self, prompt_len: int, max_new_tokens: int | None, param: str = "max_tokens") -> int:
        """Validate the request's total length; returns the effective max_new_tokens."""
        if prompt_len >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"your prompt has {prompt_len} tokens; reduce its length.",
                           param="messages", code="context_length_exceeded")
        if max_new_tokens is None:
            return self.max_model_len - prompt_len
        if prompt_len + max_new_tokens > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"you requested {prompt_len + max_new_tokens} tokens ({prompt_len} in the prompt, "
                                f"{max_new_tokens} for the completion). Reduce the prompt or {param}.",
                           param=param, code="context_length_exceeded")
        return max_new_tokens

    def stream(self, prompt_ids: list[int], params: SamplingParams, *, stop: list[str] | None = None,
               skip_special_tokens: bool = True, rid: str | None = None) -> AsyncIterator[GenerationChunk]:
        if not params.ignore_eos:
            params.stop_token_ids = sorted(set(params.stop_token_ids) | set(self.eog_token_ids))
        return self._tracked(generate_text(self.engine, self.tokenizer, prompt_ids, params, stop=stop,
                                           skip_special_tokens=skip_special_tokens,
                                           eos_token_ids=self.eog_token_ids, rid=rid), len(prompt_ids))

    async def _tracked(self, gen: AsyncIterator[GenerationChunk], prompt_len: int) -> AsyncIterator[GenerationChunk]:
        self.inflight += 1
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += prompt_len
        last = 0
        try:
            async for chunk in gen:
                self.counters["generation_tokens"] += chunk.completion_tokens - last
                last = chunk.completion_tokens
                yield chunk
        except EngineDied as exc:
            raise APIError(503, str(exc)) from exc
        finally:
            self.inflight -= 1
            await gen.aclose()


async def collect(gen: AsyncIterator[GenerationChunk]) -> tuple[str, list[GenerationChunk]]:
    """Run a generation to the end; returns the full text and the chunks."""
    chunks = [c async for c in gen]
    return "".join(c.text for c in chunks), chunks


async def collect_all(streams: list[AsyncIterator[GenerationChunk]]) -> list[tuple[str, list[GenerationChunk]]]:
    """Run several generations (n choices, several prompts) concurrently to the end."""
    return await asyncio.gather(*(collect(s) for s in streams))


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its engine requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise APIError(499, "client disconnected")
    except GenerationError as exc:
        raise APIError(400, str(exc)) from exc
    finally:
        if not task.done():
            task.cancel()
