"""The scheduler's PD handoff without a model (engine/scheduler.py): a prefill node parks a request's prompt KV
after its first token and admits new work only as far as parked KV allows; a decode node reserves rows for a
prompt computed elsewhere and decodes from the next token."""

from __future__ import annotations

import torch

from lightllm.engine.sequence import SeqStatus
from tests.test_scheduler import FILLER, make_scheduler, seq, step


def test_prefill_node_parks_after_the_first_token_and_frees_on_release():
    s = make_scheduler(64, prefix_cache=True)
    s.handoff = True
    s.add(seq("a", 20, max_new_tokens=50))
    _, outputs = step(s)
    assert [(o.rid, o.token_id, o.finished) for o in outputs] == [("a", FILLER, False)]
    assert not s.has_work() and list(s.parked) == ["a"] and s.pool.num_used == 20  # the prompt's KV, held
    assert s.release_parked("a") and not s.parked
    assert s.pool.num_used == s.prefix_cache.evictable() == 20  # kept by the prefix cache, evictable
    s.add(seq("b", 20, max_new_tokens=50))  # the same prompt: served by the cache
    _, outputs = step(s)
    assert outputs[0].cached_tokens == 19


def test_prefill_node_waits_for_parked_kv_instead_of_failing_a_request():
    s = make_scheduler(40)
    s.handoff = True
    s.add(seq("a", 30, max_new_tokens=50))
    step(s)
    s.add(seq("b", 30, max_new_tokens=50))
    plan, outputs = step(s)
    assert plan == [] and outputs == [] and s.waiting  # waits: no "needs more KV than the pool" refusal
    assert s.abort("a") and s.pool.num_used == 0  # an abort frees parked KV too
    _, outputs = step(s)
    assert [(o.rid, o.finished) for o in outputs] == [("b", False)] and list(s.parked) == ["b"]


def test_a_request_that_ends_on_its_first_token_is_not_parked():
    s = make_scheduler(64)
    s.handoff = True
    s.add(seq("a", 10, max_new_tokens=1))
    _, outputs = step(s)
    assert outputs[0].finished and outputs[0].finish_reason == "length" and not s.parked and s.pool.num_used == 0


def test_decode_node_reserves_adopts_and_decodes_from_the_next_token():
    s = make_scheduler(40)
    r = seq("a", 20, max_new_tokens=3)
    r.append_token(FILLER)  # the prefill node's first token
    rows, skip = s.reserve(r, 20)
    assert rows.numel() == 20 and skip == 0 and s.pool.num_used == 20
    assert torch.equal(s.table.table[r.slot, :20], rows)
    assert s.reserve(seq("b", 30), 30) is None  # no room: the node answers 503
    s.adopt(r, 20)
    plan, outputs = step(s)
    assert [(c.seq.rid, c.start, c.num_tokens) for c in plan] == [("a", 20, 1)]  # the first token's KV, no prompt
    step(s)
    assert r.status is SeqStatus.FINISHED and r.num_output_tokens == 3 and s.pool.num_used == 0
    other = seq("c", 10)
    other.append_token(FILLER)
    rows, _ = s.reserve(other, 10)
    s.unreserve(other, rows)
    assert s.pool.num_used == 0 and s.table.num_free_slots == 8


def test_decode_node_takes_a_prefix_it_holds_from_its_own_cache():
    s = make_scheduler(64, prefix_cache=True)
    first = seq("a", 20, max_new_tokens=2)
    first.append_token(FILLER)
    rows, skip = s.reserve(first, 20)
    s.adopt(first, 20)
    while s.has_work():
        step(s)
    assert s.prefix_cache.evictable() == s.pool.num_used > 20  # prompt and output cached
    again = seq("b", list(range(100, 120)) + [5, 6, 7], max_new_tokens=2)  # the same 20 tokens, then others
    again.append_token(FILLER)
    rows, skip = s.reserve(again, 23)
    assert skip == 20 and rows.numel() == 3  # only the new tokens move
    assert s.prefix_cache.evictable() < s.pool.num_used  # the cached prefix is locked while it is in use
    s.unreserve(again, rows)  # a failed receive: the lock goes, the cache keeps the prefix
    assert s.prefix_cache.evictable() == s.pool.num_used
    rows, skip = s.reserve(again, 23)
    s.adopt(again, 23)
    plan, _ = step(s)
    assert [(c.seq.rid, c.start) for c in plan] == [("b", 23)]
    while s.has_work():
        step(s)
    assert s.prefix_cache.evictable() == s.pool.num_used  # nothing leaked
