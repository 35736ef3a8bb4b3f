"""Row-count bounds that decide which path a quantized layer's call takes (see quant/factory.py)."""

from __future__ import annotations

import os

from lightllm.host import cpu_flags


def cpu_has_fast_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


# Row count from which the dense bf16 copy runs. Measured on an AVX512-BF16 Zen 4 (SmolLM2's shapes, hot
# and cold caches): the bf16 GEMM wins every layer shape from 16 rows (the lm_head from 8). A fixed rule
# rather than a start-up measurement keeps results reproducible across restarts, since the two paths round
# differently.
DENSE_MIN_ROWS = 16
# Row count from which the tiled int8 kernel runs (AVX512-VNNI builds). Its tiles hold up to ~1.6x the bytes
# of the GGUF blocks, yet from the first row it measured faster than the GEMV kernels (their per-weight
# unpacking costs more than the extra bytes): Qwen2.5-Coder-0.5B Q4_K_M decode 11.6 -> 10.7 ms, SmolLM2
# 5.7 -> 5.1 ms (benchmarks/step_profile.py, RESULTS.md fourth session). The GEMV kernels stay for other CPUs
# and under LIGHTLLM_TILED_MIN_ROWS=N (N > 1, or 0 to turn the tiles off).
TILED_MIN_ROWS = 1


def row_threshold(variable: str, default: int) -> int:
    """A row-count bound: the integer in environment variable `variable` when set, else `default`."""
    override = os.environ.get(variable)
    return default if override is None else int(override)
