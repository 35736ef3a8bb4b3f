"""A prefill or decode node of a PD deployment (`--run_mode prefill|decode`): an engine driven by the pd_master.

The node is the engine process itself (no HTTP): it loads the model, connects a DEALER socket to the master's
ROUTER (`--pd_master_ip:--pd_master_port`), registers, and runs the engine loop on the master's messages.
A heartbeat thread re-sends the registration every HEARTBEAT_S on its own socket, so the master notices a
dead node and a node re-registers after a master restart.

- prefill: every request stops after its first token; its prompt KV stays parked (Scheduler.parked) until
  the master names the decode node (`SendKV`), then it is gathered, freed (the prompt stays in the prefix
  cache) and sent on the transfer thread.
- decode: `ReceiveKV` reserves a slot and KV rows (or answers `KVRefused`: the master holds the request until a
  decode node has room, up to --pd_hold_timeout, then 503 + Retry-After); a prompt prefix this node's own
  prefix cache holds is not moved again (`KVAccepted.skip`).
  The transfer thread receives the pages, and the request joins the running batch with its first token as the
  next input, its seeded generator and grammar state carried over.

With `--tp N` the node is N ranks (engine/distributed.py); rank 0 runs this loop and has every worker rank move
its own KV shard to / from the same tp rank of the partner node (engine/kv_transfer.py's Shard* messages).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid

import torch
import zmq

from lightllm.engine.engine import Engine
from lightllm.engine.grammar import AllowedTokens
from lightllm.engine.kv_transfer import (KVTransfer, PairGroups, ShardCommit, ShardReceive, ShardSend, TransferDone,
                                         empty_pages, gather_pages, scatter_pages, shards_arrived)
from lightllm.engine.memory import release_free_heap
from lightllm.engine.pd_messages import (HEARTBEAT_S, KVAccepted, KVReady, KVRefused, NodeRole, ReceiveKV,
                                         RegisterNode, RegisterRefused, SendKV)
from lightllm.engine.protocol import (AbortRequest, AddRequest, CacheFlushed, EngineConfig, EngineError, FlushCache,
                                      Shutdown, StepOutputs, TokenOutput)
from lightllm.engine.reasoning_gate import GatedGrammar
from lightllm.engine.sequence import Sequence

logger = logging.getLogger("lightllm.pd")


def _error(rid: str, kind: str, message: str) -> TokenOutput:
    return TokenOutput(rid, None, finished=True, finish_reason="abort", error=EngineError(kind, message))


class PDNode:
    def __init__(self, engine: Engine, role: NodeRole, master_addr: str, host: str):
        self.engine = engine
        self.role = role
        self.node_id = f"{role}-{uuid.uuid4().hex[:12]}"
        self.groups = PairGroups(self.node_id, host, hosts_store=role == "decode", device=engine.device)
        self.transfer = KVTransfer(self.groups)
        engine.scheduler.handoff = role == "prefill"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.node_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(master_addr)
        self.master_addr = master_addr
        self.host = host
        self.registration = RegisterNode(self.node_id, role, engine.ready_message(), self.groups.peer(),
                                         tp=engine.cfg.tp)
        self.receiving: dict[str, tuple[ReceiveKV, Sequence, torch.Tensor]] = {}  # decode: rid -> (order, seq, rows)
        self._aborted: set[str] = set()  # decode: receives in flight whose request was aborted
        self.refused: str | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------------ heartbeat

    def _heartbeat(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"{self.node_id}.hb".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)  # a master that is away gets the latest beats, not a backlog
        sock.connect(self.master_addr)
        while not self._stop.wait(HEARTBEAT_S):
            try:
                sock.send_pyobj(self.registration, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # the master is away; the next beat tries again
        sock.close()

    # ------------------------------------------------------------------------------------ messages

    def handle(self, msg: object, outputs: list[TokenOutput]) -> bool:
        """One message from the master; False when the node must stop."""
        engine = self.engine
        if isinstance(msg, AddRequest) and self.role == "prefill":
            try:
                error = engine.add_request(msg)
            except Exception as exc:  # one bad request must not take the node down
                logger.exception("could not queue request %s", msg.rid)
                engine.abort(msg.rid)
                error = _error(msg.rid, "server", f"could not queue the request: {exc}")
            if error is not None:
                outputs.append(error)
        elif isinstance(msg, SendKV) and self.role == "prefill":
            seq = engine.scheduler.parked.get(msg.rid)
            if seq is None:  # aborted meanwhile: the decode node's receive fails and it says so
                logger.warning("SendKV for %s, which holds no KV here", msg.rid)
                return True
            rows = engine.table.table[seq.slot, msg.skip:seq.num_computed]
            buf = gather_pages(engine.pool, rows)
            self._to_workers(ShardSend(self.node_id, self.host, msg.rid, rows.cpu().clone(), msg.target, msg.tag))
            engine.scheduler.release_parked(msg.rid)  # the buffer holds the pages now
            self.transfer.send(msg.rid, buf, msg.target, msg.tag)
        elif isinstance(msg, ReceiveKV) and self.role == "decode":
            try:
                seq = self._sequence(msg)
            except Exception as exc:  # a grammar that does not compile here: this request fails, not the node
                logger.exception("could not continue request %s", msg.rid)
                outputs.append(_error(msg.rid, "server", f"could not continue the request: {exc}"))
                return True
            reserved = engine.scheduler.reserve(seq, msg.ready.num_tokens)
            if reserved is None:  # the master holds the request until a decode node has room
                self.sock.send_pyobj(KVRefused(msg.rid))
                return True
            rows, skip = reserved
            logger.debug("%s: receiving %d KV tokens from %s (%d more from this node's prefix cache)", msg.rid,
                         rows.numel(), msg.source, skip)
            self.receiving[msg.rid] = (msg, seq, rows)
            self._to_workers(ShardReceive(self.node_id, self.host, msg.rid, rows.numel(), msg.source, msg.tag,
                                          self.groups.peer()))
            self.transfer.receive(msg.rid, empty_pages(engine.pool, rows.numel()), msg.source, msg.tag)
            self.sock.send_pyobj(KVAccepted(msg.rid, skip))
        elif isinstance(msg, AbortRequest):
            engine.abort(msg.rid)  # a parked prefill's KV is freed too; a receive in flight ends on its own
            if msg.rid in self.receiving:
                self._aborted.add(msg.rid)  # its rows are returned when the receive ends
        elif isinstance(msg, FlushCache):
            freed = engine.prefix_cache.clear() if engine.prefix_cache is not None else 0
            self.sock.send_pyobj(CacheFlushed(msg.token, freed))
        elif isinstance(msg, RegisterRefused):
            self.refused = msg.reason
            return False
        elif isinstance(msg, Shutdown):
            return False
        else:
            logger.error("ignoring message %s, which a %s node does not take", type(msg).__name__, self.role)
        return True

    # ------------------------------------------------------------------------------------ transfers

    def _to_workers(self, msg: ShardSend | ShardReceive | ShardCommit) -> bool:
        """Have this node's other tp ranks do their part (between steps, as they run them); False at tp=1."""
        broadcaster = self.engine.runner.broadcaster
        if broadcaster is None:
            return False
        broadcaster.send(msg)
        return True

    def finish_transfers(self, outputs: list[TokenOutput]) -> bool:
        done = self.transfer.poll()
        for item in done:
            if self.role == "decode":
                self._received(item, outputs)
            elif item.error is not None:
                logger.warning("%s: %s", item.rid, item.error)  # the decode node reports it to the master
        return bool(done)

    def _received(self, item: TransferDone, outputs: list[TokenOutput]) -> None:
        msg, seq, rows = self.receiving.pop(item.rid)
        scheduler = self.engine.scheduler
        wanted = item.rid not in self._aborted and item.error is None
        if self._to_workers(ShardCommit(self.node_id, self.host, item.rid, rows.cpu().clone(), wanted)):
            if not shards_arrived(wanted, self.engine.device) and wanted:
                item.error = "a tensor-parallel rank's KV shard did not arrive (its log says why)"
        if item.rid in self._aborted or item.error is not None:
            self._aborted.discard(item.rid)
            scheduler.unreserve(seq, rows)
            if item.error is not None:
                outputs.append(_error(item.rid, "unavailable", item.error))
            return
        scatter_pages(self.engine.pool, rows, item.buf)
        scheduler.adopt(seq, msg.ready.num_tokens)

    def _sequence(self, msg: ReceiveKV) -> Sequence:
        """The request as the prefill node left it: prompt + first token, generator and grammar state."""
        engine, params, first = self.engine, msg.params, msg.ready.first_token
        seq = Sequence(msg.rid, list(msg.prompt_ids), params)
        seq.num_cached = msg.ready.cached_tokens
        if msg.ready.generator_state is not None:
            seq.generator = torch.Generator(device=engine.device)
            seq.generator.set_state(torch.frombuffer(bytearray(msg.ready.generator_state), dtype=torch.uint8))
        if params.grammar is not None:
            if params.grammar.kind == "token_ids":
                seq.grammar = AllowedTokens(params.grammar.token_ids, engine.model_config.vocab_size)
            else:
                factory = engine._grammar_factory()
                seq.grammar = factory.matcher(params.grammar, factory.compile(params.grammar).result())
                if params.grammar_gate is not None:
                    seq.grammar = GatedGrammar(seq.grammar, params.grammar_gate)
            seq.grammar.accept_token(first)
        seq.append_token(first)
        return seq

    def handoffs(self, outputs: list[TokenOutput]) -> list[KVReady]:
        """Prefill node: the requests this step parked, announced to the master."""
        ready = []
        for out in outputs:
            seq = self.engine.scheduler.parked.get(out.rid)
            if seq is None or out.token_id is None:
                continue
            state = seq.generator.get_state().numpy().tobytes() if seq.generator is not None else None
            ready.append(KVReady(out.rid, out.token_id, seq.num_computed, seq.num_cached, state))
        return ready

    # ------------------------------------------------------------------------------------ loop

    def run(self) -> int:
        engine = self.engine
        self.sock.send_pyobj(self.registration)
        threading.Thread(target=self._heartbeat, name="pd-heartbeat", daemon=True).start()
        logger.info("%s node %s registering with the master at %s", self.role, self.node_id, self.master_addr)
        busy = False
        try:
            while True:
                if busy and not engine.scheduler.has_work():
                    release_free_heap()
                    busy = False
                waiting = engine.compiling or self.transfer.pending
                timeout = 0 if engine.scheduler.has_work() else (5 if waiting else 100)
                outputs: list[TokenOutput] = []
                changed = False
                while self.sock.poll(timeout):
                    changed = True
                    if not self.handle(self.sock.recv_pyobj(), outputs):
                        return self._stopped()
                    timeout = 0
                changed = self.finish_transfers(outputs) or changed
                refused = engine.admit_waiting()
                outputs.extend(refused)
                changed = changed or bool(refused)
                if engine.scheduler.has_work():
                    outputs.extend(engine.step())
                    changed = busy = True
                if changed:
                    stats = engine.stats()
                    self.registration.stats = stats
                    self.sock.send_pyobj(StepOutputs(outputs, stats))
                    for ready in self.handoffs(outputs) if self.role == "prefill" else []:
                        self.sock.send_pyobj(ready)
        finally:
            self._stop.set()
            self.transfer.stop()
            engine.shutdown()

    def _stopped(self) -> int:
        if self.refused is not None:
            logger.error("the master refused this node: %s", self.refused)
            return 1
        logger.info("%s node %s stopped by the master", self.role, self.node_id)
        return 0


def run_node(cfg: EngineConfig, role: NodeRole, master_addr: str, host: str, log_level: str = "INFO") -> int:
    """Entry point of a prefill or decode node: returns the process's exit status."""
    from lightllm.engine.distributed import threads_per_rank
    from lightllm.engine.model_setup import configure_process

    configure_process(cfg)
    torch.set_num_threads(threads_per_rank(cfg))
    if cfg.tp > 1:  # the fused kernels' OpenMP pool too (as run_engine does), so the ranks do not oversubscribe
        os.environ["OMP_NUM_THREADS"] = str(threads_per_rank(cfg))
    start = time.perf_counter()
    engine = Engine(cfg, log_level)
    logger.info("%s node: model loaded in %.1fs", role, time.perf_counter() - start)
    return PDNode(engine, role, master_addr, host).run()
