"""The form each weight matrix takes under `--quant_type`, and the batched path beside it."""

from __future__ import annotations

from typing import Callable

import torch

from lightllm.kernels import cpu as cpu_kernels
from lightllm.models.quant.linear import DenseLinear, GgufLinear, Int4Linear, Int8Linear, RowCountDispatch
from lightllm.models.quant.policy import DENSE_MIN_ROWS, TILED_MIN_ROWS, cpu_has_fast_bf16, row_threshold
from lightllm.models.quant.tiled import TiledLinear
from lightllm.models.quant.weights import GgufBlocks, GgufRowGroups, GroupQuantized, quantize_int4

QUANT_TYPES = ("none", "int8wo", "int4wo-32", "int4wo-64", "int4wo-128", "gguf")


def with_batch_path(quantized: "Int4Linear | Int8Linear | GgufLinear",
                    weight: "GgufBlocks | GgufRowGroups | GroupQuantized | None",
                    dequantize: Callable[[], torch.Tensor]):
    """Wrap `quantized` in a RowCountDispatch with the fastest batched path this CPU has for `weight` (its
    stored form; None for Int8Linear's own int8 weights), or return it as is where none is faster.

    LIGHTLLM_TILED_MIN_ROWS / LIGHTLLM_DENSE_MIN_ROWS override the row thresholds (an integer; 0 disables
    that path)."""
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
