"""Prefix (radix) cache and scheduler admission as pure logic, plus reuse inside the engine."""

from __future__ import annotations

import torch

from lightllm.engine.engine import Engine
from lightllm.engine.kv_cache import TokenKVPool
from lightllm.engine.prefix_cache import PrefixCache
from lightllm.engine.protocol import AddRequest, EngineConfig, SamplingParams
from tests.conftest import build_tiny_model


def make_pool(n: int = 64) -> TokenKVPool:
    return TokenKVPool(n, num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))


def test_insert_match_split_and_release():
    pool = make_pool()
    cache = PrefixCache(pool)
    a = [1, 2, 3, 4, 5]
    idx_a = pool.alloc(5)
    assert cache.acquire("a", a) is None
    assert cache.release("a", a, idx_a, insert=True).numel() == 0  # all of it now belongs to the cache
    assert cache.match_len([1, 2, 3, 9]) == 3 and cache.total_tokens == 5
    got = cache.acquire("b", [1, 2, 3, 9])
    assert torch.equal(got, idx_a[:3])
    assert cache.evictable() == 2  # the locked 3-token prefix cannot go, the split-off tail can
    b_tail = pool.alloc(1)
    freed = cache.release("b", [1, 2, 3, 9], torch.cat([got, b_tail]), insert=True)
    assert freed.numel() == 0 and cache.total_tokens == 6
    assert pool.num_used == 6


def test_duplicates_are_returned_and_eviction_is_lru():
    pool = make_pool()
    cache = PrefixCache(pool)
    ids = [7, 8, 9]
    first, second = pool.alloc(3), pool.alloc(3)
    cache.acquire("x", ids)
    cache.acquire("y", ids)  # both computed the same tokens independently
    assert cache.release("x", ids, first, insert=True).numel() == 0
    dup = cache.release("y", ids, second, insert=True)
    assert torch.equal(dup, second)  # the caller frees the duplicate copy
    pool.free(dup)
    other = pool.alloc(2)
    cache.acquire("z", [5, 6])
    cache.release("z", [5, 6], other, insert=True)
    cache.match_len([7])  # lookups do not refresh; acquire does
    assert cache.evict(2) >= 2
    assert cache.match_len([7, 8, 9]) == 0 and cache.match_len([5, 6]) == 2  # oldest went first
    assert cache.clear() == 2 and pool.num_used == 0


def test_engine_reuses_prefix_and_matches_uncached_output(tmp_path):
    model_dir = build_tiny_model(tmp_path / "llama", "llama")
    shared = list(range(10, 60))

    def run(disable: bool) -> tuple[list[list[int]], list[int]]:
        engine = Engine(EngineConfig(model_path=str(model_dir), max_total_token_num=400, grammar_backend="none",
                                     disable_dynamic_prompt_cache=disable))
        outputs, cached = [], []
        for i in range(3):
            engine.add_request(AddRequest(str(i), shared + [100 + i, 101], SamplingParams(max_new_tokens=6,
                                                                                          temperature=0.0)))
            tokens = []
            while engine.scheduler.has_work():
                for out in engine.step():
                    tokens.append(out.token_id)
                    cached.append(out.cached_tokens)
            outputs.append(tokens)
        if not disable:
            assert engine.pool.num_used == engine.prefix_cache.evictable()
        return outputs, cached

    with_cache, cached = run(False)
    without, _ = run(True)
    assert with_cache == without
    assert max(cached) >= len(shared)


def test_scheduler_never_readmits_a_request_it_just_preempted(tmp_path):
    """A pool that holds one request's growth at a time: requests take turns, none starves, all finish."""
    model_dir = build_tiny_model(tmp_path / "llama", "llama")
    engine = Engine(EngineConfig(model_path=str(model_dir), max_total_token_num=60, grammar_backend="none",
                                 router_max_new_token_len=1))
    for i in range(4):
        engine.add_request(AddRequest(str(i), [5 + i] * 20, SamplingParams(max_new_tokens=25, temperature=0.0,
                                                                         ignore_eos=True)))
    counts: dict[str, int] = {}
    for _ in range(2000):
        if not engine.scheduler.has_work():
            break
        for out in engine.step():
            assert out.error is None, out.error
            counts[out.rid] = counts.get(out.rid, 0) + 1
    assert counts == {str(i): 25 for i in range(4)}
    assert engine.scheduler.num_preemptions > 0


