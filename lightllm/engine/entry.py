"""Engine process entry point that the API process can reference without importing torch."""

from __future__ import annotations

from lightllm.engine.protocol import EngineConfig


def engine_main(cfg: EngineConfig, *args) -> None:
    from lightllm.host import die_with_parent

    die_with_parent()  # an API process killed outright must not leave its engine (and the memory it holds)
    from lightllm.engine.engine import run_engine
    from lightllm.engine.model_setup import configure_process

    configure_process(cfg)  # --cpu_kernels, --tile_cache: before the model loads
    run_engine(cfg, *args)
