"""Process lifecycle of the API server: graceful drain on SIGTERM/SIGINT, and a non-zero exit when the
engine cannot be kept running.

SIGTERM starts a drain: new requests get 503 (with Retry-After) while the ones in flight run to their end,
for at most --shutdown_timeout seconds; then the server stops (a second signal stops it at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import uvicorn

logger = logging.getLogger("lightllm.api")


@dataclass
class Lifecycle:
    shutdown_timeout: float
    draining: bool = False
    exit_code: int = 0
    inflight: Callable[[], int] = lambda: 0  # set once the server state exists
    _exit: Callable[[], None] | None = None

    def fail(self, reason: str) -> None:
        """Stop the server with a non-zero exit code (e.g. the engine keeps dying)."""
        logger.error("stopping the server: %s", reason)
        self.exit_code = 1
        if self._exit is not None:
            self._exit()


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle
        self._loop: asyncio.AbstractEventLoop | None = None
        lifecycle._exit = self._stop_now

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def _stop_now(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.lifecycle.draining or self._loop is None or not self.started:
            super().handle_exit(sig, frame)  # a second signal, or not serving yet: stop now
            return
        self.lifecycle.draining = True
        logger.info("signal %d: draining %d request(s) in flight (at most %.0fs); new requests get 503",
                    sig, self.lifecycle.inflight(), self.lifecycle.shutdown_timeout)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        start = time.monotonic()
        while self.lifecycle.inflight() > 0 and time.monotonic() - start < self.lifecycle.shutdown_timeout:
            await asyncio.sleep(0.1)
        left = self.lifecycle.inflight()
        if left:
            logger.warning("shutdown timeout: %d request(s) still in flight are cut off", left)
        else:
            logger.info("drained in %.1fs", time.monotonic() - start)
        self.should_exit = True