def test_publish_moves_the_lock_and_keeps_ownership_clear():
    pool = make_pool()
    cache = PrefixCache(pool)
    ids = [1, 2, 3, 4, 5, 6]
    row = pool.alloc(6)
    assert cache.acquire("a", ids) is None
    cache.publish("a", ids[:3], row[:3])  # first prefill chunk
    assert cache.match_len(ids) == 3 and cache.evictable() == 0  # shared now, and locked by "a"
    cache.publish("a", ids[:5], row[:5])
    assert cache.match_len(ids) == 5 and torch.equal(cache.acquire("b", ids[:5] + [99]), row[:5])
    assert cache.release("b", ids[:5], row[:5], insert=False).numel() == 0  # b owned nothing
    freed = cache.release("a", ids, row, insert=True)
    assert freed.numel() == 0 and cache.total_tokens == 6 and pool.num_used == 6


def test_publish_after_divergence_keeps_copies_private():
    pool = make_pool()
    cache = PrefixCache(pool)
    ids = [1, 2, 3, 4]
    a_row, b_row = pool.alloc(4), pool.alloc(4)
    cache.acquire("a", ids)
    cache.acquire("b", ids)
    cache.publish("a", ids, a_row)
    cache.publish("b", ids, b_row)  # a cached the same tokens first: b's copies stay b's
    assert cache.match_len(ids) == 4
    duplicates = cache.release("b", ids, b_row, insert=True)
    assert torch.equal(duplicates, b_row)  # all duplicates: the caller frees them
    pool.free(duplicates)
    assert cache.release("a", ids, a_row, insert=True).numel() == 0
    assert pool.num_used == 4 and cache.evictable() == 4


def test_requests_sharing_a_prefix_compute_it_once_with_identical_output(tmp_path):
    """Three requests with one 120-token prefix arrive together; with the cache on, the ones after the first
    wait while it is computed and then reuse it: every prompt token is computed once, and greedy outputs
    equal the run without the prefix cache."""
    model_dir = build_tiny_model(tmp_path / "llama", "llama")
    shared = [(7 * i) % 200 + 10 for i in range(120)]

    def run(disable: bool) -> tuple[dict[str, list[int]], int, dict[str, int]]:
        engine = Engine(EngineConfig(model_path=str(model_dir), max_total_token_num=2000, grammar_backend="none",
                                     chunked_prefill_size=32, disable_dynamic_prompt_cache=disable,
                                     kv_cache_dtype="fp32"))
        computed = {"tokens": 0}
        execute = engine.runner.execute

        def counting(plan):
            computed["tokens"] += sum(c.num_tokens for c in plan)
            return execute(plan)

        engine.runner.execute = counting
        for i in range(3):
            engine.add_request(AddRequest(str(i), shared + [220 + i, 221], SamplingParams(
                max_new_tokens=5, temperature=0.0, ignore_eos=True)))
        outputs: dict[str, list[int]] = {}
        cached: dict[str, int] = {}
        while engine.scheduler.has_work():
            for out in engine.step():
                outputs.setdefault(out.rid, []).append(out.token_id)
                cached[out.rid] = out.cached_tokens
        return outputs, computed["tokens"], cached

    with_cache, computed_with, cached = run(False)
    without, computed_without, _ = run(True)
    assert with_cache == without
    assert computed_without == 3 * (122 + 4)  # prompt + 4 decode steps each
    assert computed_with == 122 + 2 * 2 + 3 * 4  # the prefix once, the two distinct tails, the decodes
    assert cached["0"] == 0 and cached["1"] == cached["2"] == 120


