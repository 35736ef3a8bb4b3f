"""Entry point: `python -m lightllm.server.api_server --model_dir DIR --port 8088`."""

from __future__ import annotations

import logging
import os
import sys

from lightllm.server.args import ServerArgs, parse_args

logger = logging.getLogger("lightllm.api")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lightllm.models.loading.catalog import ModelUnavailable, resolve_model

    try:
        model_path = resolve_model(args.model_dir)
    except ModelUnavailable as exc:
        raise SystemExit(f"error: {exc}") from None
    logger.info("loading %s", model_path)
    if args.node_rank > 0:
        sys.exit(run_node_ranks(args, model_path))
    if args.run_mode in ("prefill", "decode"):
        _exit_now(run_pd_node(args, model_path))

    engine = None
    if args.run_mode != "pd_master":  # (a master has no engine of its own)
        from lightllm.server.engine_client import EngineClient

        # the engine imports PyTorch and loads the weights while this process imports its routes and tokenizer
        engine = EngineClient(args.engine_config(model_path), args.log_level, max_restarts=args.max_engine_restarts)
        engine.spawn()

    import uvicorn

    from lightllm.server.http_app import create_app
    from lightllm.server.lifecycle import DrainingServer, Lifecycle

    lifecycle = Lifecycle(shutdown_timeout=args.shutdown_timeout)
    app = create_app(args, model_path, lifecycle, engine)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False,
                            timeout_graceful_shutdown=5)
    server = DrainingServer(config, lifecycle)
    server.run()
    if not server.started and lifecycle.exit_code == 0:
        sys.exit(1)  # start-up failed (the log says why)
    sys.exit(lifecycle.exit_code)


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown: a node's torch.distributed objects (its TCPStore's daemon
    thread) can abort it ("terminate called without an active exception", status -6 instead of `code`)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_pd_node(args: ServerArgs, model_path: str) -> int:
    """A prefill or decode node: no HTTP, an engine that registers with the pd_master (engine/pd_node.py)."""
    from lightllm.engine.pd_node import run_node

    return run_node(args.engine_config(model_path), args.run_mode, f"tcp://{args.pd_master_ip}:{args.pd_master_port}",
                    args.host, args.log_level)


def run_node_ranks(args: ServerArgs, model_path: str) -> int:
    """A node other than 0: no HTTP, only this node's tensor-parallel ranks, until they exit."""
    from lightllm.engine.distributed import local_ranks, start_workers

    cfg = args.engine_config(model_path)
    ranks = local_ranks(cfg, args.node_rank)
    logger.info("node %d: running ranks %d..%d of %d (node 0 at %s:%d serves HTTP)", args.node_rank, ranks.start,
                ranks.stop - 1, cfg.tp, cfg.nccl_host, cfg.nccl_port)
    procs = start_workers(cfg, ranks, args.log_level)
    try:
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        codes = [proc.wait() for proc in procs]
    return max(codes, default=0)


if __name__ == "__main__":
    main()
