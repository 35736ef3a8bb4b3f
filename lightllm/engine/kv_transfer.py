"""KV pages between a prefill node and a decode node over torch.distributed point-to-point.

Each (prefill, decode) pair forms its own two-rank group (gloo on CPU, NCCL on CUDA; the prefill node is rank
0), met through a TCPStore the decode node hosts: nodes join and leave at any time, which one world group of
fixed size cannot do. A group is formed on the pair's first transfer and kept.

Tensor-parallel nodes (`--tp N` on both, the same N): each rank's pool holds its own KV heads, so tp rank r of
the prefill node sends its shard to tp rank r of the decode node, on the pair group of those two ranks (store
prefix `pair/<prefill id>/tp<r>`, all met at the decode node's rank-0 store). Rank 0 drives its workers with
`ShardSend` / `ShardReceive` / `ShardCommit`, broadcast in the tp group between steps like the step inputs
(engine/distributed.py), so every rank gathers before the rows are reused and scatters before the request runs;
the commit's all-reduce tells rank 0 whether every shard arrived.

What moves is the pool's own rows (engine/kv_cache.py: per layer `[tokens, kv_heads, head_dim]` in the KV
dtype): the request's token rows are gathered into one buffer `[2 * layers, tokens, kv_heads, head_dim]`
(k then v per layer) and sent as raw bytes, then written into the rows the decode node reserved. No change
of layout or dtype on either side.

Blocking calls (forming a group, a send or receive with its wait) run on one transfer thread per node, so
the engine loop keeps stepping its other requests; the loop collects finished transfers with `poll()`.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from lightllm.engine.kv_cache import TokenKVPool
from lightllm.engine.pd_messages import KVPeer

logger = logging.getLogger("lightllm.pd")

GROUP_TIMEOUT = timedelta(seconds=30)  # forming a group, and each send / receive, fails after this


def gather_pages(pool: TokenKVPool, indices: torch.Tensor) -> torch.Tensor:
    """The rows `indices` of every layer's k and v, as one contiguous buffer in the pool's dtype."""
    layers = len(pool.k)
    first = pool.k[0]
    buf = torch.empty((2 * layers, indices.numel(), *first.shape[1:]), dtype=first.dtype, device=first.device)
    idx = indices.to(first.device)
    for layer in range(layers):
        torch.index_select(pool.k[layer], 0, idx, out=buf[2 * layer])
        torch.index_select(pool.v[layer], 0, idx, out=buf[2 * layer + 1])
    return buf


def scatter_pages(pool: TokenKVPool, indices: torch.Tensor, buf: torch.Tensor) -> None:
    """Write a gathered buffer into the rows `indices` of every layer."""
    idx = indices.to(buf.device)
    for layer in range(len(pool.k)):
        pool.k[layer].index_copy_(0, idx, buf[2 * layer])
        pool.v[layer].index_copy_(0, idx, buf[2 * layer + 1])


def empty_pages(pool: TokenKVPool, num_tokens: int) -> torch.Tensor:
    first = pool.k[0]
    return torch.empty((2 * len(pool.k), num_tokens, *first.shape[1:]), dtype=first.dtype, device=first.device)


@dataclass
class TransferDone:
    """A finished send or receive: `error` is None when the bytes arrived."""

    rid: str
    buf: torch.Tensor
    error: str | None = None


class PairGroups:
    """This node's two-rank groups, one per partner. A decode node hosts the store its partners meet at."""

    def __init__(self, node_id: str, host: str, hosts_store: bool, device: torch.device, tp_rank: int = 0):
        self.node_id = node_id
        self.host = host
        self.device = device
        self.tp_rank = tp_rank  # which shard this process moves (its partner is the same tp rank of the other node)
        self.store: dist.TCPStore | None = None
        self.port = 0
        if hosts_store:  # port 0: the system picks a free one, announced in the node's registration
            self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=GROUP_TIMEOUT)
            self.port = self.store.port
        self._groups: dict[str, dist.ProcessGroup] = {}

    def peer(self) -> KVPeer:
        return KVPeer(self.node_id, self.host, self.port)

    def group(self, prefill_id: str, decode: KVPeer, rank: int) -> dist.ProcessGroup:
        """The group of (prefill_id, decode), formed on first use (blocks until the partner joins too)."""
        key = prefill_id if rank == 1 else decode.node_id
        if key in self._groups:
            return self._groups[key]
        if rank == 1 and self.store is not None:
            store = self.store
        else:  # the prefill side, or a decode node's worker rank: a client of the decode node's rank-0 store
            store = dist.TCPStore(decode.host, decode.port, is_master=False, timeout=GROUP_TIMEOUT)
        pair_store = dist.PrefixStore(f"pair/{prefill_id}/tp{self.tp_rank}", store)
        if self.device.type == "cuda":
            group = dist.ProcessGroupNCCL(pair_store, rank, 2)
        else:
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = GROUP_TIMEOUT
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
            group = dist.ProcessGroupGloo(pair_store, rank, 2, opts)
        logger.info("KV transfer group with %s formed (%s, tp rank %d)", key,
                    "nccl" if self.device.type == "cuda" else "gloo", self.tp_rank)
        self._groups[key] = group
        return group

    def forget(self, partner_id: str) -> None:
        """Drop a partner's group (it died, or a transfer with it failed): the next transfer forms a new one."""
        self._groups.pop(partner_id, None)