def test_eviction_never_frees_a_prefix_published_by_a_running_request():
    pool = make_pool(16)
    cache = PrefixCache(pool)
    old = [9, 9, 9, 9]
    old_row = pool.alloc(4)
    cache.acquire("old", old)
    cache.release("old", old, old_row, insert=True)  # finished: cached and unlocked
    ids = [1, 2, 3, 4, 5, 6]
    row = pool.alloc(6)
    cache.acquire("a", ids)
    cache.publish("a", ids[:4], row[:4])  # in flight
    assert cache.evict(100) == 4 and cache.match_len(old) == 0  # only the finished request's tokens go
    assert cache.match_len(ids) == 4 and pool.num_used == 6
    cache.acquire("b", ids[:4] + [7])  # a second request shares the in-flight prefix
    assert cache.release("a", ids[:4], row[:4], insert=False).numel() == 0  # a aborted: b still holds it
    assert cache.evict(100) == 0 and cache.match_len(ids) == 4
    cache.release("b", ids[:4], row[:4], insert=False)
    assert cache.evict(100) == 4 and pool.num_used == 2  # a's unpublished tail is the caller's to free


def _admitted(engine, rid: str) -> bool:
    return all(seq.rid != rid for seq in engine.scheduler.waiting)


def _steps_until_admitted(model_dir, max_passed_over: int, monkeypatch) -> tuple[int, list[str]]:
    """A burst of short requests whose 64-token prefix is cached keeps arriving (20 per step, 2 new tokens
    each) behind one uncached 60-token request, with a step budget of 32 tokens: returns the steps the
    uncached request waited and whether it was admitted in the first step."""
    from lightllm.engine import scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "MAX_PASSED_OVER", max_passed_over)
    engine = Engine(EngineConfig(model_path=str(model_dir), max_total_token_num=4000, grammar_backend="none",
                                 batch_max_tokens=32, chunked_prefill_size=32, kv_cache_dtype="fp32"))
    prefix = [(5 * i) % 200 + 20 for i in range(64)]
    params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    engine.add_request(AddRequest("warm", prefix + [3], params))
    while engine.scheduler.has_work():
        engine.step()
    engine.add_request(AddRequest("uncached", [(11 * i) % 200 + 30 for i in range(60)], params))
    first_step: list[str] = []
    for step in range(1, 40):
        rids = [f"s{step}-{j}" for j in range(20)]
        for j, rid in enumerate(rids):
            engine.add_request(AddRequest(rid, prefix + [(20 * step + j) % 250 + 1, 7], params))
        engine.step()
        if step == 1:
            first_step = [rid for rid in rids + ["uncached"] if _admitted(engine, rid)]
        if _admitted(engine, "uncached"):
            return step, first_step
    return 40, first_step


def test_cache_aware_admission_prefers_cached_prefixes_with_bounded_wait(tmp_path, monkeypatch):
    from lightllm.engine.scheduler import MAX_PASSED_OVER

    model_dir = build_tiny_model(tmp_path / "llama", "llama")
    waited, first_step = _steps_until_admitted(model_dir, MAX_PASSED_OVER, monkeypatch)
    # The requests that need 2 new tokens go first although they arrived later ...
    assert "uncached" not in first_step and len(first_step) == 16  # 16 x 2 tokens fill the budget
    # ... and the one that needs 60 is overtaken at most MAX_PASSED_OVER times.
    assert 1 < waited <= MAX_PASSED_OVER + 1
    unbounded, _ = _steps_until_admitted(model_dir, 10 ** 6, monkeypatch)
    assert unbounded > MAX_PASSED_OVER + 1  # without the bound the arrivals would keep overtaking it


def _tree_walk(cache: PrefixCache) -> tuple[int, list, int]:
    """What the running counters summarise, recomputed from the whole tree: (tokens in unlocked nodes,
    unlocked leaves, nodes below the root)."""
    evictable, leaves, nodes, stack = 0, [], 0, list(cache.root.children.values())
    while stack:
        node = stack.pop()
        nodes += 1
        if node.ref == 0:
            evictable += len(node.key)
            if not node.children:
                leaves.append(node)
        stack.extend(node.children.values())
    return evictable, leaves, nodes


