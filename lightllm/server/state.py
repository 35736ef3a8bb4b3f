"""What every route needs: the tokenizer, the engine connection, limits, and shared request helpers."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, TypeVar

from fastapi import Request

from lightllm.engine.protocol import ImageInput, SamplingParams, length_problem
from lightllm.server.engine_client import EngineClient, EngineDied
from lightllm.server.errors import APIError
from lightllm.server.lifecycle import Lifecycle
from lightllm.server.generation import GenerationChunk, generate_text
from lightllm.server.reasoning.base import ReasoningDetector
from lightllm.server.reasoning.registry import reasoning_detector

if TYPE_CHECKING:
    from lightllm.server.args import ServerArgs

T = TypeVar("T")


def engine_unavailable(message: str) -> APIError:
    """503 with Retry-After: the engine process is down (restarting) or did not answer."""
    return APIError(503, message, code="engine_unavailable", headers={"Retry-After": "5"})


@dataclass
class ServerState:
    args: ServerArgs
    tokenizer: Any
    engine: EngineClient
    model_name: str
    max_model_len: int
    eog_token_ids: list[int]
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    lifecycle: Lifecycle = field(default_factory=lambda: Lifecycle(shutdown_timeout=0))
    lora_adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapters served: name -> folder
    inflight: int = 0
    counters: dict[str, int] = field(default_factory=lambda: {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0,
                                                              "prefix_cache_hit_tokens": 0})

    @property
    def lora_enabled(self) -> bool:
        return self.args.enable_lora or bool(self.args.lora_modules)

    def adapter_for(self, name: str | None, param: str = "model", strict: bool = False) -> str | None:
        """The LoRA adapter a request's model name selects (None: the base model). With LoRA on, or `strict`
        (a field that only names adapters), any other name is a 404 model_not_found; with LoRA off the model
        field is not checked (any name runs the one model, as before adapters existed)."""
        if name is None or name == self.model_name:
            return None
        if name in self.lora_adapters:
            return name
        if strict or self.lora_enabled:
            raise APIError(404, f"The model '{name}' does not exist", param=param, code="model_not_found")
        return None

    def served_name(self, model: str | None) -> str:
        """The `model` a response carries: the adapter's name for a request that selected one (vLLM's way), else
        the base model's."""
        return model if model is not None and model in self.lora_adapters else self.model_name

    def new_reasoning_detector(self) -> ReasoningDetector | None:
        return reasoning_detector(self.reasoning_parser) if self.reasoning_parser else None

    def check_capacity(self) -> None:
        """503 with Retry-After when the request cannot start now (engine down, draining, overloaded)."""
        if not self.engine.alive:
            raise engine_unavailable(f"the engine is not running ({self.engine.dead_reason}); retry shortly")
        if self.lifecycle.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        if self.inflight >= self.args.max_concurrent_requests:
            raise APIError(503, "server overloaded: too many requests in flight; retry later",
                           code="server_overloaded", headers={"Retry-After": "1"})

    def fit_length(self, prompt_ids: list[int], max_new_tokens: int | None, param: str = "max_tokens",
                   prompt_param: str = "messages") -> tuple[list[int], int]:
        """Validate the request's total length (limits: engine.protocol.length_problem) → the prompt and the
        effective max_new_tokens (all the room left when the request sets none). With --long_truncation_mode
        an over-long prompt is cut instead of refused: `head` drops its beginning, `center` its middle,
        keeping room for max_new_tokens (or for a quarter of the context, at most 256, when unset)."""
        mode = self.args.long_truncation_mode
        room = max_new_tokens if max_new_tokens is not None else min(256, self.max_model_len // 4)
        keep = self.max_model_len - room
        if mode and prompt_ids and len(prompt_ids) + room > self.max_model_len and keep > 0:
            if mode == "head":
                prompt_ids = prompt_ids[-keep:]
            else:
                prompt_ids = prompt_ids[:keep // 2] + prompt_ids[len(prompt_ids) - (keep - keep // 2):]
        return prompt_ids, self.check_length(len(prompt_ids), max_new_tokens, param, prompt_param)

    def check_length(self, prompt_len: int, max_new_tokens: int | None, param: str = "max_tokens",
                     prompt_param: str = "messages") -> int:
        problem = length_problem(prompt_len, max_new_tokens, self.max_model_len, param)
        if problem is not None:
            too_long = prompt_len >= self.max_model_len or max_new_tokens is None
            raise APIError(400, problem, param=prompt_param if too_long or prompt_len == 0 else param,
                           code="context_length_exceeded" if prompt_len else None)
        return self.max_model_len - prompt_len if max_new_tokens is None else max_new_tokens

    def stream(self, prompt_ids: list[int], params: SamplingParams, *, stop: list[str] | None = None,
               skip_special_tokens: bool = True, rid: str | None = None,
               images: list[ImageInput] | None = None) -> AsyncIterator[GenerationChunk]:
        """`images`: the prompt's images, their placeholder runs laid out (server/multimodal.py)."""
        if not params.ignore_eos:
            params.stop_token_ids = sorted(set(params.stop_token_ids) | set(self.eog_token_ids))
        return self._tracked(generate_text(self.engine, self.tokenizer, prompt_ids, params, stop=stop,
                                           skip_special_tokens=skip_special_tokens, rid=rid, images=images),
                             len(prompt_ids))

    async def _tracked(self, gen: AsyncIterator[GenerationChunk], prompt_len: int) -> AsyncIterator[GenerationChunk]:
        self.inflight += 1
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += prompt_len
        last = cached = 0
        try:
            async for chunk in gen:
                self.counters["generation_tokens"] += chunk.completion_tokens - last
                last = chunk.completion_tokens
                cached = max(cached, chunk.cached_tokens)
                yield chunk
        except EngineDied as exc:
            raise engine_unavailable(str(exc)) from exc
        finally:
            self.inflight -= 1
            self.counters["prefix_cache_hit_tokens"] += cached
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
    finally:
        if not task.done():
            task.cancel()
