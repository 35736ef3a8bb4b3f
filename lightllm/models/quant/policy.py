"""How quantized layers run: which stored form each matrix takes and how the tiled kernel rounds activations
(see quant/factory.py). Fixed per server, never per call: a request's numbers must not depend on how many
rows the step it lands in has (the engine's invariance guarantee, README "Same answer under any load")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearPolicy:
    """act_levels: int8 activation levels of the tiled kernel on every call (1: llama.cpp's Q8 activations;
    2: a second int8 level holding the first's rounding residual, float32-like activations for ~2x the
    integer work of batched calls, free for single rows). dense_min_rows: 0 keeps one stored form per
    matrix; N > 0 adds a dense bf16 copy of every quantized matrix that runs calls of N rows or more (faster
    prefill on AVX512-BF16/AMX CPUs, ~2 bytes per weight more memory, and results that depend on the step's
    row count). tiles: run the 16-row tiled kernel where this CPU runs it vectorised (AVX512-VNNI); False keeps
    each layer's own row-local kernel (tests, and what AVX2 hosts run)."""

    act_levels: int = 1
    dense_min_rows: int = 0
    tiles: bool = True

    def __post_init__(self) -> None:
        if self.act_levels not in (1, 2):
            raise ValueError(f"activation levels must be 1 or 2, not {self.act_levels}")
        if self.dense_min_rows < 0:
            raise ValueError(f"the dense copy's row bound must be >= 0, not {self.dense_min_rows}")


_policy = LinearPolicy()


def configure(policy: LinearPolicy) -> None:
    """Set this process's policy: the engine does, from its EngineConfig (--act_levels,
    --dense_bf16_min_rows), before it loads the model; processes that load models directly keep the defaults."""
    global _policy
    _policy = policy


def current() -> LinearPolicy:
    return _policy
