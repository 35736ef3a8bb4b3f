"""The one form each weight matrix takes under `--quant_type`.

One stored form per matrix, run at every row count: on AVX512-VNNI CPUs the 16-row tiles (quant/tiled.py) for
GGUF, int4 and int8 weights; elsewhere the layer's own kernel (GGUF blocks as stored, PyTorch's int4/int8
packs). Both kinds compute each activation row on its own, so a row's output does not depend on the other
rows of the call. Only the opt-in dense bf16 copy (LinearPolicy.dense_min_rows) adds a second form, chosen by
row count."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from lightllm.kernels import cpu as cpu_kernels
from lightllm.models.quant import policy as quant_policy
from lightllm.models.quant.linear import DenseLinear, GgufLinear, Int4Linear, Int8Linear, RowCountDispatch
from lightllm.models.quant.policy import LinearPolicy
from lightllm.models.quant.tiled import TiledLinear
from lightllm.models.quant.weights import GgufBlocks, GgufRowGroups, GroupQuantized, quantize_int4

QUANT_TYPES = ("none", "int8wo", "int4wo-32", "int4wo-64", "int4wo-128", "gguf")

logger = logging.getLogger("lightllm.models")

_dense_copy_bytes = 0  # bytes of the opt-in dense bf16 copies built in this process


def dense_copy_bytes() -> int:
    """Memory held by the opt-in dense bf16 copies built so far (0 by default)."""
    return _dense_copy_bytes


def one_form(quantized: "Int4Linear | Int8Linear | GgufLinear",
             weight: "GgufBlocks | GgufRowGroups | GroupQuantized | None",
             dequantize: Callable[[], torch.Tensor], policy: LinearPolicy):
    """The form `quantized` (stored as `weight`; None for Int8Linear's own int8 rows) runs in: its tiles where
    this CPU runs them vectorised, else itself; plus, only under policy.dense_min_rows, a dense bf16 copy
    for calls of that many rows or more."""
    global _dense_copy_bytes
    kernels = cpu_kernels.load()
    layer = quantized
    if policy.tiles and kernels is not None and kernels.tiled_fast and TiledLinear.supports(quantized, weight):
        layer = TiledLinear.from_layer(quantized, weight, kernels, policy.act_levels)
    if policy.dense_min_rows <= 0:
        return layer
    dense = DenseLinear(dequantize().to(torch.bfloat16))
    _dense_copy_bytes += dense.weight.numel() * dense.weight.element_size()
    return RowCountDispatch(layer, dense, policy.dense_min_rows)


def make_linear(weight: "torch.Tensor | GroupQuantized | GgufBlocks | GgufRowGroups", bias: torch.Tensor | None,
                quant_type: str, device: torch.device, dtype: torch.dtype, policy: LinearPolicy | None = None):
    """Build the linear layer for `weight` under `--quant_type` (quantized paths are CPU-only for now);
    `policy`: this process's (quant.policy.current()) unless given."""
    policy = policy or quant_policy.current()
    quantized_ok = device.type == "cpu"
    if isinstance(weight, (GgufBlocks, GgufRowGroups)):
        kernels = cpu_kernels.load() if quant_type == "gguf" and quantized_ok else None
        if kernels is not None:
            layer = GgufLinear(weight, bias, kernels)
            return one_form(layer, weight, layer.dequantized, policy)
        weight = weight.dequantize()
    if isinstance(weight, GroupQuantized):
        if quant_type == "gguf" and quantized_ok and Int4Linear.supports(*weight.shape, weight.group):
            return one_form(Int4Linear(weight, bias), weight, lambda: Int4Linear.dequantized(weight), policy)
        weight = weight.dequantize()
    if quant_type == "none" or not quantized_ok:
        return DenseLinear(weight.to(device=device, dtype=dtype), bias)
    if quant_type.startswith("int4wo"):
        group = int(quant_type.split("-")[1])
        if Int4Linear.supports(*weight.shape, group):
            quantized = quantize_int4(weight, group)
            return one_form(Int4Linear(quantized, bias), quantized, lambda: Int4Linear.dequantized(quantized), policy)
    layer = Int8Linear(weight, bias)  # int8wo, and gguf tensors no kernel above runs as stored
    return one_form(layer, None, layer.dequantized, policy)
