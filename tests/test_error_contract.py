"""The error contract of every route, on a bare app: an unexpected exception (a tokenizer or template
that raises, a bug) is a 500 with an OpenAI error object, never a bare text page; an engine result's
error kind decides the status; a stream that already began ends with one error event and [DONE]."""

from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from lightllm.engine.protocol import EngineError
from lightllm.server.errors import install_error_handlers, stream_error_event
from lightllm.server.generation import GenerationError


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/tokenizer-bug")
    async def tokenizer_bug():
        raise RuntimeError("tokenizer exploded")

    @app.get("/engine/{kind}")
    async def engine(kind: str):
        raise GenerationError(EngineError(kind, f"{kind} problem"))

    @app.get("/stream")
    async def stream():
        async def events():
            yield "data: {}\n\n"
            try:
                raise ValueError("detokenizer exploded mid-stream")
            except Exception as exc:
                yield f"data: {json.dumps(stream_error_event(exc, 'req-1'))}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_unexpected_exception_is_a_500_error_object():
    client = TestClient(make_app(), raise_server_exceptions=False)
    r = client.get("/tokenizer-bug")
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "internal_error"


def test_engine_error_kind_decides_the_status():
    client = TestClient(make_app(), raise_server_exceptions=False)
    expected = {"client": (400, "invalid_request_error"), "server": (500, "server_error"),
                "unavailable": (503, "service_unavailable_error")}
    for kind, (status, err_type) in expected.items():
        r = client.get(f"/engine/{kind}")
        assert r.status_code == status and r.json()["error"]["type"] == err_type, kind
    assert client.get("/engine/unavailable").headers["Retry-After"]


def test_stream_error_event_then_done():
    client = TestClient(make_app())
    lines = [l for l in client.get("/stream").text.split("\n") if l.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["status"] == 500 and error["type"] == "server_error" and "ValueError" in error["message"]
