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
