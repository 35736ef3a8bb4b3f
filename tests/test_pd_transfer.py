"""KV pages between two pools over torch.distributed point-to-point (engine/kv_transfer.py), in one process:
the prefill side's and the decode side's transfer threads meet in their pair's gloo group."""

from __future__ import annotations

import time

import torch

from lightllm.engine.kv_cache import TokenKVPool
from lightllm.engine.kv_transfer import KVTransfer, PairGroups, empty_pages, gather_pages, scatter_pages


def _wait(transfer: KVTransfer, timeout: float = 60.0) -> list:
    deadline = time.time() + timeout
    done: list = []
    while not done and time.time() < deadline:
        done = transfer.poll()
        time.sleep(0.01)
    return done


def test_pages_move_between_pools_as_stored():
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    src = TokenKVPool(64, 3, 2, 8, torch.float16, cpu)
    dst = TokenKVPool(64, 3, 2, 8, torch.float16, cpu)
    for layer in range(3):
        src.k[layer].copy_(torch.randn(64, 2, 8))
        src.v[layer].copy_(torch.randn(64, 2, 8))
    held = src.alloc(10)  # the prompt's rows, scattered over the pool
    decode = PairGroups("decode-a", "127.0.0.1", hosts_store=True, device=cpu)
    prefill = PairGroups("prefill-a", "127.0.0.1", hosts_store=False, device=cpu)
    sender, receiver = KVTransfer(prefill), KVTransfer(decode)
    try:
        reserved = dst.alloc(10)
        inbox = empty_pages(dst, 10)
        for tag in (1, 2):  # a second transfer reuses the pair's group
            receiver.receive(f"r{tag}", inbox, "prefill-a", tag)
            sender.send(f"r{tag}", gather_pages(src, held), decode.peer(), tag)
            sent, received = _wait(sender), _wait(receiver)
            assert [d.error for d in sent] == [None] and [d.error for d in received] == [None]
            scatter_pages(dst, reserved, received[0].buf)
            for layer in range(3):
                assert torch.equal(dst.k[layer][reserved], src.k[layer][held])
                assert torch.equal(dst.v[layer][reserved], src.v[layer][held])
    finally:
        sender.stop()
        receiver.stop()


def test_a_receive_whose_sender_never_comes_fails_instead_of_hanging(monkeypatch):
    from lightllm.engine import kv_transfer
    from datetime import timedelta

    monkeypatch.setattr(kv_transfer, "GROUP_TIMEOUT", timedelta(seconds=2))
    cpu = torch.device("cpu")
    pool = TokenKVPool(8, 1, 1, 4, torch.float32, cpu)
    receiver = KVTransfer(PairGroups("decode-b", "127.0.0.1", hosts_store=True, device=cpu))
    try:
        receiver.receive("lost", empty_pages(pool, 4), "prefill-gone", 1)
        done = _wait(receiver, timeout=30)
        assert len(done) == 1 and done[0].rid == "lost" and "prefill-gone" in done[0].error
    finally:
        receiver.stop()


def test_each_tp_rank_moves_its_own_shard_on_its_own_pair_group():
    """Two tp ranks per node: rank r of the prefill side meets rank r of the decode side at the decode node's
    rank-0 store (worker ranks host no store), each pair on its own group; `wait` picks a transfer by id."""
    torch.manual_seed(1)
    cpu = torch.device("cpu")
    src = [TokenKVPool(32, 2, 1, 4, torch.float32, cpu) for _ in range(2)]  # one KV head per rank
    dst = [TokenKVPool(32, 2, 1, 4, torch.float32, cpu) for _ in range(2)]
    for pool in src:
        for layer in range(2):
            pool.k[layer].copy_(torch.randn(32, 1, 4))
            pool.v[layer].copy_(torch.randn(32, 1, 4))
    store = PairGroups("decode-b", "127.0.0.1", hosts_store=True, device=cpu)  # the decode node's rank 0
    receivers = [KVTransfer(store), KVTransfer(PairGroups("decode-b", "127.0.0.1", False, cpu, tp_rank=1))]
    senders = [KVTransfer(PairGroups("prefill-b", "127.0.0.1", False, cpu, tp_rank=r)) for r in range(2)]
    held, reserved = torch.tensor([3, 9, 4, 20]), torch.tensor([0, 1, 30, 31])
    try:
        for rank in range(2):
            receivers[rank].receive("r", empty_pages(dst[rank], 4), "prefill-b", 5, store.peer())
            senders[rank].send("r", gather_pages(src[rank], held), store.peer(), 5)
        for rank in range(2):
            got = receivers[rank].wait("r")
            assert got.error is None and receivers[rank].pending == 0
            scatter_pages(dst[rank], reserved, got.buf)
            for layer in range(2):
                assert torch.equal(dst[rank].k[layer][reserved], src[rank].k[layer][held])
                assert torch.equal(dst[rank].v[layer][reserved], src[rank].v[layer][held])
        assert not torch.equal(src[0].k[0][held], src[1].k[0][held])  # the shards differ: no rank got the other's
    finally:
        for transfer in receivers + senders:
            transfer.stop()
