"""Engine process entry point that the API process can reference without importing torch."""

from __future__ import annotations

from lightllm.engine.protocol import EngineConfig


def engine_main(cfg: EngineConfig, *args) -> None:
    from lightllm.engine.engine import run_engine
    from lightllm.kernels import cpu as cpu_kernels

    cpu_kernels.configure(cfg.cpu_kernels)  # --cpu_kernels / --no-cpu_kernels, before the model loads
    run_engine(cfg, *args)