class KVTransfer:
    """The node's transfer thread: queue sends and receives, collect what finished with `poll()`."""

    def __init__(self, groups: PairGroups):
        self.groups = groups
        self._jobs: queue.Queue[Callable[[], TransferDone] | None] = queue.Queue()
        self._done: queue.Queue[TransferDone] = queue.Queue()
        self.pending = 0
        self._early: list[TransferDone] = []  # finished while wait() looked for another
        self._thread = threading.Thread(target=self._run, name="kv-transfer", daemon=True)
        self._thread.start()

    def send(self, rid: str, buf: torch.Tensor, target: KVPeer, tag: int) -> None:
        """Prefill side (rank 0): send a gathered buffer to the decode node `target`."""
        def job() -> TransferDone:
            group = self.groups.group(self.groups.node_id, target, rank=0)
            self._wait(group.send([buf.view(torch.uint8)], 1, tag), target.node_id)
            return TransferDone(rid, buf)
        self._queue(job, rid, buf, target.node_id)

    def receive(self, rid: str, buf: torch.Tensor, source: str, tag: int, store: KVPeer | None = None) -> None:
        """Decode side (rank 1): receive into `buf` from the prefill node `source` (`store`: where the pair
        meets, the decode node's rank-0 store; default this process's own)."""
        def job() -> TransferDone:
            group = self.groups.group(source, store or self.groups.peer(), rank=1)
            self._wait(group.recv([buf.view(torch.uint8)], 0, tag), source)
            return TransferDone(rid, buf)
        self._queue(job, rid, buf, source)

    def _wait(self, work: dist.Work, partner: str) -> None:
        try:
            work.wait(GROUP_TIMEOUT)
        except RuntimeError:
            self.groups.forget(partner)  # a broken pair: a later transfer forms it again
            raise

    def _queue(self, job: Callable[[], TransferDone], rid: str, buf: torch.Tensor, partner: str) -> None:
        def guarded() -> TransferDone:
            try:
                return job()
            except RuntimeError as exc:  # torch.distributed reports a lost or silent partner this way
                logger.warning("KV transfer of %s with %s failed: %s", rid, partner, exc)
                return TransferDone(rid, buf, f"KV transfer with node {partner} failed: {exc}")
        self.pending += 1
        self._jobs.put(guarded)

    def _run(self) -> None:
        device = self.groups.device
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # NCCL works on the thread's current device
        while (job := self._jobs.get()) is not None:
            self._done.put(job())

    def poll(self) -> list[TransferDone]:
        done, self._early = self._early, []  # already counted off `pending` by wait()
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                break
            self.pending -= 1
        return done

    def wait(self, rid: str) -> TransferDone:
        """Block until the transfer of `rid` finished (the others that finish meanwhile stay for poll/wait)."""
        while True:
            for i, item in enumerate(self._early):
                if item.rid == rid:
                    return self._early.pop(i)
            item = self._done.get()
            self.pending -= 1
            self._early.append(item)

    def stop(self) -> None:
        self._jobs.put(None)


# ---------------------------------------------------------------------------------- tensor-parallel nodes


class _WorkerShard:
    """A worker rank's side of its node's transfers: its own pair groups and transfer thread."""

    def __init__(self, node_id: str, host: str, rank: int, device: torch.device):
        self.transfer = KVTransfer(PairGroups(node_id, host, hosts_store=False, device=device, tp_rank=rank))

    def collect_sends(self) -> None:
        for item in self.transfer.poll():  # a failed send: the decode node's receive fails and it says so
            if item.error is not None:
                logger.warning("%s: %s", item.rid, item.error)


_worker_shard: _WorkerShard | None = None


def _shard(node_id: str, host: str, rank: int, device: torch.device) -> _WorkerShard:
    global _worker_shard
    if _worker_shard is None:
        _worker_shard = _WorkerShard(node_id, host, rank, device)
    return _worker_shard


@dataclass
class ShardSend:
    """Prefill node, rank 0 → its workers: send your shard of `rows` (the request's KV rows) to `target`."""

    node_id: str
    host: str
    rid: str
    rows: torch.Tensor
    target: KVPeer
    tag: int

    def on_worker(self, rank: int, pool: TokenKVPool, device: torch.device) -> None:
        shard = _shard(self.node_id, self.host, rank, device)
        shard.collect_sends()
        shard.transfer.send(self.rid, gather_pages(pool, self.rows), self.target, self.tag)


@dataclass
class ShardReceive:
    """Decode node, rank 0 → its workers: post the receive of your shard of `num_tokens` KV rows from `source`."""

    node_id: str
    host: str
    rid: str
    num_tokens: int
    source: str
    tag: int
    store: KVPeer  # the decode node's rank-0 store, where the pair groups meet

    def on_worker(self, rank: int, pool: TokenKVPool, device: torch.device) -> None:
        shard = _shard(self.node_id, self.host, rank, device)
        shard.transfer.receive(self.rid, empty_pages(pool, self.num_tokens), self.source, self.tag, self.store)


@dataclass
class ShardCommit:
    """Decode node, rank 0 → its workers, once rank 0's own receive of `rid` ended: wait for yours, write it into
    `rows` when `ok` (rank 0's part arrived and the request still wants it), then all-reduce whether every shard
    arrived (`shards_arrived`)."""

    node_id: str
    host: str
    rid: str
    rows: torch.Tensor
    ok: bool

    def on_worker(self, rank: int, pool: TokenKVPool, device: torch.device) -> None:
        item = _shard(self.node_id, self.host, rank, device).transfer.wait(self.rid)
        ok = self.ok and item.error is None
        if ok:
            scatter_pages(pool, self.rows, item.buf)
        shards_arrived(ok, device)


def shards_arrived(ok: bool, device: torch.device) -> bool:
    """Every rank of the node says whether its shard arrived; True when all did (a collective of the tp group)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
