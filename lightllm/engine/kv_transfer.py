"""KV pages between a prefill node and a decode node over torch.distributed point-to-point.

Each (prefill, decode) pair forms its own two-rank group (gloo on CPU, NCCL on CUDA; the prefill node is rank
0), met through a TCPStore the decode node hosts: nodes join and leave at any time, which one world group of
fixed size cannot do. A group is formed on the pair's first transfer and kept.

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

    def __init__(self, node_id: str, host: str, hosts_store: bool, device: torch.device):
        self.node_id = node_id
        self.host = host
        self.device = device
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
        store = self.store if rank == 1 else dist.TCPStore(decode.host, decode.port, is_master=False,
                                                            timeout=GROUP_TIMEOUT)
        pair_store = dist.PrefixStore(f"pair/{prefill_id}", store)
        if self.device.type == "cuda":
            group = dist.ProcessGroupNCCL(pair_store, rank, 2)
        else:
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = GROUP_TIMEOUT
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
            group = dist.ProcessGroupGloo(pair_store, rank, 2, opts)
        logger.info("KV transfer group with %s formed (%s)", key, "nccl" if self.device.type == "cuda" else "gloo")
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
        self._thread = threading.Thread(target=self._run, name="kv-transfer", daemon=True)
        self._thread.start()

    def send(self, rid: str, buf: torch.Tensor, target: KVPeer, tag: int) -> None:
        """Prefill side (rank 0): send a gathered buffer to the decode node `target`."""
        def job() -> TransferDone:
            group = self.groups.group(self.groups.node_id, target, rank=0)
            self._wait(group.send([buf.view(torch.uint8)], 1, tag), target.node_id)
            return TransferDone(rid, buf)
        self._queue(job, rid, buf, target.node_id)

    def receive(self, rid: str, buf: torch.Tensor, source: str, tag: int) -> None:
        """Decode side (rank 1): receive into `buf` from the prefill node `source`."""
        def job() -> TransferDone:
            group = self.groups.group(source, self.groups.peer(), rank=1)
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
        done = []
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                break
        self.pending -= len(done)
        return done

    def stop(self) -> None:
        self._jobs.put(None)
