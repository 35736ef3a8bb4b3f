"""GGUF matrices kept as stored: `gguf_blocks` keeps a matrix of a type the GGUF kernel runs
(weights.GGUF_NATIVE_TYPES) as its raw blocks; `group_quantized` keeps the formats whose weights are already int4
with a per-32-column scale and offset (Q4_0, Q4_1, Q4_K) as a `GroupQuantized`, which the packed int4 CPU kernel
runs without re-quantizing."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from lightllm.models.quant.gguf_decode import BLOCK_SIZES, _as_blocks, _f16, _k4_nibbles, _k_scale_min, _nibbles
from lightllm.models.quant.linear import Int4Linear
from lightllm.models.quant.weights import GGUF_NATIVE_TYPES, GgufBlocks, GroupQuantized


# ------------------------------------------------------------------------------------------- raw blocks


def runs_from_blocks(type_name: str, shape: Sequence[int]) -> bool:
    """Whether the GGUF kernel can run this matrix (or stacked experts) from its blocks: a type it knows
    and rows that are whole blocks."""
    return (type_name in GGUF_NATIVE_TYPES and len(shape) in (2, 3)
            and int(shape[-1]) % BLOCK_SIZES[type_name][0] == 0)


def gguf_blocks(raw: np.ndarray, type_name: str, shape: Sequence[int]) -> GgufBlocks | None:
    """The [N, K] weight (or stacked experts [E, N, K], as [E * N, K]) as its blocks, bytes as stored; None
    where runs_from_blocks says no."""
    if not runs_from_blocks(type_name, shape):
        return None
    k = int(shape[-1])
    weights, block_bytes = BLOCK_SIZES[type_name]
    rows = int(np.prod(shape[:-1]))
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, k // weights * block_bytes)
    # a writable view (gguf_file's copy-on-write mapping) is kept as is: no copy, pages read from the file on
    # use; a read-only memmap (gguf's GGUFReader) is copied
    return GgufBlocks(torch.from_numpy(data if data.flags.writeable else data.copy()), type_name, k)


def kept_quantized(raw: np.ndarray, type_name: str, shape: Sequence[int]) -> GroupQuantized | GgufBlocks | None:
    """How `--quant_type gguf` keeps a matrix without re-quantizing it (None: decode it). Q4_0 and Q4_1 go to
    PyTorch's packed int4 kernel where its shape rule allows (their groups map onto its (q - 8) * scale +
    zero; it measured 1.45x faster than the GGUF kernel on SmolLM2's Q4_1 layers, benchmarks/RESULTS.md);
    every other type the GGUF kernel runs, Q4_K included (exact weights: the int4 kernel would round its
    scales to bf16, which cost greedy agreement on Qwen2.5-Coder), stays as its blocks."""
    if type_name in ("Q4_0", "Q4_1") and len(shape) == 2 and Int4Linear.supports(int(shape[0]), int(shape[1]), 32):
        groups = group_quantized(raw, type_name, shape)
        if groups is not None:
            return groups
    return gguf_blocks(raw, type_name, shape)


# ------------------------------------------------------------------------------------------- int4 groups


def group_quantized(raw: np.ndarray, type_name: str, shape: Sequence[int]) -> GroupQuantized | None:
    """The [N, K] weight as int4 groups of 32, w = scale * (q - 8) + zero, without re-quantizing; None for
    formats that are not 4-bit with a per-32 affine map (everything but Q4_0, Q4_1 and Q4_K).

    Q4_0's groups reproduce gguf's dequantization exactly; Q4_1 and Q4_K fold their offset into `zero`
    (m + 8 * d, resp. 8 * d * sc - dmin * m), so their dequantized weights differ by float32 rounding."""
    if type_name not in ("Q4_0", "Q4_1", "Q4_K") or len(shape) != 2:
        return None
    n, k = (int(s) for s in shape)
    if k % BLOCK_SIZES[type_name][0]:
        return None
    b = _as_blocks(raw, type_name)
    if type_name == "Q4_K":
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = _k_scale_min(b[:, 4:16])
        scale = d * sc.float()
        zero = 8 * scale - dmin * mn.float()
        q = _k4_nibbles(b[:, 16:144])
    else:
        d = _f16(b[:, 0:2])
        q = _nibbles(b[:, 2:18] if type_name == "Q4_0" else b[:, 4:20])
        scale = d
        zero = torch.zeros_like(d) if type_name == "Q4_0" else _f16(b[:, 2:4]) + 8 * d
    return GroupQuantized(q.to(torch.int32).reshape(n, k), scale.reshape(n, k // 32).contiguous(),
                          zero.reshape(n, k // 32).contiguous(), 32)
