"""FastAPI app: lifespan (engine start/stop), auth, CORS, error handlers and the small routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from lightllm.engine.protocol import parse_lora_modules
from lightllm.server.args import ServerArgs
from lightllm.server.auth import ADMIN, AuthMiddleware, AuthPolicy, install_openapi_security
from lightllm.server.engine_client import EngineClient, EngineDied
from lightllm.server.errors import APIError, error_response, install_error_handlers
from lightllm.server.limits import MAX_BODY_BYTES
from lightllm.server.openapi import COMMON_ERRORS, HEALTH_RESPONSES, HealthStatus, install_openapi
from lightllm.server.lifecycle import Lifecycle
from lightllm.server.parser_selection import select_parsers
from lightllm.server.state import ServerState, engine_unavailable

logger = logging.getLogger("lightllm.api")


def create_app(args: ServerArgs, model_path: str, lifecycle: Lifecycle | None = None,
               engine: EngineClient | None = None) -> FastAPI:
    """`engine`: a client whose process the caller already spawned (api_server does, before importing this
    module); else the app starts its own at start-up."""
    lifecycle = lifecycle or Lifecycle(shutdown_timeout=args.shutdown_timeout)
    spawned = engine

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        from lightllm.tokenizer import end_of_generation_ids, load_tokenizer

        start = time.perf_counter()
        if args.run_mode == "pd_master":  # the HTTP front of a PD deployment: nodes register, no model here
            from lightllm.server.pd.master import PDMasterClient

            engine = PDMasterClient(args.pd_master_ip, args.pd_master_port, args.pd_hold_timeout)
        else:
            engine = spawned or EngineClient(args.engine_config(model_path), args.log_level,
                                             max_restarts=args.max_engine_restarts)
            engine.on_give_up = lifecycle.fail
        tokenizer_task = asyncio.create_task(asyncio.to_thread(load_tokenizer, model_path, args.chat_template,
                                                               args.trust_remote_code, args.tokenizer_mode))
        try:
            info = await engine.start()
            tokenizer = await tokenizer_task
        except BaseException:
            tokenizer_task.cancel()
            await engine.shutdown()
            raise
        name = args.model_name if args.model_name != "default_model_name" else _default_model_name(model_path, info)
        parsers = select_parsers(args.tool_call_parser, args.reasoning_parser, tokenizer.chat_template,
                                 info.architecture)
        logger.info("tool call parser: %s (%s); reasoning parser: %s (%s)", parsers.tool_call_parser,
                    parsers.tool_call_reason, parsers.reasoning_parser, parsers.reasoning_reason)
        app.state.parsers = parsers
        app.state.server = ServerState(args=args, tokenizer=tokenizer, engine=engine, model_name=name,
                                       max_model_len=info.max_model_len,
                                       eog_token_ids=sorted(set(end_of_generation_ids(tokenizer)) | set(info.eos_token_ids)),
                                       tool_call_parser=parsers.tool_call_parser,
                                       reasoning_parser=parsers.reasoning_parser, lifecycle=lifecycle,
                                       lora_adapters=parse_lora_modules(args.lora_modules))
        lifecycle.inflight = lambda: app.state.server.inflight
        # xgrammar (the API's grammar checks) is imported by the first constrained request, not here: it brings
        # PyTorch, ~300 MB and seconds of CPU that a server answering only plain requests never needs
        logger.info("model %s (%s) dtype=%s device=%s kv_cache=%d tokens max_len=%d ready in %.1fs",
                    name, info.architecture, info.dtype, info.device, info.max_total_token_num,
                    info.max_model_len, time.perf_counter() - start)
        logger.info("serving on http://%s:%d (OpenAI API at http://%s:%d/v1)", args.host, args.port, args.host, args.port)
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="lightllm", version=_version(), lifespan=lifespan, responses=COMMON_ERRORS)
    install_error_handlers(app)
    # outermost last: CORS (so its preflights and headers cover 401s too), then the key check (before any
    # body is read), then the body size limit
    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)
    policy = AuthPolicy(args.api_key, args.admin_api_key, args.metrics_require_key)
    if policy.enabled:
        app.add_middleware(AuthMiddleware, fastapi_app=app, policy=policy)
    logger.info("access: %s", policy.describe())
    if args.allowed_origins:
        # Bearer / x-api-key headers need no CORS credentials mode, so cookies stay off
        app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
        logger.info("CORS: browser pages from %s may call this server", ", ".join(args.allowed_origins))

    from lightllm.server import native
    from lightllm.server import lora_routes
    from lightllm.server.anthropic import routes as anthropic_routes
    from lightllm.server.openai import chat, completions, tokenize
    from lightllm.server.openai import responses as responses_api

    app.include_router(native.router)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(responses_api.router)
    app.include_router(tokenize.router)
    app.include_router(anthropic_routes.router)
    app.include_router(lora_routes.router)
    _add_info_routes(app)
    _add_worker_info_routes(app, model_path)
    if not args.disable_webui:
        from lightllm.server.webui import install_webui

        install_webui(app)  # the chat page at / (static files stay open under --api_key; its API calls send the key)
    install_openapi(app, hand_parsed=[native.GenerateRequest])
    install_openapi_security(app, policy)
    return app


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("lightllm")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


class BodySizeLimit:
    """413 for a request body over `max_bytes`: by Content-Length before reading, else while it streams in."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body larger than {self.max_bytes} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await error_response(413, message, code="request_too_large",
                                        path=scope.get("path"))(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.max_bytes:
                raise APIError(413, message, code="request_too_large")
            return event

        return await self.app(scope, limited_receive, send)


def _default_model_name(model_path: str, info: Any) -> str:
    from pathlib import Path

    path = Path(model_path)
    return path.stem if path.suffix == ".gguf" else path.name or info.model_name


class TokensRequest(BaseModel):
    text: str


class ProbeStatus(BaseModel):
    status: str


def _add_info_routes(app: FastAPI) -> None:
    def not_ready(request: Request) -> JSONResponse | None:
        state: ServerState = request.app.state.server
        if not state.engine.alive:
            return JSONResponse({"message": f"engine not running: {state.engine.dead_reason}"}, status_code=503,
                                headers={"Retry-After": "5"})
        if state.lifecycle.draining:
            return JSONResponse({"message": "shutting down"}, status_code=503)
        return None

    @app.get("/health", responses=HEALTH_RESPONSES)
    @app.head("/health", include_in_schema=False)  # load balancers probe with HEAD (LightLLM answers it)
    @app.get("/healthz", responses=HEALTH_RESPONSES)
    async def health(request: Request):
        """Ready to serve: the engine runs and the server is not draining."""
        return not_ready(request) or {"message": "Ok"}

    # The Kubernetes-style probes answer in LightLLM's shape.
    @app.get("/readiness", responses={200: {"model": ProbeStatus, "description": "Ready"},
                                      503: {"model": HealthStatus, "description": "Engine down or draining"}})
    async def readiness(request: Request):
        """Ready to serve: the engine runs and the server is not draining."""
        return not_ready(request) or {"status": "ok"}

    @app.get("/liveness", response_model=ProbeStatus)
    async def liveness():
        """The API process answers (a supervisor restarts it when this fails)."""
        return {"status": "ok"}

    @app.get("/get_server_info")
    async def get_server_info(request: Request):
        """The start arguments (LightLLM's shape) with what was resolved from the model."""
        state: ServerState = request.app.state.server
        parsers = request.app.state.parsers
        info = state.engine.info
        return {**state.args.public_dict(),
                "model_name": state.model_name, "architecture": info.architecture,
                "tool_call_parser": parsers.tool_call_parser, "tool_call_parser_reason": parsers.tool_call_reason,
                "reasoning_parser": parsers.reasoning_parser, "reasoning_parser_reason": parsers.reasoning_reason,
                "max_model_len": state.max_model_len, "max_total_token_num": info.max_total_token_num,
                "dtype": info.dtype, "device": info.device,
                # the engine's start-up memory breakdown in bytes and the KV sizing rule (engine/memory.py)
                "memory": info.memory, "kv_cache_rule": info.kv_cache_rule}

    @app.get("/get_model_name")
    async def get_model_name(request: Request):
        return {"model_name": request.app.state.server.model_name}

    @app.post("/tokens")
    async def tokens(req: TokensRequest, request: Request):
        return {"ntokens": len(request.app.state.server.tokenizer.encode(req.text, add_special_tokens=False))}

    @app.get("/token_load")
    async def token_load(request: Request):
        state: ServerState = request.app.state.server
        stats = state.engine.stats
        total = state.engine.info.max_total_token_num
        held = stats.kv_held_by_requests if stats else 0
        return {"kv_total": total, "kv_used": stats.kv_used if stats else 0,
                "kv_cached": stats.kv_cached if stats else 0,
                "kv_used_by_requests": held, "current_load": held / total,
                "running": stats.running if stats else 0, "waiting": stats.waiting if stats else 0,
                "inflight": state.inflight,
                **({"pd_nodes": state.engine.kv_by_role()} if state.args.run_mode == "pd_master" else {})}

    @app.get("/metrics", response_class=Response, responses={200: {
        "description": "Prometheus text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics(request: Request):
        from lightllm.server.metrics import render_metrics

        body, content_type = render_metrics(request.app.state.server)
        return Response(body, media_type=content_type)


def _add_worker_info_routes(app: FastAPI, model_path: str) -> None:
    """What a data-parallel router (sglang-router / SGLang Model Gateway) reads from each worker, in SGLang's
    shapes: at registration `/server_info` (the served name becomes the router's model id) and `/model_info`;
    `/get_model_info` is forwarded by the router's own route, `/get_load` feeds its `/get_loads` and load-aware
    policies. One engine per server, so one data-parallel rank."""

    @app.get("/server_info")
    async def server_info(request: Request):
        """SGLang's server-info shape (`/get_server_info` keeps LightLLM's start-argument shape)."""
        state: ServerState = request.app.state.server
        return {"model_path": model_path, "tokenizer_path": model_path, "served_model_name": state.model_name,
                "dp_size": 1, "max_total_tokens": state.engine.info.max_total_token_num,
                "max_running_requests": state.args.running_max_req_size,
                "max_prefill_tokens": state.args.batch_max_tokens, "context_length": state.max_model_len,
                "version": _version()}

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info(request: Request):
        state: ServerState = request.app.state.server
        return {"model_path": model_path, "tokenizer_path": model_path, "is_generation": True,
                "architectures": [state.engine.info.architecture]}

    @app.post("/flush_cache", dependencies=[ADMIN])
    async def flush_cache(request: Request):
        """Empty the prefix cache (SGLang's route; the router's /flush_cache calls every worker's). KV held by
        running requests stays theirs."""
        state: ServerState = request.app.state.server
        try:
            freed = await state.engine.flush_cache()
        except (EngineDied, asyncio.TimeoutError) as exc:
            raise engine_unavailable(f"engine unavailable: {exc or 'no reply'}") from exc
        return {"message": "Cache flushed.", "freed_tokens": freed}

    @app.get("/get_load")
    async def get_load(request: Request):
        """SGLang's per-rank load list: requests running and waiting, KV tokens held by requests."""
        state: ServerState = request.app.state.server
        stats = state.engine.stats
        running, waiting = (stats.running, stats.waiting) if stats else (0, 0)
        return [{"dp_rank": 0, "num_reqs": running + waiting, "num_waiting_reqs": waiting,
                 "num_tokens": stats.kv_held_by_requests if stats else 0}]
