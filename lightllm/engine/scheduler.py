"""Continuous-batching scheduler: admission by KV budget, chunked prefill, preemption, finishing.

Each step processes, for every scheduled sequence, a run of its not-yet-computed tokens: one token for
a decoding sequence, a chunk of the prompt for a prefilling one. A sequence samples a new token when its
chunk reaches the end of its known tokens, so decode and prefill are the same operation and a
preempted sequence simply recomputes prompt + output without re-emitting anything.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from lightllm.engine.kv_cache import ReqToTokenTable, TokenKVPool
from lightllm.engine.lora import LoraManager
from lightllm.engine.prefix_cache import PrefixCache, common_prefix_len
from lightllm.engine.protocol import EngineError, TokenOutput
from lightllm.engine.sequence import Sequence, SeqStatus
from lightllm.engine.speculative import SpeculativeConfig

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 32  # a request waits only for a shared prefix at least this long
MAX_PREFIX_WAIT_STEPS = 256  # steps a request may be deferred for a shared prefix (no starvation)
# Cache-aware admission (SGLang's longest-prefix-match policy): the first CACHE_AWARE_WINDOW waiting requests
# are tried longest cached prefix first, since those cost the fewest new tokens of the step budget. A
# request that later arrivals overtook MAX_PASSED_OVER times is tried first in arrival order (bounded wait).
CACHE_AWARE_WINDOW = 64
MAX_PASSED_OVER = 8


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed this step
    num_tokens: int  # the draft included
    draft: list[int] = field(default_factory=list)  # speculative tokens after the sequence's known ones

    @property
    def samples(self) -> bool:
        return self.start + self.num_tokens - len(self.draft) == self.seq.total_len


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    accepted: list[int] = field(default_factory=list)  # draft tokens verified before `token_id`


class Scheduler:
    def __init__(self, pool: TokenKVPool, table: ReqToTokenTable, *, batch_max_tokens: int,
                 chunked_prefill_size: int, chunked_prefill: bool, running_max_req_size: int,
                 max_model_len: int, eos_token_ids: list[int], new_token_estimate: int = 512,
                 prefix_cache: PrefixCache | None = None, speculative: SpeculativeConfig = SpeculativeConfig(),
                 lora: LoraManager | None = None, whole_image_runs: bool = False):
        self.pool = pool
        self.table = table
        self.batch_max_tokens = batch_max_tokens
        self.chunked_prefill_size = chunked_prefill_size
        self.chunked_prefill = chunked_prefill
        self.running_max_req_size = running_max_req_size
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        # Admission reserves this many future tokens per request (capped by its max_new_tokens), like
        # LightLLM's router estimate; if reality exceeds it, preemption keeps the pool consistent.
        self.new_token_estimate = new_token_estimate
        self.prefix_cache = prefix_cache
        self.speculative = speculative
        self.lora = lora  # LoRA adapters' residency: a request is admitted once its adapter is resident
        # a prefill chunk never ends inside an image's placeholder run (the model attends among an image's
        # tokens both ways: Gemma 3); otherwise chunks cut through images
        self.whole_image_runs = whole_image_runs
        self.draft_stats = {"proposed": 0, "accepted": 0}  # speculative tokens, for /metrics and benchmarks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # prefill node of a PD deployment (engine/pd_node.py): a request stops after its first token and its
        # KV waits here, out of the running batch, until it has been sent to a decode node
        self.handoff = False
        self.parked: dict[str, Sequence] = {}
        self.num_preemptions = 0
        self._failed: list[tuple[Sequence, EngineError]] = []  # dropped by schedule(); reported by process_results()

    # ------------------------------------------------------------------------------------ queue ops

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, rid: str) -> bool:
        for seq in self.waiting:
            if seq.rid == rid:
                self.waiting.remove(seq)
                seq.status = SeqStatus.FINISHED
                return True
        for seq in self.running:
            if seq.rid == rid:
                self._finish(seq, "abort")
                return True
        return self.release_parked(rid, cache=False)

    # ------------------------------------------------------------------------------------ schedule

    def schedule(self) -> list[ScheduledChunk]:
        """Pick this step's work and allocate its KV slots (preempting the newest if memory runs out).

        Each retry either evicts cached tokens or preempts a request, so the loop ends; once something was
        preempted this step admits nobody, or the victim could be re-admitted and preempted forever.
        """
        admit = True
        while True:
            plan = self._plan(admit)
            needed = sum(c.num_tokens for c in plan)
            if needed <= self.pool.num_free:
                break
            if self.prefix_cache is not None and self.prefix_cache.evict(needed - self.pool.num_free):
                continue
            if not self._preempt_newest():
                break
            admit = False
        plan = [c for c in plan if c.num_tokens <= self.pool.num_free or self._drop_oversized(c)]
        for chunk in plan:
            indices = self.pool.alloc(chunk.num_tokens)
            self.table.table[chunk.seq.slot, chunk.start:chunk.start + chunk.num_tokens] = indices
        return plan

    def _plan(self, admit: bool = True) -> list[ScheduledChunk]:
        budget = self.batch_max_tokens
        plan: list[ScheduledChunk] = []
        decoding = [seq for seq in self.running if seq.num_pending == 1]
        drafting = self.speculative.enabled and len(decoding) <= self.speculative.max_decodes
        for seq in decoding:  # decodes first: they keep streams flowing
            if budget > 0:
                draft = self._draft(seq, budget - 1) if drafting else []
                plan.append(ScheduledChunk(seq, seq.num_computed, 1 + len(draft), draft))
                budget -= 1 + len(draft)
        for seq in self.running:  # then prompts already being prefilled
            if seq.num_pending > 1 and budget > 0:
                n = self._chunk_len(seq, budget, plan_empty=not plan)
                if n:
                    plan.append(ScheduledChunk(seq, seq.num_computed, n))
                    budget -= n
        if not admit or budget <= 0 or not self.waiting or not self._has_room():
            return plan  # nobody can be admitted: spare the ranking its prefix-tree walks
        admitted: list[Sequence] = []
        for seq, cached in self._admission_order():
            if budget <= 0:
                break
            if self._prefix_in_flight(seq, cached):
                continue  # it will find that prefix cached in a few steps
            uncached = seq.total_len - cached
            if not self._can_admit(seq, uncached):
                break
            n = self._chunk_len(seq, budget, plan_empty=not plan, pending=uncached)
            if n == 0:
                break
            if seq.lora_name is not None and not self._bind_adapter(seq):
                continue  # its adapter cannot be made resident now (all slots busy): it waits
            self._admit(seq)
            admitted.append(seq)
            plan.append(ScheduledChunk(seq, seq.num_computed, min(n, seq.num_pending)))
            budget -= plan[-1].num_tokens
        self._note_overtaken(admitted)
        return plan

    def _admission_order(self) -> Iterator[tuple[Sequence, int]]:
        """The waiting requests in the order admission tries them, each with its cached prefix length (one
        prefix-tree walk per request tried: the window is ranked up front, the rest walked only if reached)."""
        queue = list(self.waiting)
        window = [(seq, self._cached_len(seq)) for seq in queue[:CACHE_AWARE_WINDOW]]
        yield from (item for item in window if item[0].passed_over >= MAX_PASSED_OVER)
        # sorted() is stable: equal cached lengths keep arrival order
        yield from sorted((item for item in window if item[0].passed_over < MAX_PASSED_OVER), key=lambda it: -it[1])
        for seq in queue[CACHE_AWARE_WINDOW:]:
            yield seq, self._cached_len(seq)

    def _note_overtaken(self, admitted: list[Sequence]) -> None:
        """Remove the admitted requests from the queue; count, for each request still waiting, whether one
        that arrived after it was admitted (its wait is bounded by MAX_PASSED_OVER such steps)."""
        if not admitted:
            return
        chosen = {id(seq) for seq in admitted}
        queue = list(self.waiting)
        last_admitted = max(i for i, seq in enumerate(queue) if id(seq) in chosen)
        for seq in queue[:last_admitted]:
            if id(seq) not in chosen:
                seq.passed_over += 1
        self.waiting = deque(seq for seq in queue if id(seq) not in chosen)

    def _bind_adapter(self, seq: Sequence) -> bool:
        """Make the request's adapter resident and bind its weights to it; False: not now. An adapter that was
        unloaded, or whose folder no longer reads, fails the request."""
        busy = {s.lora_name for s in self.running if s.lora_name is not None}
        try:
            adapter = self.lora.acquire(seq.lora_name, busy)
        except KeyError:
            if seq.lora is not None:  # preempted after it started: it finishes on the weights it holds
                return True
            return self._refuse_adapter(seq, f"LoRA adapter {seq.lora_name!r} is not loaded")
        except ValueError as exc:  # AdapterError: its folder no longer reads
            return self._refuse_adapter(seq, str(exc))
        if adapter is None:
            return False
        seq.lora = adapter
        return True

    def _refuse_adapter(self, seq: Sequence, reason: str) -> bool:
        self.waiting.remove(seq)
        self._finish(seq, "abort")
        self._failed.append((seq, EngineError("client", reason)))
        return False

    def _draft(self, seq: Sequence, budget: int) -> list[int]:
        """Prompt-lookup draft for a decoding sequence, within the step budget and its length limits (every
        accepted token is an output token, and one more comes with them)."""
        if not seq.can_draft:
            return []
        limit = min(self.speculative.num_tokens, budget, seq.remaining_new_tokens - 1,
                    self.max_model_len - seq.total_len - 1)
        return seq.lookup.propose(seq.all_ids, limit) if limit > 0 else []

    def _prefix_in_flight(self, seq: Sequence, cached: int) -> bool:
        """Whether a running request is still computing a prompt prefix this one shares beyond what is cached
        (then admitting it now would compute that prefix twice). Bounded: after MAX_PREFIX_WAIT_STEPS
        deferrals a request is admitted anyway."""
        if self.prefix_cache is None or seq.prefix_waits >= MAX_PREFIX_WAIT_STEPS:
            return False
        for other in self.running:
            if other.lora_uid != seq.lora_uid:
                continue  # another adapter's K/V is not shareable
            if other.num_computed >= len(other.prompt_ids) or other.num_computed > cached:
                continue  # done prefilling, or what it computed is not in the cache (diverged): no point waiting
            shared = common_prefix_len(other.prompt_content, seq.prompt_content)  # images told apart
            if shared >= MIN_SHARED_PREFIX and shared > cached and other.num_computed < shared:
                seq.prefix_waits += 1
                return True
        return False

    def _chunk_len(self, seq: Sequence, budget: int, plan_empty: bool, pending: int | None = None) -> int:
        pending = seq.num_pending if pending is None else pending
        if self.chunked_prefill:
            n = min(pending, budget, self.chunked_prefill_size)
            return self._image_runs_whole(seq, seq.total_len - pending, n) if self.whole_image_runs else n
        if pending <= budget or plan_empty:
            return pending
        return 0

    @staticmethod
    def _image_runs_whole(seq: Sequence, start: int, n: int) -> int:
        """The length of a chunk [start, start + n) moved off any image run it would end inside: it ends at the
        run's start, or, when it begins at or inside the run (a cached head), it takes the rest of the run even
        beyond the step's budget (by less than one image), so that every image is computed in one step."""
        end = start + n
        for image in seq.images:
            first, last = image.offset, image.offset + image.length
            if first < end < last:
                return first - start if first > start else last - start
        return n

    def _cached_len(self, seq: Sequence) -> int:
        if self.prefix_cache is None:
            return 0
        return self.prefix_cache.match_len(seq.cache_key(seq.total_len - 1))

    def _future_need(self, seq: Sequence) -> int:
        if self.handoff:  # a prefill node computes the prompt only: its output's KV lives on a decode node
            return seq.num_pending
        return seq.num_pending + min(seq.remaining_new_tokens, self.new_token_estimate)

    def _has_room(self) -> bool:
        """A running slot and a req_to_token row are free."""
        return len(self.running) < self.running_max_req_size and self.table.num_free_slots > 0

    def _can_admit(self, seq: Sequence, uncached: int) -> bool:
        """`uncached`: prompt tokens the prefix cache cannot serve."""
        if not self._has_room():
            return False
        if not self.running and not self.parked:  # KV parked for a transfer is freed soon: wait for it
            return True  # alone it always runs; one that cannot fit the pool at all fails in schedule()
        available = self.pool.num_free + (self.prefix_cache.evictable() if self.prefix_cache else 0)
        need = uncached + (0 if self.handoff else min(seq.remaining_new_tokens, self.new_token_estimate))
        reserved = sum(self._future_need(s) for s in self.running)
        return available - reserved >= need

    def _admit(self, seq: Sequence) -> None:
        seq.slot = self.table.alloc_slot()
        seq.num_computed = 0
        if self.prefix_cache is not None:
            indices = self.prefix_cache.acquire(seq.rid, seq.cache_key(seq.total_len - 1))
            if indices is not None and indices.numel():
                self.table.table[seq.slot, :indices.numel()] = indices
                seq.num_computed = indices.numel()
                if seq.num_cached == 0:
                    seq.num_cached = seq.num_computed
        seq.mark_admitted()
        self.running.append(seq)

    def _preempt_newest(self) -> bool:
        if len(self.running) <= 1:
            return False
        victim = max(self.running, key=lambda s: s.admission_order)
        logger.info("preempting request %s (KV pool full); it will be recomputed", victim.rid)
        self._release_kv(victim, cache=False)
        self.running.remove(victim)
        victim.status = SeqStatus.WAITING
        victim.num_computed = 0
        self.waiting.appendleft(victim)
        self.num_preemptions += 1
        return True

    def _drop_oversized(self, chunk: ScheduledChunk) -> bool:
        """A lone request that cannot fit the whole pool fails instead of blocking everyone forever."""
        self._finish(chunk.seq, "abort")
        self._failed.append((chunk.seq, EngineError("client", "request needs more KV cache than the server's pool "
                                                              f"holds ({self.pool.size} tokens)")))
        return False

    # ------------------------------------------------------------------------------------ results

    def fail_step(self, plan: list[ScheduledChunk], error: EngineError) -> list[TokenOutput]:
        """The model step for `plan` raised: end its requests, returning every KV slot they hold, the ones
        allocated for this step included (their contents were never computed, so nothing is cached)."""
        outputs = []
        for chunk in plan:
            seq = chunk.seq
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.running.remove(seq)
            seq.status, seq.finish_reason = SeqStatus.FINISHED, "abort"
            self._release_kv(seq, cache=False, held=chunk.start + chunk.num_tokens)
            outputs.append(TokenOutput(seq.rid, None, finished=True, finish_reason="abort",
                                       prompt_tokens=len(seq.prompt_ids), error=error))
        return outputs

    def process_results(self, plan: list[ScheduledChunk], sampled: dict[str, SampledToken]) -> list[TokenOutput]:
        outputs = [TokenOutput(seq.rid, None, finished=True, finish_reason="abort", prompt_tokens=len(seq.prompt_ids),
                               error=error) for seq, error in self._failed]
        self._failed.clear()
        for chunk in plan:
            seq = chunk.seq
            if seq.status is not SeqStatus.RUNNING:
                continue
            seq.num_computed = chunk.start + chunk.num_tokens
            if self.prefix_cache is not None and chunk.start < len(seq.prompt_ids):
                # the prompt computed so far is shareable now, not only when this request ends
                self.prefix_cache.publish(seq.rid, seq.cache_key(seq.num_computed),
                                          self.table.table[seq.slot, :seq.num_computed])
            if not chunk.samples:
                continue
            outputs.extend(self._emit(chunk, sampled[seq.rid]))
        return outputs

    def _emit(self, chunk: ScheduledChunk, token: SampledToken) -> list[TokenOutput]:
        """Append the step's new tokens (verified draft tokens, then the sampled one) until one finishes the
        request. KV computed for draft tokens that were rejected (or come after the end) is released."""
        seq = chunk.seq
        if chunk.draft:
            self.draft_stats["proposed"] += len(chunk.draft)
            self.draft_stats["accepted"] += len(token.accepted)
            valid = chunk.start + 1 + len(token.accepted)  # the pending token and the accepted drafts
            self._trim_kv(seq, valid, chunk.start + chunk.num_tokens)
        outputs = []
        for i, token_id in enumerate([*token.accepted, token.token_id]):
            last = i == len(token.accepted)
            seq.append_token(token_id)
            reason, stop_token = self._finish_reason(seq, token_id)
            out = TokenOutput(seq.rid, token_id, token.logprob if last else None, token.top_logprobs if last else None,
                              prompt_tokens=len(seq.prompt_ids), cached_tokens=seq.num_cached, stop_token=stop_token)
            outputs.append(out)
            if reason is not None:
                if not last:  # the drafts after this one were computed for nothing
                    self._trim_kv(seq, chunk.start + 2 + i, seq.num_computed)
                out.finished, out.finish_reason = True, reason
                self._finish(seq, reason)
                break
        if self.handoff and seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)  # its decode runs on a decode node: park the prompt's KV for the transfer
            self.parked[seq.rid] = seq
        return outputs

    # ------------------------------------------------------------------------------------ PD handoff

    def release_parked(self, rid: str, cache: bool = True) -> bool:
        """Prefill node: free a parked request's KV (its prompt stays in the prefix cache when `cache`)."""
        seq = self.parked.pop(rid, None)
        if seq is None:
            return False
        seq.status = SeqStatus.FINISHED
        self._release_kv(seq, cache=cache)
        return True

    def reserve(self, seq: Sequence, num_tokens: int) -> tuple[torch.Tensor, int] | None:
        """Decode node: room for `seq`, whose first `num_tokens` positions' KV was computed on a prefill node: a
        table slot, the prefix this node's cache already holds (locked for `seq`) and new rows for the rest
        (evicting cached prefixes if need be). Returns (the new rows, how many positions the cache serves), or
        None when there is no room."""
        if not self._has_room():
            return None
        skip = 0
        cached = None
        if self.prefix_cache is not None:
            cached = self.prefix_cache.acquire(seq.rid, seq.cache_key(num_tokens - 1))
            skip = cached.numel() if cached is not None else 0
        need = num_tokens - skip
        reserved = sum(self._future_need(s) for s in self.running)
        evictable = self.prefix_cache.evictable() if self.prefix_cache else 0
        if self.pool.num_free + evictable - reserved < need:
            self._unlock(seq)
            return None
        if need > self.pool.num_free:
            self.prefix_cache.evict(need - self.pool.num_free)
        seq.slot = self.table.alloc_slot()
        rows = self.pool.alloc(need)
        if skip:
            self.table.table[seq.slot, :skip] = cached
        self.table.table[seq.slot, skip:num_tokens] = rows
        return rows, skip

    def unreserve(self, seq: Sequence, rows: torch.Tensor) -> None:
        """Give back what `reserve` took (the receive failed or the request was aborted)."""
        self._unlock(seq)
        self.pool.free(rows)
        self.table.free_slot(seq.slot)
        seq.slot = None

    def _unlock(self, seq: Sequence) -> None:
        """Release `seq`'s lock on the cached prefix it acquired (nothing inserted, nothing to free)."""
        if self.prefix_cache is not None:
            self.prefix_cache.release(seq.rid, [], self.table.table[0, :0], insert=False)

    def adopt(self, seq: Sequence, num_tokens: int) -> None:
        """Decode node: run `seq`, reserved with its first `num_tokens` positions' KV now in place, from its next
        token on."""
        seq.num_computed = num_tokens
        seq.mark_admitted()
        self.running.append(seq)

    def _trim_kv(self, seq: Sequence, keep: int, held: int) -> None:
        """Free the KV of positions [keep, held) (speculative tokens not kept); the sequence computed `keep`."""
        if held > keep:
            self.pool.free(self.table.table[seq.slot, keep:held].clone())
        seq.num_computed = keep

    def _finish_reason(self, seq: Sequence, token_id: int) -> tuple[str | None, bool]:
        """The one place a request's end is decided from its tokens (stop strings, which need text, are the
        API's): (finish reason or None, whether `token_id` is the stop token that ended it)."""
        params = seq.params
        n_out = seq.num_output_tokens
        if n_out >= params.min_new_tokens:
            if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids):
                return "stop", True
        if seq.grammar is not None and seq.grammar.is_terminated():
            return "stop", False
        if n_out >= params.max_new_tokens or seq.total_len >= self.max_model_len:
            return "length", False
        return None, False

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        self._release_kv(seq, cache=reason != "abort")

    def _release_kv(self, seq: Sequence, cache: bool, held: int | None = None) -> None:
        """Give back the request's KV: its first `held` table entries (default: the computed ones)."""
        if seq.slot is None:
            return
        held = seq.num_computed if held is None else held
        indices = self.table.table[seq.slot, :held].clone()
        if self.prefix_cache is not None:
            # The cache keeps what it can reuse and returns the indices nobody references any more.
            indices = self.prefix_cache.release(seq.rid, seq.cache_key(held), indices, insert=cache)
        self.pool.free(indices)
        self.table.free_slot(seq.slot)
        seq.slot = None
