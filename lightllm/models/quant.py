"""Linear layers: dense, and weight-only int8 / int4 using PyTorch's packed CPU kernels.

On AVX2 CPUs `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` fed bf16 activations read 4-8x fewer
weight bytes than fp32 `F.linear`, which is what bounds decode speed (see shared/reference/cpu_performance.md).
GGUF Q4_0/Q4_1/Q4_K blocks map onto int4pack's `(q - 8) * scale + zero` with group 32, so such tensors are
repacked without re-quantizing (`--quant_type gguf`; see gguf_quants.group_quantized).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from lightllm.host import cpu_flags

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


def cat_rows(parts: list) -> torch.Tensor | GroupQuantized:
    """Concatenate weights along the output dimension (fusing q/k/v or gate/up)."""
    if all(isinstance(p, GroupQuantized) for p in parts) and len({p.group for p in parts}) == 1:
        return GroupQuantized(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                              torch.cat([p.zero for p in parts]), parts[0].group)
    dense = [p.dequantize() if isinstance(p, GroupQuantized) else p for p in parts]
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


class RowCountDispatch:
    """A quantized layer plus a dense bf16 copy of the same (dequantized) weights, chosen per call by the
    number of input rows. The packed int4/int8 kernels are GEMVs whose cost grows linearly with the rows;
    on CPUs with native bf16 dot products (AVX512-BF16, AMX) oneDNN's bf16 GEMM overtakes them from a
    batch of ~16 rows, while the quantized kernel stays ~2x faster for single-token decode."""

    def __init__(self, quantized: "Int4Linear | Int8Linear", dense: DenseLinear, min_rows: int):
        self.quantized = quantized
        self.dense = dense
        self.min_rows = min_rows
        self.input_dtype = torch.bfloat16

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw(x).to(x.dtype)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < self.min_rows:
            return self.quantized.raw(x)
        y = self.dense.raw(x.to(torch.bfloat16))
        return y if self.quantized.bias is None else y + self.quantized.bias  # fp32 bias, as the quantized path


def cpu_has_fast_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


# Row count from which the dense bf16 copy runs. Measured on an AVX512-BF16 Zen 4 (SmolLM2's shapes, hot
# and cold caches): the bf16 GEMM wins every layer shape from 16 rows (the lm_head from 8). A fixed rule
# rather than a start-up measurement keeps results reproducible across restarts, since the two paths round
# differently.
DENSE_MIN_ROWS = 16


def with_dense_batch_path(quantized: "Int4Linear | Int8Linear", dequantize: Callable[[], torch.Tensor]):
    """Wrap `quantized` in a RowCountDispatch on CPUs with native bf16 dot products.

    LIGHTLLM_DENSE_MIN_ROWS overrides the row threshold (an integer; 0 disables the dense copy)."""
    override = os.environ.get("LIGHTLLM_DENSE_MIN_ROWS")
    if override is not None:
        min_rows = int(override)
    else:
        min_rows = DENSE_MIN_ROWS if cpu_has_fast_bf16() else 0
    if min_rows <= 0:
        return quantized
    return RowCountDispatch(quantized, DenseLinear(dequantize().to(torch.bfloat16)), min_rows)


def make_linear(weight: torch.Tensor | GroupQuantized, bias: torch.Tensor | None, quant_type: str,
                device: torch.device, dtype: torch.dtype):
    """Build the linear layer for `weight` under `--quant_type` (quantized paths are CPU-only for now)."""
    quantized_ok = device.type == "cpu"
    if isinstance(weight, GroupQuantized):
        if quant_type == "gguf" and quantized_ok and Int4Linear.supports(*weight.shape, weight.group):
            return with_dense_batch_path(Int4Linear(weight, bias), lambda: Int4Linear.dequantized(weight))
        weight = weight.dequantize()
    if quant_type == "none" or not quantized_ok:
        return DenseLinear(weight.to(device=device, dtype=dtype), bias)
    if quant_type.startswith("int4wo"):
        group = int(quant_type.split("-")[1])
        if Int4Linear.supports(*weight.shape, group):
            quantized = quantize_int4(weight, group)
            return with_dense_batch_path(Int4Linear(quantized, bias), lambda: Int4Linear.dequantized(quantized))
    layer = Int8Linear(weight, bias)  # int8wo, and gguf tensors that are not Q4_0/Q4_1/Q4_K
    return with_dense_batch_path(layer, layer.dequantized)
