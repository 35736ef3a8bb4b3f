"""The scheduler alone, without a model: admission by KV budget, chunked prefill, preemption and
recomputation, cache-aware admission order, eviction, and every finish reason.

A "step" here is what the engine does around the model: schedule(), then process_results() with one
sampled token for each chunk that reaches the end of its sequence's tokens. The KV pool is the real
allocator with no layers (indices only, no tensors to fill)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightllm.engine.kv_cache import ReqToTokenTable, TokenKVPool
from lightllm.engine.prefix_cache import PrefixCache
from lightllm.engine.protocol import SamplingParams, TokenOutput
from lightllm.engine.scheduler import MAX_PASSED_OVER, SampledToken, ScheduledChunk, Scheduler
from lightllm.engine.sequence import Sequence, SeqStatus

EOS = 2
FILLER = 7  # what the fake model samples unless a test says otherwise
Sampler = Callable[[Sequence], int]


def make_scheduler(pool_size: int, *, batch_max_tokens: int = 256, chunked_prefill: bool = False,
                   chunked_prefill_size: int = 64, running_max_req_size: int = 8, max_model_len: int = 512,
                   new_token_estimate: int = 512, prefix_cache: bool = False) -> Scheduler:
    pool = TokenKVPool(pool_size, num_layers=0, num_kv_heads=1, head_dim=1, dtype=torch.float32,
                       device=torch.device("cpu"))
    table = ReqToTokenTable(running_max_req_size, max_model_len + 8, torch.device("cpu"))
    return Scheduler(pool, table, batch_max_tokens=batch_max_tokens, chunked_prefill_size=chunked_prefill_size,
                     chunked_prefill=chunked_prefill, running_max_req_size=running_max_req_size,
                     max_model_len=max_model_len, eos_token_ids=[EOS], new_token_estimate=new_token_estimate,
                     prefix_cache=PrefixCache(pool) if prefix_cache else None)


def seq(rid: str, prompt: list[int] | int, **params) -> Sequence:
    """A request; an int prompt means that many distinct tokens (100, 101, ...)."""
    ids = prompt if isinstance(prompt, list) else [100 + i for i in range(prompt)]
    return Sequence(rid, ids, SamplingParams(**params))


def step(s: Scheduler, sample: Sampler = lambda _: FILLER) -> tuple[list[ScheduledChunk], list[TokenOutput]]:
    plan = s.schedule()
    sampled = {c.seq.rid: SampledToken(sample(c.seq)) for c in plan if c.samples}
    return plan, s.process_results(plan, sampled)


def run_to_end(s: Scheduler, sample: Sampler = lambda _: FILLER, check: Callable[[Scheduler], None] | None = None,
               plans: list | None = None, max_steps: int = 1000) -> dict[str, list[TokenOutput]]:
    """Step until no work is left; returns each request's outputs (and appends each step's plan to `plans`)."""
    outputs: dict[str, list[TokenOutput]] = {}
    for _ in range(max_steps):
        if not s.has_work():
            return outputs
        plan, step_outputs = step(s, sample)
        if plans is not None:
            plans.append([(c.seq.rid, c.start, c.num_tokens) for c in plan])
        for out in step_outputs:
            outputs.setdefault(out.rid, []).append(out)
        if check is not None:
            check(s)
    raise AssertionError(f"the scheduler did not finish its work in {max_steps} steps")


def kv_held_by_requests(s: Scheduler) -> int:
    return sum(q.num_computed for q in s.running)


# ---------------------------------------------------------------------------------------------- admission


def test_admission_reserves_each_requests_future_tokens():
    # 100 KV tokens; each request needs 30 for its prompt and reserves 10 for its output (the estimate).
    s = make_scheduler(100, new_token_estimate=10)
    for rid in "abc":
        s.add(seq(rid, 30, max_new_tokens=50))
    plan, _ = step(s)
    # a: alone, always runs; b: 100 - 40 reserved >= 40, runs; c: 100 - 80 < 40, waits
    assert [(c.seq.rid, c.num_tokens) for c in plan] == [("a", 30), ("b", 30)]
    assert [q.rid for q in s.waiting] == ["c"] and s.waiting[0].status is SeqStatus.WAITING
    assert s.pool.num_used == 60 == kv_held_by_requests(s)


def test_admission_stops_at_the_running_limit_and_the_step_budget():
    s = make_scheduler(1000, running_max_req_size=2)
    for rid in "abc":
        s.add(seq(rid, 5, max_new_tokens=4))
    assert [c.seq.rid for c in step(s)[0]] == ["a", "b"]  # two request slots
    assert [q.rid for q in s.waiting] == ["c"]

    # Without chunked prefill a prompt that does not fit the rest of the step's token budget waits for a
    # step with room (decodes go first, 1 token each); one over the whole budget runs alone, whole.
    s = make_scheduler(1000, batch_max_tokens=64)
    s.add(seq("a", 40, max_new_tokens=4))
    s.add(seq("b", 30, max_new_tokens=4))
    s.add(seq("c", 100, max_new_tokens=4))
    plans: list = []
    run_to_end(s, plans=plans)
    assert plans[0] == [("a", 0, 40)]
    assert plans[1] == [("a", 40, 1), ("b", 0, 30)]
    assert [("c", 0, 100)] in plans and all(len(p) == 1 for p in plans if ("c", 0, 100) in p)


def test_chunked_prefill_splits_prompts_by_chunk_size_and_budget_and_samples_once():
    s = make_scheduler(1000, batch_max_tokens=48, chunked_prefill=True, chunked_prefill_size=32)
    s.add(seq("a", 70, max_new_tokens=3))
    s.add(seq("b", 10, max_new_tokens=3))
    steps = []
    while s.has_work():
        plan, outputs = step(s)
        steps.append(([(c.seq.rid, c.start, c.num_tokens) for c in plan], [o.rid for o in outputs]))
    assert steps[0] == ([("a", 0, 32), ("b", 0, 10)], ["b"])  # b's whole prompt fits: it samples
    assert steps[1] == ([("b", 10, 1), ("a", 32, 32)], ["b"])  # decodes first
    assert steps[2] == ([("b", 11, 1), ("a", 64, 6)], ["b", "a"])  # a's last chunk samples
    assert sum(len(out) for _, out in steps) == 6 and s.pool.num_used == 0


# ---------------------------------------------------------------------------------------------- preemption


def test_preemption_frees_the_newest_and_recomputes_it_without_re_emitting():
    # Two 10-token prompts that each grow to 30 tokens share a 40-token pool: admission (reserving 1 future
    # token each) lets both in, and once the pool is full the newer one is preempted, once.
    s = make_scheduler(40, new_token_estimate=1)
    s.add(seq("old", 10, max_new_tokens=20))
    s.add(seq("new", 10, max_new_tokens=20))
    first_preemption = []

    def check(sched: Scheduler) -> None:
        assert sched.pool.num_used == kv_held_by_requests(sched) <= 40  # nothing leaks, nothing is shared
        if sched.num_preemptions and not first_preemption:
            first_preemption.append([q.rid for q in sched.waiting])
            victim = sched.waiting[0]
            assert victim.status is SeqStatus.WAITING and victim.num_computed == 0 and victim.slot is None
            assert len(victim.output_ids) == 11  # what it emitted stays; it resumes from prompt + output

    counter = iter(range(10 ** 6))
    plans: list = []
    outputs = run_to_end(s, sample=lambda _: 1000 + next(counter), check=check, plans=plans)
    assert s.num_preemptions == 1 and first_preemption == [["new"]]
    assert ("new", 0, 21) in sum(plans, [])  # re-admitted: prompt + its 11 outputs recomputed in one chunk
    for rid in ("old", "new"):
        tokens = [o.token_id for o in outputs[rid]]
        assert len(tokens) == 20 and len(set(tokens)) == 20  # every token emitted once, none repeated
        assert [o.finished for o in outputs[rid]] == [False] * 19 + [True]
        assert outputs[rid][-1].finish_reason == "length"
    assert s.pool.num_free == 40 and s.table.num_free_slots == 8


def test_a_lone_request_larger_than_the_pool_fails_as_a_client_error():
    s = make_scheduler(16)
    s.add(seq("huge", 20, max_new_tokens=2))
    plan, outputs = step(s)
    assert plan == [] and len(outputs) == 1
    out = outputs[0]
    assert out.finished and out.finish_reason == "abort" and out.token_id is None
    assert out.error is not None and out.error.kind == "client" and "16 tokens" in out.error.message
    assert not s.has_work() and s.pool.num_free == 16 and s.table.num_free_slots == 8


# ---------------------------------------------------------------------------------------------- prefix cache


SHARED = [500 + i for i in range(40)]


def warm_cache(s: Scheduler) -> None:
    """A finished request leaves its 41-token prompt, SHARED + [1], in the cache."""
    s.add(seq("warmup", SHARED + [1], max_new_tokens=1))
    run_to_end(s)
    assert s.prefix_cache.match_len(SHARED) == 40 and s.prefix_cache.total_tokens == 41


def test_cache_aware_admission_takes_cached_prefixes_first():
    s = make_scheduler(1000, batch_max_tokens=4, chunked_prefill=True, chunked_prefill_size=4, prefix_cache=True)
    warm_cache(s)
    s.add(seq("cold", 30, max_new_tokens=1))  # arrives first, needs 30 new tokens
    s.add(seq("warm1", SHARED + [11], max_new_tokens=1))  # arrive later, need 1 each
    s.add(seq("warm2", SHARED + [12], max_new_tokens=1))
    plan, outputs = step(s)
    assert [(c.seq.rid, c.start, c.num_tokens) for c in plan] == [("warm1", 40, 1), ("warm2", 40, 1), ("cold", 0, 2)]
    assert {o.rid: o.cached_tokens for o in outputs} == {"warm1": 40, "warm2": 40}


def test_cached_arrivals_overtake_a_cold_request_at_most_max_passed_over_times():
    s = make_scheduler(1000, batch_max_tokens=2, chunked_prefill=True, chunked_prefill_size=2, prefix_cache=True)
    warm_cache(s)
    s.add(seq("cold", 30, max_new_tokens=1))
    admitted_at = None
    for n in range(3 * MAX_PASSED_OVER):  # each step two new requests arrive that need 1 token each
        s.add(seq(f"warm{n}a", SHARED + [1000 + 2 * n], max_new_tokens=1))
        s.add(seq(f"warm{n}b", SHARED + [1001 + 2 * n], max_new_tokens=1))
        plan, _ = step(s)
        if any(c.seq.rid == "cold" for c in plan):
            admitted_at = n
            break
    assert admitted_at == MAX_PASSED_OVER


def test_eviction_makes_room_before_anyone_is_preempted():
    s = make_scheduler(64, new_token_estimate=1, prefix_cache=True)
    warm_cache(s)
    assert s.pool.num_free == 64 - 41
    s.add(seq("a", [1] + [300 + i for i in range(19)], max_new_tokens=10))
    s.add(seq("b", [2] + [300 + i for i in range(19)], max_new_tokens=10))
    plans: list = []
    outputs = run_to_end(s, plans=plans)
    assert plans[0] == [("a", 0, 20), ("b", 0, 20)]  # the cache's idle tokens count as room for admission
    assert s.num_preemptions == 0 and s.prefix_cache.match_len(SHARED) == 0  # the idle prefix went instead
    assert [len(outputs[rid]) for rid in "ab"] == [10, 10]


# ---------------------------------------------------------------------------------------------- finish reasons


def finish(s: Scheduler, request: Sequence, tokens: list[int]) -> list[TokenOutput]:
    """Run `request` alone with the model sampling `tokens` in order; its outputs."""
    s.add(request)
    script = iter(tokens)
    return run_to_end(s, sample=lambda _: next(script))[request.rid]


def test_finish_reasons_decided_from_tokens():
    s = make_scheduler(1000, max_model_len=64)
    out = finish(s, seq("eos", 5, max_new_tokens=10), [5, 6, EOS, 9])
    assert [o.token_id for o in out] == [5, 6, EOS] and out[-1].finish_reason == "stop" and out[-1].stop_token

    out = finish(s, seq("min", 5, max_new_tokens=10, min_new_tokens=3), [EOS, EOS, EOS, 9])
    assert len(out) == 3 and out[-1].finish_reason == "stop"  # EOS before the minimum does not end it
    assert not any(o.finished for o in out[:-1])

    out = finish(s, seq("ignore", 5, max_new_tokens=4, ignore_eos=True), [EOS] * 4)
    assert len(out) == 4 and out[-1].finish_reason == "length" and not out[-1].stop_token

    out = finish(s, seq("stop_id", 5, max_new_tokens=10, stop_token_ids=[42]), [5, 42, 6])
    assert [o.token_id for o in out] == [5, 42] and out[-1].finish_reason == "stop" and out[-1].stop_token

    out = finish(s, seq("length", 5, max_new_tokens=3), [5, 6, 7, 8])
    assert len(out) == 3 and out[-1].finish_reason == "length"

    out = finish(s, seq("context", 60, max_new_tokens=100), [5] * 10)
    assert len(out) == 4 and out[-1].finish_reason == "length"  # the model's context (64) ends it

    class DoneAfterTwoTokens:  # a grammar matcher that accepts after two tokens
        def __init__(self) -> None:
            self.calls = 0

        def is_terminated(self) -> bool:
            self.calls += 1
            return self.calls >= 2

    constrained = seq("grammar", 5, max_new_tokens=10)
    constrained.grammar = DoneAfterTwoTokens()
    out = finish(s, constrained, [5, 6, 7])
    assert len(out) == 2 and out[-1].finish_reason == "stop" and not out[-1].stop_token
    assert s.pool.num_free == 1000 and s.table.num_free_slots == 8


def test_abort_ends_waiting_and_running_requests_and_returns_their_kv():
    s = make_scheduler(100, running_max_req_size=1)
    s.add(seq("running", 10, max_new_tokens=10))
    s.add(seq("waiting", 10, max_new_tokens=10))
    step(s)
    assert s.pool.num_used == 10 and [q.rid for q in s.running] == ["running"]
    assert s.abort("waiting") and s.abort("running") and not s.abort("unknown")
    assert not s.has_work() and s.pool.num_free == 100 and s.table.num_free_slots == 1
