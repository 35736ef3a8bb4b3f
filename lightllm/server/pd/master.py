"""The pd_master's engine connection (`--run_mode pd_master`): the HTTP front's routes drive it exactly as they
drive EngineClient (same `generate`, `abort`, `flush_cache`, `alive`, `info`, `stats`), but the work runs on
prefill and decode nodes that register over zmq (engine/pd_node.py, messages in engine/pd_messages.py).

A request: AddRequest → the prefill node with the fewest requests in flight; its first token streams back;
on `KVReady` the decode node with the fewest requests in flight (then the most free KV) among those whose last
report shows room for the prompt's KV gets `ReceiveKV`; on its `KVAccepted` the prefill node gets `SendKV`, and
the decode node's tokens stream back. When no decode node has room (or one answers `KVRefused`), the request is
held (its KV stays parked on the prefill node) and placed as soon as a decode node reports room; after
--pd_hold_timeout seconds it ends with an `unavailable` error (503 + Retry-After). A node silent for
NODE_TIMEOUT_S (or unreachable) is dropped: the requests it took part in end with an `unavailable` error (503)
and the master routes to it no more until it registers again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

import zmq
import zmq.asyncio

from lightllm.engine.pd_messages import (HEARTBEAT_S, NODE_TIMEOUT_S, KVAccepted, KVReady, KVRefused, NodeRole,
                                         ReceiveKV, RegisterNode, RegisterRefused, SendKV)
from lightllm.engine.protocol import (AbortRequest, AddRequest, CacheFlushed, EngineError, EngineReady, EngineStats,
                                      FlushCache, ImageInput, SamplingParams, StepOutputs, TokenOutput)
from lightllm.server.engine_client import EngineDied

logger = logging.getLogger("lightllm.pd")


@dataclass
class Node:
    reg: RegisterNode
    last_seen: float
    inflight: set[str] = field(default_factory=set)
    updates: int = 0  # StepOutputs received: a node that refused a request is asked again after its next report

    @property
    def role(self) -> NodeRole:
        return self.reg.role

    def room(self) -> int | None:
        """KV tokens free or evictable at the node's last report (None: it has not reported yet)."""
        stats = self.reg.stats
        return None if stats is None else stats.kv_total - stats.kv_used + stats.kv_cached

    def load(self) -> tuple[int, int]:
        stats = self.reg.stats
        return len(self.inflight), (stats.kv_used - stats.kv_total) if stats else 0


@dataclass
class Flight:
    """One request on its way through the nodes."""

    prompt_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue[TokenOutput]
    prefill: str
    decode: str | None = None
    tag: int = 0
    ready: KVReady | None = None
    sent: bool = False  # SendKV went to the prefill node
    held_until: float | None = None  # waiting for a decode node with room until then (monotonic)
    refused: dict[str, int] = field(default_factory=dict)  # decode node id -> its `updates` when it refused


def _failed(rid: str, kind: str, message: str) -> TokenOutput:
    return TokenOutput(rid, None, finished=True, finish_reason="abort", error=EngineError(kind, message))


