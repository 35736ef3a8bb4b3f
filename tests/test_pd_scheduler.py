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
    slot, rows = s.reserve(20)
    assert rows.numel() == 20 and s.pool.num_used == 20
    assert s.reserve(30) is None  # no room: the node answers 503
    r = seq("a", 20, max_new_tokens=3)
    r.append_token(FILLER)  # the prefill node's first token
    s.adopt(r, slot, rows)
    plan, outputs = step(s)
    assert [(c.seq.rid, c.start, c.num_tokens) for c in plan] == [("a", 20, 1)]  # the first token's KV, no prompt
    assert torch.equal(s.table.table[slot, :20], rows)
    step(s)
    assert r.status is SeqStatus.FINISHED and r.num_output_tokens == 3 and s.pool.num_used == 0
    slot, rows = s.reserve(10)
    s.unreserve(slot, rows)
    assert s.pool.num_used == 0 and s.table.num_free_slots == 8
