"""The API side of the engine connection: failed sends are seen, and shutdown is a typed message the
engine loop obeys."""

from __future__ import annotations

import asyncio
import logging

from lightllm.engine.protocol import EngineConfig
from lightllm.server.engine_client import EngineClient
from tests.conftest import build_tiny_model


def test_a_failed_abort_is_logged_and_counted(caplog):
    """An asyncio socket reports send errors on the returned future, not by raising: with no engine
    connected the abort's send fails (EAGAIN), and a closed socket fails too; both must be reported."""

    async def run() -> int:
        client = EngineClient(EngineConfig(model_path="unused"))
        try:
            client.abort("r1")
            await asyncio.sleep(0.05)
            client.to_engine.close(linger=0)
            client.abort("r2")
            await asyncio.sleep(0.05)
            return client.failed_sends
        finally:
            client.ctx.destroy(linger=0)

    with caplog.at_level(logging.WARNING, logger="lightllm.api"):
        assert asyncio.run(run()) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("abort for request r1" in m for m in messages) and any("abort for request r2" in m for m in messages)


def test_shutdown_is_a_message_the_engine_obeys(tmp_path):
    """The engine process exits on its own (code 0) when told to; it is not left to be terminated."""
    model_dir = build_tiny_model(tmp_path / "llama", "llama")
    cfg = EngineConfig(model_path=str(model_dir), max_total_token_num=200, grammar_backend="none", device="cpu",
                       data_type="float32")

    async def run() -> int | None:
        client = EngineClient(cfg, log_level="WARNING", max_restarts=0)
        await client.start()
        await client.shutdown()
        return client.process.exitcode

    assert asyncio.run(run()) == 0
