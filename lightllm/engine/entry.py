"""Engine process entry point that the API process can reference without importing torch."""

from __future__ import annotations


def engine_main(*args) -> None:
    from lightllm.engine.engine import run_engine

    run_engine(*args)
