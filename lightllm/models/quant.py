"""Linear layers: dense, weight-only int8 / int4 using PyTorch's packed CPU kernels, and GGUF blocks as stored.

On AVX2 CPUs `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` fed bf16 activations read 4-8x fewer
weight bytes than fp32 `F.linear`, which is what bounds decode speed (see shared/reference/cpu_performance.md).
Under `--quant_type gguf` a GGUF file's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K matrices run from their own
blocks (`GgufLinear`, kernels/gguf_matmul.c): exact weights at the file's 4.5-8.5 bits per weight; other
types are read exactly and re-quantized to int8.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lightllm.host import cpu_flags
from lightllm.kernels import cpu as cpu_kernels

QUANT_TYPES = ("none", "int8wo", "int4wo-32", "int4wo-64", "int4wo-128", "gguf")


@dataclass
class GroupQuantized:
    """Weights as w = scale * (q - 8) + zero per group of `group` input columns; q in 0..15."""

    q: torch.Tensor  # int32 [N, K]
    scale: torch.Tensor  # float32 [N, K // group]
    zero: torch.Tensor  # float32 [N, K // group]
    group: int

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        q = self.q.reshape(n, k // self.group, self.group).float()
        return ((q - 8) * self.scale.unsqueeze(-1) + self.zero.unsqueeze(-1)).reshape(n, k)

    def permute_rows(self, fn) -> "GroupQuantized":
        return GroupQuantized(fn(self.q), fn(self.scale), fn(self.zero), self.group)


@dataclass
class GgufBlocks:
    """Rows of a weight matrix as GGUF quantized blocks, bytes exactly as stored in the file."""

    raw: torch.Tensor  # uint8 [N, K / block_weights * block_bytes]
    type_name: str  # one of GGUF_NATIVE_TYPES
    k: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.raw.shape[0], self.k))

    @property
    def type_code(self) -> int:
        """The ggml type number (what the kernel is told)."""
        return int(GGMLQuantizationType[self.type_name])

    @property
    def block(self) -> tuple[int, int]:
        """(weights, bytes) per block."""
        return GGML_QUANT_SIZES[GGMLQuantizationType[self.type_name]]

    def dequantize(self) -> torch.Tensor:
        from lightllm.models.gguf_quants import dequantize  # (gguf_quants builds on this module)
        return dequantize(self.raw.numpy(), self.type_name, tuple(self.shape))

    def rows(self, start: int, end: int) -> "GgufBlocks":
        return GgufBlocks(self.raw[start:end], self.type_name, self.k)

    def rows_at(self, indices: torch.Tensor) -> "GgufBlocks":
        return GgufBlocks(self.raw.index_select(0, indices), self.type_name, self.k)

    def permute_rows(self, fn) -> "GgufBlocks":
        return GgufBlocks(fn(self.raw).contiguous(), self.type_name, self.k)

    def cols(self, start: int, end: int) -> "GgufBlocks | None":
        """Columns start..end, or None when the cut falls inside a block."""
        weights, nbytes = self.block
        if start % weights or end % weights:
            return None
        return GgufBlocks(self.raw[:, start // weights * nbytes:end // weights * nbytes].contiguous(),
                          self.type_name, end - start)


# GGUF types GgufLinear runs from their blocks (kernels/gguf_matmul.c).
GGUF_NATIVE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


@dataclass
class GgufRowGroups:
    """A fused weight (q/k/v, gate/up) whose parts were stored with different GGUF types."""

    parts: list[GgufBlocks]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((sum(p.shape[0] for p in self.parts), self.parts[0].k))

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])


def cat_rows(parts: list) -> "torch.Tensor | GroupQuantized | GgufBlocks | GgufRowGroups":
    """Concatenate weights along the output dimension (fusing q/k/v or gate/up)."""
    if all(isinstance(p, GgufBlocks) for p in parts):
        merged: list[GgufBlocks] = []
        for p in parts:  # neighbours of one type become one run of rows
            if merged and merged[-1].type_name == p.type_name:
                merged[-1] = GgufBlocks(torch.cat([merged[-1].raw, p.raw]), p.type_name, p.k)
            else:
                merged.append(p)
        return merged[0] if len(merged) == 1 else GgufRowGroups(merged)
    if all(isinstance(p, GroupQuantized) for p in parts) and len({p.group for p in parts}) == 1:
        return GroupQuantized(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                              torch.cat([p.zero for p in parts]), parts[0].group)
    dense = [p if isinstance(p, torch.Tensor) else p.dequantize() for p in parts]
    return torch.cat(dense).contiguous()


def quantize_int4(weight: torch.Tensor, group: int) -> GroupQuantized:
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    q = torch.clamp(torch.round((w - lo.unsqueeze(-1)) / scale.unsqueeze(-1)), 0, 15).to(torch.int32)
    return GroupQuantized(q.reshape(n, k), scale, lo + 8 * scale, group)


class Linear(Protocol):
    """What the model needs of a linear layer, dense or weight-only quantized."""

    input_dtype: torch.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def raw(self, x: torch.Tensor) -> torch.Tensor: ...


class DenseLinear:
    """`__call__` returns x's dtype; `raw` takes `input_dtype` and returns the matmul's own output dtype,
    which the fused CPU kernels consume directly (no cast ops between layers)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight
        self.bias = bias
        self.input_dtype = weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Int8Linear:
    """Per-output-channel symmetric int8 weights; bf16 activations into the packed kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
        self.weight = torch.clamp(torch.round(w / scales[:, None]), -127, 127).to(torch.int8).contiguous()
        self.scales = scales.to(torch.bfloat16)
        self.bias = bias
        self.input_dtype = torch.bfloat16

    def dequantized(self) -> torch.Tensor:
        """The float32 weights this layer computes with."""
        return self.weight.float() * self.scales.float()[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw(x).to(x.dtype)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scales)
        return y if self.bias is None else y + self.bias


class Int4Linear:
    def __init__(self, weight: GroupQuantized, bias: torch.Tensor | None = None):
        self.group = weight.group
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.contiguous(), 2)
        self.scales_zeros = torch.stack([weight.scale, weight.zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.bias = bias
        self.input_dtype = torch.bfloat16

    @staticmethod
    def dequantized(weight: GroupQuantized) -> torch.Tensor:
        """The float32 weights the layer built from `weight` computes with (scales and zeros stored as bf16)."""
        scale, zero = (t.to(torch.bfloat16).float() for t in (weight.scale, weight.zero))
        return GroupQuantized(weight.q, scale, zero, weight.group).dequantize()

    @staticmethod
    def supports(n: int, k: int, group: int) -> bool:
        return k % group == 0 and k % 32 == 0 and n % 16 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw(x).to(x.dtype)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group,
                                                       self.scales_zeros)
        return y if self.bias is None else y + self.bias


class GgufLinear:
    """x @ W.T with W in GGUF blocks as stored (one or several row runs of different types), computed by the
    fused CPU kernel from int8-quantized activations, as llama.cpp does; takes and returns float32."""

    def __init__(self, weight: "GgufBlocks | GgufRowGroups", bias: torch.Tensor | None, kernels):
        self.weight = weight if isinstance(weight, GgufRowGroups) else GgufRowGroups([weight])
        self.parts = self.weight.parts
        self.out_features, self.in_features = self.weight.shape
        self.bias = bias
        self.input_dtype = torch.float32
        self._kernels = kernels
        # (first output column, kernel bound to that part's blocks)
        self._runs: list[tuple[int, Callable]] = []
        start = 0
        for part in self.parts:
            self._runs.append((start, kernels.gguf_matmul_bound(part.type_code, part.raw, part.k)))
            start += part.shape[0]

    def dequantized(self) -> torch.Tensor:
        return self.weight.dequantize()

    def exact_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Float32 weight rows `indices` (output features), decoded from the blocks."""
        out = torch.empty(indices.shape[0], self.in_features)
        start = 0
        for part in self.parts:
            end = start + part.shape[0]
            mine = (indices >= start) & (indices < end)
            if mine.any():
                out[mine] = self._decode(part.rows_at(indices[mine] - start))
            start = end
        return out

    def _decode(self, blocks: GgufBlocks) -> torch.Tensor:
        """Float32 rows of `blocks` by the kernels' decoder (the same values as gguf's dequantization, at
        about a fifth of its cost on a few rows: this runs every step for the lm_head's refinement)."""
        u, ws, wc = self._kernels.gguf_decode(blocks.type_code, blocks.raw, blocks.k)
        rows = u.shape[0]
        return (u.view(rows, -1, 16).float() * ws.unsqueeze(-1) + wc.unsqueeze(-1)).view(rows, blocks.k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw(x).to(x.dtype)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        out = run_column_parts(self._runs, x, self.in_features, self.out_features)
        if self.bias is not None:
            out += self.bias
        return out


_KERNEL_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def run_column_parts(runs: "list[tuple[int, Callable]]", x: torch.Tensor, in_features: int,
                     out_features: int) -> torch.Tensor:
    """float32 x @ W.T for a weight stored as parts of rows, each computed by its bound kernel call
    (first output column, run(x, out, column)) straight into its own columns of the output."""
    flat = x.dim() == 2  # the fused forward's case: no reshapes (each costs about a microsecond)
    lead = x.shape[:-1]
    if not flat:
        x = x.reshape(-1, in_features)
    if not x.is_contiguous() or x.dtype not in _KERNEL_INPUT_DTYPES:
        x = x.float().contiguous()
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    if x.shape[0]:
        for start, run in runs:
            run(x, out, start)
    return out if flat else out.reshape(*lead, out_features)


class RowCountDispatch:
    """A quantized layer plus a second path for the same weights, chosen per call by the number of input rows
    (from `min_rows` on). The layer's own kernels (GGUF blocks, int4/int8 packs) are GEMVs whose cost grows
    linearly with the rows; the second path reads the weights once for the whole batch: the tiled int8
    kernel (models/tiled.py) where it runs vectorised (from the first row: it is faster there too), else on
    CPUs with native bf16 dot products (AVX512-BF16, AMX) a dense bf16 copy for oneDNN's GEMM."""

    def __init__(self, quantized: "Int4Linear | Int8Linear | GgufLinear", batched, min_rows: int):
        self.quantized = quantized
        self.batched = batched  # DenseLinear (bf16) or tiled.TiledLinear, without bias
        self.min_rows = min_rows
        # what the caller should hand in: the path that takes (nearly) every call decides
        self.input_dtype = batched.input_dtype if min_rows <= 1 else quantized.input_dtype
        self._batched_dtype = torch.bfloat16 if isinstance(batched, DenseLinear) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw(x).to(x.dtype)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < self.min_rows:
            return self.quantized.raw(x)
        y = self.batched.raw(x if self._batched_dtype is None else x.to(self._batched_dtype))
        return y if self.quantized.bias is None else y + self.quantized.bias  # fp32 bias, as the quantized path


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


def with_batch_path(quantized: "Int4Linear | Int8Linear | GgufLinear",
                    weight: "GgufBlocks | GgufRowGroups | GroupQuantized | None",
                    dequantize: Callable[[], torch.Tensor]):
    """Wrap `quantized` in a RowCountDispatch with the fastest batched path this CPU has for `weight` (its
    stored form; None for Int8Linear's own int8 weights), or return it as is where none is faster.

    LIGHTLLM_TILED_MIN_ROWS / LIGHTLLM_DENSE_MIN_ROWS override the row thresholds (an integer; 0 disables
    that path)."""
    from lightllm.models.tiled import TiledLinear  # (tiled builds on this module's weight types)
    kernels = cpu_kernels.load()
    if kernels is not None and kernels.tiled_fast and TiledLinear.supports(quantized, weight):
        tiled_rows = row_threshold("LIGHTLLM_TILED_MIN_ROWS", TILED_MIN_ROWS)
        if tiled_rows > 0:
            return RowCountDispatch(quantized, TiledLinear.from_layer(quantized, weight, kernels), tiled_rows)
    dense_rows = row_threshold("LIGHTLLM_DENSE_MIN_ROWS", DENSE_MIN_ROWS if cpu_has_fast_bf16() else 0)
    if dense_rows <= 0:
        return quantized
    return RowCountDispatch(quantized, DenseLinear(dequantize().to(torch.bfloat16)), dense_rows)


def make_linear(weight: "torch.Tensor | GroupQuantized | GgufBlocks | GgufRowGroups", bias: torch.Tensor | None,
                quant_type: str, device: torch.device, dtype: torch.dtype):
    """Build the linear layer for `weight` under `--quant_type` (quantized paths are CPU-only for now)."""
    quantized_ok = device.type == "cpu"
    if isinstance(weight, (GgufBlocks, GgufRowGroups)):
        kernels = cpu_kernels.load() if quant_type == "gguf" and quantized_ok else None
        if kernels is not None:
            layer = GgufLinear(weight, bias, kernels)
            return with_batch_path(layer, weight, layer.dequantized)
        weight = weight.dequantize()
    if isinstance(weight, GroupQuantized):
        if quant_type == "gguf" and quantized_ok and Int4Linear.supports(*weight.shape, weight.group):
            return with_batch_path(Int4Linear(weight, bias), weight, lambda: Int4Linear.dequantized(weight))
        weight = weight.dequantize()
    if quant_type == "none" or not quantized_ok:
        return DenseLinear(weight.to(device=device, dtype=dtype), bias)
    if quant_type.startswith("int4wo"):
        group = int(quant_type.split("-")[1])
        if Int4Linear.supports(*weight.shape, group):
            quantized = quantize_int4(weight, group)
            return with_batch_path(Int4Linear(quantized, bias), quantized, lambda: Int4Linear.dequantized(quantized))
    layer = Int8Linear(weight, bias)  # int8wo, and gguf tensors no kernel above runs as stored
    return with_batch_path(layer, None, layer.dequantized)
