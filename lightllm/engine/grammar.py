"""Constrained decoding with xgrammar: every GrammarSpec kind as a per-request token mask.

xgrammar was chosen over llguidance after measuring both on the embedded model's 49k vocabulary: 6.6 ms to
compile a tool-call schema and ~0.2 ms per token for mask + accept.
The tokenizer info is built in a background thread while the engine loads its weights; the engine
reports ready once it is done, so neither the first constrained request nor the first requests' decode
steps pay for it.

Compilation (the per-token mask tables: 0.1 s for a 20 KB schema here, seconds for the largest) runs on a
worker thread that xgrammar lets run without the GIL, so the engine keeps stepping the other requests while a
new grammar compiles; the request waits outside the scheduler until its grammar is ready. Compiled grammars
are kept in an LRU cache keyed by the spec's text (`GrammarSpec.cache_key`), bounded in bytes.
`build_grammar` (parse only, no tokenizer) is also what the API process runs to refuse bad input with a 400.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from lightllm.engine.protocol import GrammarSpec

logger = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = 512 << 20  # compiled grammars kept for reuse (a large schema's tables take tens of MB)
_LOG_PREFIX = re.compile(r"\[[0-9:]+\] \S+?:\d+: ")  # also inside nested messages (Lark → regex)


class GrammarError(ValueError):
    """The spec is not a grammar xgrammar can build (the client's input: an HTTP 400)."""


def _message(exc: BaseException) -> str:
    """xgrammar's error without its C++ log prefixes ("[14:12:33] /project/cpp/x.cc:83: ")."""
    return _LOG_PREFIX.sub("", str(exc).strip()).strip()


def choice_ebnf(choices: tuple[str, ...] | list[str]) -> str:
    """root ::= "a" | "b" ... (JSON string escapes are also GBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def is_ebnf(text: str) -> bool:
    """GBNF/EBNF (`rule ::= ...`) rather than Lark (`rule: ...`), as vLLM tells them apart."""
    return "::=" in text


def build_grammar(spec: GrammarSpec) -> Any:
    """The xgrammar Grammar for `spec` (parsing only: cheap, needs no tokenizer). Raises GrammarError."""
    import xgrammar as xgr

    try:
        if spec.kind == "json_schema":
            return xgr.Grammar.from_json_schema(json.dumps(spec.schema), any_whitespace=spec.any_whitespace,
                                                strict_mode=spec.strict)
        if spec.kind == "json_object":
            return xgr.Grammar.builtin_json_grammar()
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.text or "")
        if spec.kind == "choice":
            return xgr.Grammar.from_ebnf(choice_ebnf(spec.choices))
        if spec.kind == "grammar":
            text = spec.text or ""
            return xgr.Grammar.from_ebnf(text) if is_ebnf(text) else xgr.Grammar.from_lark(text)
        if spec.kind == "structural_tag":
            return xgr.Grammar.from_structural_tag(spec.text or "")
    except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's parse errors (InvalidJSON... are ValueError)
        raise GrammarError(_message(exc)) from None
    raise GrammarError(f"unknown grammar kind {spec.kind!r}")


class GrammarMatcher:
    """One request's grammar state: mask the logits row, advance on the sampled token."""

    def __init__(self, matcher: Any, vocab_size: int):
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = matcher
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def apply_mask(self, row: torch.Tensor) -> None:
        self.matcher.fill_next_token_bitmask(self.bitmask, 0)
        self._xgr.apply_token_bitmask_inplace(row.unsqueeze(0), self.bitmask.to(row.device))

    def can_start(self) -> bool:
        """Whether some token of the vocabulary may come first (a regex of characters no token holds, such as a
        control character the tokenizer drops, allows none); the state does not change."""
        self.matcher.fill_next_token_bitmask(self.bitmask, 0)
        return bool(self.bitmask.any())

    def accept_token(self, token_id: int) -> None:
        if not self.matcher.is_terminated() and not self.matcher.accept_token(token_id):
            logger.warning("grammar rejected token %d", token_id)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class AllowedTokens:
    """`allowed_token_ids`: every sampled token is one of a fixed set (no grammar state, never terminates:
    the request ends on a stop token in the set or at its token limit)."""

    def __init__(self, token_ids: tuple[int, ...], vocab_size: int):
        self.banned = torch.ones(vocab_size, dtype=torch.bool)
        self.banned[list(token_ids)] = False

    def apply_mask(self, row: torch.Tensor) -> None:
        if self.banned.device != row.device:
            self.banned = self.banned.to(row.device)
        row.masked_fill_(self.banned[: row.shape[0]], float("-inf"))

    def can_start(self) -> bool:
        return not bool(self.banned.all())

    def accept_token(self, token_id: int) -> None:
        pass

    def is_terminated(self) -> bool:
        return False


class GrammarFactory:
    """Builds the tokenizer info (in a thread that the first constrained request starts: a server that never
    constrains output never pays its seconds of GIL-holding imports or its ~90 MB), compiles specs on a worker
    thread with an LRU cache, and makes per-request matchers. Used from the engine's loop thread only (the worker only compiles)."""

    def __init__(self, model_path: str, vocab_size: int, cache_limit_bytes: int = CACHE_LIMIT_BYTES):
        self.model_path = model_path
        self.vocab_size = vocab_size
        self.cache_limit_bytes = cache_limit_bytes
        self._compiler = None
        self._error: BaseException | None = None
        self._cache: OrderedDict[str, Any] = OrderedDict()  # cache key -> CompiledGrammar
        self._cache_bytes = 0
        self._inflight: dict[str, Future] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self.stats = {"compiled": 0, "cache_hits": 0}
        self._thread = threading.Thread(target=self._build, name="grammar-init", daemon=True)

    def start(self) -> None:
        """Begin building the tokenizer info (idempotent; whatever needs the grammar engine calls it too)."""
        if self._thread.ident is None:
            self._thread.start()

    def _build(self) -> None:
        try:
            # a lower CPU priority (Linux nice is per thread), so it yields to the running requests' steps, yet
            # is not starved on a loaded machine (the constrained request that started it waits for it)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + 5)
        except (AttributeError, OSError):
            pass
        try:
            import xgrammar as xgr

            from lightllm.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(self.model_path, mode="auto")
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
            # our own cache below is bounded; xgrammar's would grow without limit
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        except BaseException as exc:  # reported to the first request that needs a grammar
            self._error = exc

    @property
    def failed(self) -> bool:
        """The grammar engine could not be built (every constrained request fails: a server fault)."""
        return not self._thread.is_alive() and self._error is not None

    def wait(self) -> None:
        self.start()
        self._thread.join()
        if self._error is not None:
            logger.warning("grammar engine unavailable: %s", self._error)

    def compiler(self):
        self.start()
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"grammar engine unavailable: {self._error}")
        return self._compiler

    def compile(self, spec: GrammarSpec) -> Future:
        """A future of the compiled grammar (None for token_ids): done at once on a cache hit, else compiled on
        the worker thread (one compilation per key however many requests wait for it). Call `collect()`
        from the loop to move finished compilations into the cache. Never waits for the tokenizer info: while
        it is still being built the worker waits for it, not the engine loop; once it failed, this raises."""
        self.start()
        if not self._thread.is_alive():
            self.compiler()  # raises when the grammar engine could not be built
        key = spec.cache_key()
        if spec.kind == "token_ids":
            future: Future = Future()
            future.set_result(None)
            return future
        if key in self._cache:
            self.stats["cache_hits"] += 1
            self._cache.move_to_end(key)
            future = Future()
            future.set_result(self._cache[key])
            return future
        if key in self._inflight:
            self.stats["cache_hits"] += 1
            return self._inflight[key]
        future = self._executor.submit(self._compile_one, spec)
        self._inflight[key] = future
        return future

    def _compile_one(self, spec: GrammarSpec) -> Any:
        grammar = build_grammar(spec)
        compiler = self.compiler()
        try:
            return compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as exc:
            raise GrammarError(_message(exc)) from None

    def collect(self) -> None:
        """Cache the compilations that finished (failed ones are dropped: the next request retries)."""
        for key, future in list(self._inflight.items()):
            if not future.done():
                continue
            del self._inflight[key]
            if future.exception() is None:
                self.stats["compiled"] += 1
                self._store(key, future.result())

    def _store(self, key: str, compiled: Any) -> None:
        size = compiled.memory_size_bytes
        if size > self.cache_limit_bytes:
            return
        self._cache[key] = compiled
        self._cache_bytes += size
        while self._cache_bytes > self.cache_limit_bytes:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.memory_size_bytes

    def matcher(self, spec: GrammarSpec, compiled: Any = None) -> GrammarMatcher | AllowedTokens:
        """The request's matcher from its compiled grammar (compiling synchronously when none is given)."""
        import xgrammar as xgr

        if spec.kind == "token_ids":
            return AllowedTokens(spec.token_ids, self.vocab_size)
        if compiled is None:
            compiled = self._compile_one(spec)
        return GrammarMatcher(xgr.GrammarMatcher(compiled), self.vocab_size)
