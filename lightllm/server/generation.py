"""One request's text stream: engine tokens → incremental detokenization → stop strings → chunks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from lightllm.engine.protocol import EngineError, ImageInput, SamplingParams
from lightllm.server.errors import APIError
from lightllm.server.holdback import partial_marker_len
from lightllm.server.ids import new_id
from lightllm.tokenizer import IncrementalDetokenizer


_STATUS = {"client": 400, "server": 500, "unavailable": 503}


class GenerationError(APIError):
    """The engine refused or failed the request; the HTTP status follows whose fault it was."""

    def __init__(self, error: EngineError):
        super().__init__(_STATUS[error.kind], error.message, code="engine_error" if error.kind == "server" else None,
                         headers={"Retry-After": "5"} if error.kind == "unavailable" else None)
        self.kind = error.kind


@dataclass
class TokenInfo:
    token_id: int
    text: str  # the token's own text (for logprobs displays)
    logprob: float | None
    top_logprobs: list[tuple[int, str, float]] | None


@dataclass
class GenerationChunk:
    text: str  # new text since the previous chunk (may be empty)
    tokens: list[TokenInfo] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    stop_string: str | None = None  # the stop string that ended the generation (finish_reason "stop")


class StopStringMatcher:
    """Finds stop strings in streamed text, holding back any tail that could still become one.

    Only the held-back tail is kept: a stop string cannot begin in text already released (that text had no
    suffix that starts one), so the work per delta is bounded by the delta and the longest stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""  # text received but not yet released
        self.matched: str | None = None  # the stop string hit: the earliest in the text (the shorter on a tie)

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.held += delta
        hits = [(i, len(s), s) for s, i in ((s, self.held.find(s)) for s in self.stops) if i >= 0]
        if hits:
            at, _, self.matched = min(hits)
            out, self.held = self.held[:at], ""
            return out, True
        keep = partial_marker_len(self.held, self.stops)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


async def generate_text(engine: Any, tokenizer: Any, prompt_ids: list[int], params: SamplingParams, *,
                        stop: list[str] | None = None, skip_special_tokens: bool = True,
                        rid: str | None = None, images: list[ImageInput] | None = None
                        ) -> AsyncIterator[GenerationChunk]:
    rid = rid or new_id("req-")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    matcher = StopStringMatcher(stop or [])
    completion_tokens = 0
    want_logprobs = params.logprobs is not None
    async for out in engine.generate(rid, prompt_ids, params, images):
        if out.error:
            raise GenerationError(out.error)
        chunk = GenerationChunk("", prompt_tokens=out.prompt_tokens, cached_tokens=out.cached_tokens)
        if out.token_id is not None:
            completion_tokens += 1
            delta = "" if out.stop_token else detok.add(out.token_id)
            if out.finished:
                delta += "" if out.stop_token else detok.flush()
            text, hit = matcher.feed(delta)
            chunk.text = text
            if want_logprobs:
                chunk.tokens.append(_token_info(tokenizer, out))
            if hit:
                chunk.finished, chunk.finish_reason, chunk.stop_string = True, "stop", matcher.matched
        if out.finished and not chunk.finished:
            chunk.text += matcher.flush()
            chunk.finished, chunk.finish_reason = True, out.finish_reason
        chunk.completion_tokens = completion_tokens
        yield chunk
        if chunk.finished:
            return  # leaving the engine stream early aborts the request there (stop string case)


def _token_info(tokenizer: Any, out: Any) -> TokenInfo:
    top = None
    if out.top_logprobs is not None:
        top = [(tid, tokenizer.decode([tid]), lp) for tid, lp in out.top_logprobs]
    return TokenInfo(out.token_id, tokenizer.decode([out.token_id]), out.logprob, top)
