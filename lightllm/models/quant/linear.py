"""Linear layers: dense, weight-only int8 / int4 using PyTorch's packed CPU kernels, and GGUF blocks as stored.

On AVX2 CPUs `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` fed bf16 activations read 4-8x fewer
weight bytes than fp32 `F.linear`, which is what bounds decode speed. Under `--quant_type gguf` a GGUF file's
Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K matrices run from their own blocks (`GgufLinear`,
kernels/gguf_matmul.c): exact weights at the file's 4.5-8.5 bits per weight; other types are read exactly and
re-quantized to int8. Which form a weight takes is decided in quant/factory.py.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from lightllm.models.quant.weights import GgufBlocks, GgufRowGroups, GroupQuantized

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
        self._bound: list[tuple[int, Callable]] | None = None

    @property
    def _runs(self) -> list[tuple[int, Callable]]:
        """(first output column, kernel bound to that part's blocks), bound on the first call: a layer whose
        tiles come from the tile cache is never called, and binding would read every block of the file."""
        if self._bound is None:
            starts = [sum(p.shape[0] for p in self.parts[:i]) for i in range(len(self.parts))]
            self._bound = [(start, self._kernels.gguf_matmul_bound(part.type_code, part.raw, part.k))
                           for start, part in zip(starts, self.parts)]
        return self._bound

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
        return run_column_parts(self._runs, x, self.in_features, self.out_features, self.bias)


_KERNEL_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def run_column_parts(runs: "list[tuple[int, Callable]]", x: torch.Tensor, in_features: int,
                     out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32 x @ W.T (+ bias) for a weight stored as parts of rows, each computed by its bound kernel call
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
    if bias is not None:
        out += bias
    return out if flat else out.reshape(*lead, out_features)


class RowCountDispatch:
    """A quantized layer plus the opt-in dense bf16 copy of the same weights (quant.policy.LinearPolicy's
    dense_min_rows), which runs the calls of `min_rows` rows or more through oneDNN's GEMM on CPUs with native
    bf16 dot products. Two forms that round differently: a request's results then depend on the row count of
    the step it lands in, so it is never built by default."""

    def __init__(self, quantized, batched: DenseLinear, min_rows: int):
        self.quantized = quantized  # the layer's one form (tiles, GGUF blocks, int4/int8 packs), bias included
        self.batched = batched  # the dense bf16 copy, without bias
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
