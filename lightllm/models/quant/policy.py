"""How quantized layers run: which stored form each matrix takes and how the tiled kernel rounds activations
(see quant/factory.py). Fixed per server, never per call: a request's numbers must not depend on how many
rows the step it lands in has (the engine's invariance guarantee, README "Same answer under any load")."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from lightllm.host import cpu_flags

logger = logging.getLogger("lightllm.models")


def cpu_has_fast_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


# The row count from which the opt-in dense bf16 copy used to win on an AVX512-BF16 Zen 4 (SmolLM2's shapes):
# what a user who turns the copy on without a bound gets.
DENSE_MIN_ROWS = 16


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


def policy_from_env() -> LinearPolicy:
    """The policy of processes that build models without a server's flags (benchmarks, scripts):
    LIGHTLLM_ACT_LEVELS and LIGHTLLM_DENSE_MIN_ROWS, else the defaults."""
    return LinearPolicy(act_levels=int(os.environ.get("LIGHTLLM_ACT_LEVELS", "1")),
                        dense_min_rows=int(os.environ.get("LIGHTLLM_DENSE_MIN_ROWS", "0")))


_policy: LinearPolicy | None = None


def configure(policy: LinearPolicy) -> None:
    """Set this process's policy (the engine does, from its configuration, before it loads the model)."""
    global _policy
    _policy = policy


def current() -> LinearPolicy:
    global _policy
    if _policy is None:
        _policy = policy_from_env()
    return _policy