class PDMasterClient:
    def __init__(self, ip: str, port: int, hold_timeout: float = 5.0):
        self.address = f"tcp://{ip}:{port}"
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a node that is gone raises instead of vanishing
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)
        self.nodes: dict[str, Node] = {}
        self.flights: dict[str, Flight] = {}
        # Requests that ended while their decode node was setting up the receive: a posted receive cannot be
        # cancelled, so the transfer still happens (the decode node drops the pages) or the decode node's
        # refusal comes back; then the prefill node is told to free its KV.
        self.unwinding: dict[str, Flight] = {}
        self._info: EngineReady | None = None  # the first node's facts (the model's limits the routes need)
        self._kv_total = 0  # KV tokens of all nodes registered now (the last such sum while none is)
        self.hold_timeout = hold_timeout
        self.held: dict[str, None] = {}  # requests waiting for a decode node with room, oldest first
        self._first = asyncio.Event()
        self._tags = itertools.count(1)
        self._flushes: dict[int, tuple[asyncio.Future, set[str], list[int]]] = {}
        self._flush_count = 0
        self._tasks: list[asyncio.Task] = []
        self.restarts = 0  # what /metrics reads of an engine connection; nodes restart on their own
        self.failed_sends = 0

    async def start(self) -> EngineReady:
        """Listen for nodes; returns the first node's facts (the model's limits the routes need)."""
        self._tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._watch())]
        logger.info("pd_master: waiting for prefill and decode nodes at %s", self.address)
        await self._first.wait()
        return self._info

    @property
    def info(self) -> EngineReady | None:
        """The first node's facts, with the KV size (max_total_token_num) of every node registered now."""
        if self._info is None:
            return None
        if self.nodes:
            self._kv_total = sum(node.reg.ready.max_total_token_num for node in self.nodes.values())
        return replace(self._info, max_total_token_num=self._kv_total)

    def kv_by_role(self) -> dict[str, dict[str, int]]:
        """Per role: nodes registered, their KV tokens in all, used and prefix-cached at their last reports."""
        out = {}
        for role in ("prefill", "decode"):
            nodes = self._of_role(role)
            seen = [node.reg.stats for node in nodes if node.reg.stats is not None]
            out[role] = {"nodes": len(nodes), "kv_total": sum(n.reg.ready.max_total_token_num for n in nodes),
                         "kv_used": sum(s.kv_used for s in seen), "kv_cached": sum(s.kv_cached for s in seen)}
        out["decode"]["held_requests"] = len(self.held)
        return out

    # ------------------------------------------------------------------------------------ nodes

    def _of_role(self, role: NodeRole) -> list[Node]:
        return [node for node in self.nodes.values() if node.role == role]

    @property
    def alive(self) -> bool:
        return bool(self._of_role("prefill")) and bool(self._of_role("decode"))

    @property
    def dead_reason(self) -> str | None:
        missing = [role for role in ("prefill", "decode") if not self._of_role(role)]
        return f"no {' and no '.join(missing)} node registered with the pd_master" if missing else None

    @property
    def stats(self) -> EngineStats | None:
        seen = [node.reg.stats for node in self.nodes.values() if node.reg.stats is not None]
        if not seen:
            return None
        return EngineStats(kv_total=sum(s.kv_total for s in seen), kv_used=sum(s.kv_used for s in seen),
                           kv_cached=sum(s.kv_cached for s in seen), running=sum(s.running for s in seen),
                           waiting=sum(s.waiting for s in seen))

    def _register(self, reg: RegisterNode) -> None:
        node = self.nodes.get(reg.node_id)
        if node is not None:
            node.reg.stats = reg.stats or node.reg.stats
            node.last_seen = time.monotonic()
            return
        if self._info is not None:
            mine, theirs = self._info, reg.ready
            if (theirs.architecture, theirs.vocab_size, theirs.max_model_len) != \
                    (mine.architecture, mine.vocab_size, mine.max_model_len):
                reason = (f"node serves {theirs.model_name} ({theirs.architecture}, vocab {theirs.vocab_size}, "
                          f"max_len {theirs.max_model_len}); this master's nodes serve {mine.model_name} "
                          f"({mine.architecture}, vocab {mine.vocab_size}, max_len {mine.max_model_len})")
                logger.error("refusing %s: %s", reg.node_id, reason)
                self._send(reg.node_id, RegisterRefused(reason))
                return
        other = "decode" if reg.role == "prefill" else "prefill"
        partners = {node.reg.tp for node in self._of_role(other)}
        if partners and partners != {reg.tp}:  # each tp rank moves its own KV shard to the same rank of the other
            reason = (f"{reg.role} node runs --tp {reg.tp}; this master's {other} nodes run --tp "
                      f"{', '.join(map(str, sorted(partners)))}: prefill and decode nodes must shard the KV alike "
                      "(the same --tp)")
            logger.error("refusing %s: %s", reg.node_id, reason)
            self._send(reg.node_id, RegisterRefused(reason))
            return
        self.nodes[reg.node_id] = Node(reg, time.monotonic())
        logger.info("%s node %s registered (KV %d tokens, tp %d)", reg.role, reg.node_id,
                    reg.ready.max_total_token_num, reg.tp)
        if self._info is None:
            self._info = reg.ready
            self._first.set()
        if reg.role == "decode":
            self._place_held()

    def _drop(self, node_id: str, reason: str) -> None:
        node = self.nodes.pop(node_id, None)
        if node is None:
            return
        logger.error("%s node %s dropped: %s; failing %d request(s)", node.role, node_id, reason, len(node.inflight))
        for rid in list(node.inflight):
            self._end(rid, _failed(rid, "unavailable", f"{node.role} node lost: {reason}; retry later"))
        for rid, flight in list(self.unwinding.items()):
            if node_id in (flight.prefill, flight.decode):
                del self.unwinding[rid]
                self._send_abort(rid, flight)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            for node_id, node in list(self.nodes.items()):
                if now - node.last_seen > NODE_TIMEOUT_S:
                    self._drop(node_id, f"no heartbeat for {now - node.last_seen:.1f}s")
            self._place_held()
            for rid in list(self.held):
                flight = self.flights.get(rid)
                if flight is not None and flight.held_until is not None and now > flight.held_until:
                    del self.held[rid]
                    self._end(rid, _failed(rid, "unavailable", (
                        f"no decode node had free KV cache for this request's {flight.ready.num_tokens} tokens "
                        f"within --pd_hold_timeout {self.hold_timeout:g}s; retry later")))

    def _send(self, node_id: str, msg: object) -> bool:
        try:
            self.sock.send_multipart([node_id.encode(), pickle.dumps(msg)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # unreachable (its connection is gone) or its queue is full
            self.failed_sends += 1
            self._drop(node_id, f"cannot reach it ({exc})")
            return False

    # ------------------------------------------------------------------------------------ messages

    async def _receive_loop(self) -> None:
        while True:
            identity, payload = await self.sock.recv_multipart()
            msg = pickle.loads(payload)
            node_id = identity.decode().removesuffix(".hb")
            if isinstance(msg, RegisterNode):
                self._register(msg)
                continue
            node = self.nodes.get(node_id)
            if node is None:
                continue  # a node dropped earlier: its messages mean nothing now (it re-registers)
            node.last_seen = time.monotonic()
            if isinstance(msg, StepOutputs):
                node.reg.stats = msg.stats
                node.updates += 1
                for out in msg.outputs:
                    flight = self.flights.get(out.rid)
                    if flight is None:
                        if out.finished and out.rid in self.unwinding:  # the decode node refused or failed it
                            self._send_abort(out.rid, self.unwinding.pop(out.rid))
                        continue
                    if node_id == flight.decode and flight.prefill in self.nodes:
                        # the KV arrived: the prefill node's part is over (its death no longer concerns this one)
                        self.nodes[flight.prefill].inflight.discard(out.rid)
                    if out.finished:
                        self._end(out.rid, out, decode_done=node_id == flight.decode)
                    else:
                        flight.queue.put_nowait(out)
                if node.role == "decode" and self.held:
                    self._place_held()
            elif isinstance(msg, KVRefused):
                self._refused(node, msg.rid)
            elif isinstance(msg, KVReady):
                self._to_decode(msg)
            elif isinstance(msg, KVAccepted):
                flight = self.flights.get(msg.rid) or self.unwinding.pop(msg.rid, None)
                if flight is not None and flight.decode in self.nodes:
                    flight.sent = True
                    self._send(flight.prefill, SendKV(msg.rid, self.nodes[flight.decode].reg.peer, flight.tag,
                                                      msg.skip))
            elif isinstance(msg, CacheFlushed):
                self._flushed(node_id, msg)

    def _to_decode(self, ready: KVReady) -> None:
        flight = self.flights.get(ready.rid)
        if flight is None:  # ended meanwhile (client gone): the prefill node frees the KV
            self._send_abort(ready.rid, None)
            return
        flight.ready = ready
        if not self._place(ready.rid, flight):
            self._hold(ready.rid, flight)

    def _place(self, rid: str, flight: Flight) -> bool:
        """Send `rid`'s KV to the least loaded decode node with room for it; False when none has room."""
        need = flight.ready.num_tokens
        nodes = [node for node in self._of_role("decode")
                 if (room := node.room()) is None or room >= need
                 if node.updates > flight.refused.get(node.reg.node_id, -1)]
        if not nodes:
            return False
        node = min(nodes, key=Node.load)
        flight.decode, flight.tag = node.reg.node_id, next(self._tags)
        node.inflight.add(rid)
        self._send(node.reg.node_id, ReceiveKV(rid, flight.prompt_ids, flight.params, flight.ready, flight.prefill,
                                               flight.tag))
        return True

    def _hold(self, rid: str, flight: Flight) -> None:
        """No decode node has room for `rid` now: wait for one (up to hold_timeout), the KV parked on the prefill
        node meanwhile."""
        need = flight.ready.num_tokens
        largest = max((node.reg.ready.max_total_token_num for node in self._of_role("decode")), default=None)
        if largest is not None and need > largest:  # waiting would not help: the engine's _drop_oversized rule
            self._end(rid, _failed(rid, "client", f"request needs more KV cache ({need} tokens) than any decode "
                                                  f"node's pool holds (largest: {largest} tokens)"))
            return
        if flight.held_until is None:
            flight.held_until = time.monotonic() + self.hold_timeout
            logger.info("%s held: no decode node has room for %d KV tokens", rid, need)
        if self.hold_timeout <= 0:
            self._end(rid, _failed(rid, "unavailable", "no decode node has free KV cache for this request; retry "
                                                       "later"))
            return
        self.held[rid] = None

    def _place_held(self) -> None:
        for rid in list(self.held):
            flight = self.flights.get(rid)
            if flight is None or flight.decode is not None:  # ended meanwhile (client gone, prefill node lost)
                del self.held[rid]
            elif self._place(rid, flight):
                del self.held[rid]

    def _refused(self, node: Node, rid: str) -> None:
        """A decode node had no room for `rid` after all (reserved nothing): hold it again."""
        node.inflight.discard(rid)
        flight = self.flights.get(rid)
        if flight is None:
            if rid in self.unwinding:  # ended while the decode node looked: the prefill node frees the KV
                self._send_abort(rid, self.unwinding.pop(rid))
            return
        flight.refused[node.reg.node_id] = node.updates
        flight.decode = None
        self._hold(rid, flight)

    def _least_loaded(self, role: NodeRole) -> Node | None:
        nodes = self._of_role(role)
        return min(nodes, key=Node.load) if nodes else None

    def _end(self, rid: str, final: TokenOutput, decode_done: bool = False) -> None:
        """`rid` is over (finished, failed or aborted): deliver `final`, and the nodes still holding it drop it.
        `decode_done`: `final` came from its decode node (which then has no receive pending for it)."""
        flight = self.flights.pop(rid, None)
        if flight is None:
            return
        for node_id in (flight.prefill, flight.decode):
            if node_id in self.nodes:
                self.nodes[node_id].inflight.discard(rid)
        if final.error is not None:
            if flight.decode is not None and not flight.sent and not decode_done and flight.decode in self.nodes:
                self.unwinding[rid] = flight  # the prefill node keeps the KV until the receive is served
                self._send(flight.decode, AbortRequest(rid))
            else:
                self._send_abort(rid, flight)
        flight.queue.put_nowait(final)

    def _send_abort(self, rid: str, flight: Flight | None) -> None:
        targets = [flight.prefill, flight.decode] if flight is not None else self._of_role_ids("prefill")
        for node_id in targets:
            if node_id in self.nodes:
                self._send(node_id, AbortRequest(rid))

    def _of_role_ids(self, role: NodeRole) -> list[str]:
        return [node.reg.node_id for node in self._of_role(role)]

    # ------------------------------------------------------------------------------------ routes' interface

    async def generate(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                       images: list[ImageInput] | None = None) -> AsyncIterator[TokenOutput]:
        """Yield the request's outputs (first token from a prefill node, the rest from a decode node)."""
        if images or params.lora is not None:
            what = "images" if images else "LoRA adapters"
            yield _failed(rid, "client", f"{what} are not served in prefill/decode disaggregation (--run_mode "
                                         "pd_master) yet")
            return
        prefill = self._least_loaded("prefill")
        if prefill is None or not self.alive:
            raise EngineDied(self.dead_reason or "no nodes")
        queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
        self.flights[rid] = Flight(list(prompt_ids), params, queue, prefill.reg.node_id)
        prefill.inflight.add(rid)
        finished = False
        try:
            if not self._send(prefill.reg.node_id, AddRequest(rid, list(prompt_ids), params)):
                raise EngineDied("the prefill node is unreachable")
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, rid: str) -> None:
        flight = self.flights.get(rid)
        if flight is not None:
            self._end(rid, _failed(rid, "client", "aborted"))

    async def flush_cache(self, timeout: float = 30.0) -> int:
        """Empty every node's prefix cache; returns the KV tokens freed in all."""
        if not self.nodes:
            raise EngineDied(self.dead_reason or "no nodes")
        self._flush_count += 1
        token = self._flush_count
        waiter = asyncio.get_running_loop().create_future()
        asked = set(self.nodes)
        self._flushes[token] = (waiter, asked, [])
        try:
            for node_id in list(asked):
                self._send(node_id, FlushCache(token))
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._flushes.pop(token, None)

    def _flushed(self, node_id: str, msg: CacheFlushed) -> None:
        entry = self._flushes.get(msg.token)
        if entry is None:
            return
        waiter, asked, freed = entry
        asked.discard(node_id)
        freed.append(msg.freed_tokens)
        if not asked and not waiter.done():
            waiter.set_result(sum(freed))

    async def shutdown(self) -> None:
        """Stop listening; the nodes keep running and register with the next master at this address."""
        for task in self._tasks:
            task.cancel()
        for rid in list(self.flights):
            self._end(rid, _failed(rid, "unavailable", "the pd_master is shutting down"))
        self.ctx.destroy(linger=0)