def _check_counters(cache: PrefixCache) -> None:
    evictable, leaves, nodes = _tree_walk(cache)
    assert cache.evictable() == evictable and cache._nodes == nodes
    current = {id(node) for last_access, _, node in cache._heap
               if node.evictable_leaf and node.last_access == last_access}
    assert all(id(leaf) in current for leaf in leaves)  # every unlocked leaf can be found for eviction
    assert len(cache._heap) <= 2 * nodes + 65  # stale entries do not pile up


def test_running_counters_equal_a_full_tree_walk_under_random_use():
    """Random prompts over a small alphabet (so they share and split prefixes), locked, published, released
    with and without insertion, matched and evicted: the evictable-token counter always equals a walk of the
    tree, every unlocked leaf stays reachable through the heap, and the pool accounts for every token."""
    import random

    rng = random.Random(7)
    pool = make_pool(4096)
    cache = PrefixCache(pool)
    running: dict[str, tuple[list[int], torch.Tensor, int]] = {}  # rid -> (ids, row, tokens it owns privately)
    for step in range(3000):
        op = rng.random()
        if op < 0.35 and len(running) < 12:
            rid = f"r{step}"
            ids = [rng.randrange(4) for _ in range(rng.randrange(1, 24))]
            cached = cache.acquire(rid, ids)
            n_cached = 0 if cached is None else cached.numel()
            need = len(ids) - n_cached
            if need > pool.num_free:
                cache.evict(need - pool.num_free)
            if need > pool.num_free:
                cache.release(rid, ids[:n_cached], cached if cached is not None else pool.alloc(0), insert=False)
                continue
            row = torch.cat([cached, pool.alloc(need)]) if cached is not None else pool.alloc(need)
            running[rid] = (ids, row, n_cached)
            if rng.random() < 0.5:
                cache.publish(rid, ids[:rng.randrange(n_cached, len(ids) + 1)], row)
        elif op < 0.7 and running:
            rid = rng.choice(sorted(running))
            ids, row, _ = running.pop(rid)
            pool.free(cache.release(rid, ids, row, insert=rng.random() < 0.8))
        elif op < 0.85:
            cache.evict(rng.randrange(1, 40))
        else:
            cache.match_len([rng.randrange(4) for _ in range(rng.randrange(1, 24))])
        _check_counters(cache)
        assert cache.total_tokens <= pool.num_used
    for rid, (ids, row, _) in sorted(running.items()):
        pool.free(cache.release(rid, ids, row, insert=True))
    _check_counters(cache)
    assert cache.evictable() == cache.total_tokens == pool.num_used  # nothing locked: all of it can go
    cache.clear()
    assert pool.num_used == 0 and cache.evictable() == 0 and cache._nodes == 0


def test_eviction_takes_the_least_recently_used_leaf_first():
    pool = make_pool()
    cache = PrefixCache(pool)
    for rid, ids in (("a", [1, 2, 3]), ("b", [1, 2, 4]), ("c", [5, 6])):
        row = pool.alloc(len(ids) - cache.match_len(ids))
        cached = cache.acquire(rid, ids)
        pool.free(cache.release(rid, ids, row if cached is None else torch.cat([cached, row]), insert=True))
    cache.acquire("d", [1, 2, 3])  # refreshes [1, 2] and [3]
    cache.release("d", [1, 2, 3], torch.empty(0, dtype=torch.long), insert=False)
    assert cache.evict(1) == 1 and cache.match_len([1, 2, 4]) == 2  # [4] was the oldest leaf
    assert cache.evict(2) == 2 and cache.match_len([5, 6]) == 0  # then [5, 6]
    assert cache.evict(1) == 1 and cache.match_len([1, 2, 3]) == 2  # then [3]; [1, 2] is a leaf now
    _check_counters(cache)
