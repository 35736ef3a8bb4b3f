"""API-process side of the engine connection: start and supervise the engine process, submit, stream,
abort.

Supervision: when the engine process dies, every request in flight ends at once with a 503 error, new
ones get 503 while it is down, and a fresh engine process is started (same sockets, new process). After
`max_restarts` deaths the client gives up and `on_give_up` is called (the server then exits non-zero, so
a supervisor such as systemd or Kubernetes takes over).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import tempfile
import time
from typing import AsyncIterator, Callable

import zmq
import zmq.asyncio

from lightllm.engine.entry import engine_main
from lightllm.engine.protocol import ImageInput
from lightllm.engine.protocol import (AbortRequest, AddRequest, CacheFlushed, EngineError, EngineFailed, EngineReady,
                                      EngineStats, FlushCache, LoadLora, LoraReply, SamplingParams, Shutdown,
                                      StepOutputs, TokenOutput, UnloadLora)

logger = logging.getLogger("lightllm.api")


class EngineDied(RuntimeError):
    pass


class EngineClient:
    def __init__(self, engine_config, log_level: str = "INFO", max_restarts: int = 3,
                 on_give_up: Callable[[str], None] | None = None):
        self.engine_config = engine_config
        self.log_level = log_level
        self.max_restarts = max_restarts
        self.on_give_up = on_give_up
        self._dir = tempfile.mkdtemp(prefix="lightllm-")
        self.in_addr = f"ipc://{os.path.join(self._dir, 'to_engine')}"
        self.out_addr = f"ipc://{os.path.join(self._dir, 'from_engine')}"
        self.ctx = zmq.asyncio.Context()
        self._bind()
        self.process: multiprocessing.process.BaseProcess | None = None
        self.info: EngineReady | None = None
        self.stats: EngineStats | None = None
        self.queues: dict[str, asyncio.Queue[TokenOutput]] = {}
        self._recv_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self.dead_reason: str | None = None
        self.restarts = 0
        self._stopping = False
        self._flushes: dict[int, asyncio.Future] = {}  # flush_cache calls awaiting the engine's reply
        self._flush_count = 0
        self._lora_calls: dict[int, asyncio.Future] = {}  # adapter load/unload calls awaiting the engine's reply
        self.failed_sends = 0  # messages to the engine that could not be sent (logged as they fail)

    def _bind(self) -> None:
        self.to_engine = self.ctx.socket(zmq.PUSH)
        self.to_engine.bind(self.in_addr)
        self.from_engine = self.ctx.socket(zmq.PULL)
        self.from_engine.bind(self.out_addr)

    def _rebind(self) -> None:
        """Fresh sockets for a new engine process: nothing queued for the dead one reaches it."""
        for sock in (self.to_engine, self.from_engine):
            sock.close(linger=0)
        self._bind()

    def spawn(self) -> None:
        """Start the engine process without waiting for it: the API server calls this before it imports its
        routes, so the engine imports PyTorch and loads the weights meanwhile. `start()` then waits for it."""
        ctx = multiprocessing.get_context("spawn")
        self.process = ctx.Process(target=engine_main, name="lightllm-engine",
                                   args=(self.engine_config, self.in_addr, self.out_addr, self.log_level),
                                   daemon=True)
        self.process.start()

    async def start(self) -> EngineReady:
        if self.process is None:
            self.spawn()
        self.info = await self._until_ready()
        self._recv_task = asyncio.create_task(self._receive_loop())
        self._watch_task = asyncio.create_task(self._supervise())
        return self.info

    async def _launch(self) -> EngineReady:
        self.spawn()
        return await self._until_ready()

    async def _until_ready(self) -> EngineReady:
        while True:
            if await self.from_engine.poll(500):
                msg = await self.from_engine.recv_pyobj()
                if isinstance(msg, EngineFailed):
                    raise RuntimeError(f"engine failed to start: {msg.error}")
                if isinstance(msg, EngineReady):
                    return msg
            elif not self.process.is_alive():
                raise RuntimeError(f"engine process exited during start-up (code {self.process.exitcode})")

    async def _receive_loop(self) -> None:
        while True:
            msg = await self.from_engine.recv_pyobj()
            if isinstance(msg, LoraReply):
                waiter = self._lora_calls.pop(msg.token, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
                continue
            if isinstance(msg, CacheFlushed):
                waiter = self._flushes.pop(msg.token, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg.freed_tokens)
                continue
            if not isinstance(msg, StepOutputs):
                continue
            self.stats = msg.stats
            for out in msg.outputs:
                queue = self.queues.get(out.rid)
                if queue is not None:
                    queue.put_nowait(out)

    async def _supervise(self) -> None:
        while True:
            while self.process.is_alive():
                await asyncio.sleep(0.2)
            if self._stopping:
                return
            self.dead_reason = f"engine process exited (code {self.process.exitcode})"
            logger.error("%s; failing %d request(s) in flight", self.dead_reason, len(self.queues))
            self.stats = None
            for rid, queue in list(self.queues.items()):
                queue.put_nowait(TokenOutput(rid, None, finished=True, finish_reason="abort",
                                             error=EngineError("unavailable", self.dead_reason)))
            if self.restarts >= self.max_restarts:
                reason = f"{self.dead_reason}; not restarting after {self.restarts} restart(s) (--max_engine_restarts)"
                logger.error(reason)
                if self.on_give_up is not None:
                    self.on_give_up(reason)
                return
            self.restarts += 1
            if self._recv_task is not None:
                self._recv_task.cancel()
            self._rebind()
            started = time.perf_counter()
            try:
                self.info = await self._launch()
            except RuntimeError as exc:
                logger.error("engine restart failed: %s", exc)
                continue  # counted; the loop sees the dead process and tries again or gives up
            self._recv_task = asyncio.create_task(self._receive_loop())
            self.dead_reason = None
            logger.warning("engine restarted (%d of at most %d) in %.1fs", self.restarts, self.max_restarts,
                           time.perf_counter() - started)

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self.process is not None and self.process.is_alive()

    async def generate(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                       images: list[ImageInput] | None = None) -> AsyncIterator[TokenOutput]:
        """Yield the engine's outputs for one request; leaving early (client gone, stop string) aborts it."""
        if not self.alive:
            raise EngineDied(self.dead_reason or "engine is not running")
        queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
        self.queues[rid] = queue
        finished = False
        try:
            await self.to_engine.send_pyobj(AddRequest(rid, prompt_ids, params, list(images or ())))
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            self.queues.pop(rid, None)
            if not finished:
                self.abort(rid)

    async def flush_cache(self, timeout: float = 30.0) -> int:
        """Empty the engine's prefix cache (entries in use by running requests stay); returns the KV tokens
        freed. Raises EngineDied when there is no engine to ask."""
        if not self.alive:
            raise EngineDied(self.dead_reason or "engine is not running")
        self._flush_count += 1
        token = self._flush_count
        waiter = asyncio.get_running_loop().create_future()
        self._flushes[token] = waiter
        try:
            await self.to_engine.send_pyobj(FlushCache(token))
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._flushes.pop(token, None)

    async def lora_call(self, name: str, path: str | None, timeout: float = 120.0) -> LoraReply:
        """Load the adapter folder `path` as `name` (unload `name` when `path` is None) in the engine. A done
        change is also made to the configuration a restarted engine starts from, so it serves the same
        adapters. Raises EngineDied when there is no engine to ask."""
        if not self.alive:
            raise EngineDied(self.dead_reason or "engine is not running")
        self._flush_count += 1
        token = self._flush_count
        waiter = asyncio.get_running_loop().create_future()
        self._lora_calls[token] = waiter
        try:
            await self.to_engine.send_pyobj(UnloadLora(token, name) if path is None else LoadLora(token, name, path))
            reply = await asyncio.wait_for(waiter, timeout)
        finally:
            self._lora_calls.pop(token, None)
        if reply.error is None:
            modules = [m for m in self.engine_config.lora_modules if m.partition("=")[0] != name]
            self.engine_config.lora_modules = modules if path is None else modules + [f"{name}={path}"]
        return reply

    def abort(self, rid: str) -> None:
        """Ask the engine to drop `rid`. Not a coroutine: it runs in a cancelled stream's cleanup, where an
        await would be cancelled too. A send that fails is logged and counted (`failed_sends`)."""
        self._send_nowait(AbortRequest(rid), f"abort for request {rid}")

    def _send_nowait(self, msg: object, what: str) -> None:
        # An asyncio socket reports a failed send on the future it returns (only a few failures, such as a
        # closed socket, are raised at once), so the outcome is read where the future completes.
        try:
            sent = self.to_engine.send_pyobj(msg, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self._send_failed(what, exc)
            return
        sent.add_done_callback(lambda fut: self._check_sent(fut, what))

    def _check_sent(self, fut: asyncio.Future, what: str) -> None:
        if fut.cancelled():
            self._send_failed(what, "cancelled")
        elif fut.exception() is not None:
            self._send_failed(what, fut.exception())

    def _send_failed(self, what: str, exc: BaseException | str) -> None:
        self.failed_sends += 1
        logger.warning("could not send %s to the engine: %s", what, exc)

    async def shutdown(self) -> None:
        self._stopping = True
        for task in (self._recv_task, self._watch_task):
            if task is not None:
                task.cancel()
        if self.process is not None and self.process.is_alive():
            try:
                await asyncio.wait_for(self.to_engine.send_pyobj(Shutdown()), timeout=2)
            except (zmq.ZMQError, asyncio.TimeoutError) as exc:
                self._send_failed("shutdown", exc)  # the process is terminated below instead
            else:
                await asyncio.to_thread(self.process.join, 5)
            if self.process.is_alive():
                self.process.terminate()
                await asyncio.to_thread(self.process.join, 5)
        self.ctx.destroy(linger=0)
