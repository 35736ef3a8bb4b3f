"""Quantized weights in the 16-row tiles of kernels/tiled_matmul.c: on AVX512-VNNI CPUs the path GGUF, int4
and int8 layers run (see quant.TILED_MIN_ROWS).

A weight is held as w = ws * u + wc (or ws * (u - zero)) with u small unsigned integers and the scales per
group of 16 or 32 weights of a row, which every GGUF block type, the int4 groups and int8 rows are exactly;
the tiles interleave 16 rows so one 512-bit register holds 4 consecutive weights of each (see the kernel's
header for the byte layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lightllm.models.quant.linear import GgufLinear, Int4Linear, Int8Linear, run_column_parts
from lightllm.models.quant.policy import row_threshold
from lightllm.models.quant.weights import GgufBlocks, GroupQuantized

TILE_ROWS = 16
# Calls of up to this many rows quantize the activations in two int8 levels (the kernel's `levels`: the
# second holds the first's rounding residual, so activations are as precise as float32 to ~1e-5). One-level
# int8 rounding is what makes a quantized model's greedy output leave the float one at near-ties; a second
# level doubles the integer dot products for the same weight reads. Measured (benchmarks/step_bench.py,
# RESULTS.md fifth session): free for one row, where a decode step waits on the weight reads, +2-10 % at 2
# rows, +12 % at 4, +30 % at 8, 2x for prefill; so single-row decode steps (one stream) take it by default.
# LIGHTLLM_ACT_RESIDUAL_MAX_ROWS=N overrides (0: never; a large N: every call, matching fp32 greedy output
# at a third to half the batched speed).
RESIDUAL_MAX_ROWS = 1
# Bits per stored weight by block type: u < 16 goes two per byte, u < 32 adds a plane of fifth bits.
_TYPE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q8_0": 8, "Q6_K": 8}
# Q6_K's scales change every 16 weights; every other type's every 32.
_GROUP_16_TYPES = ("Q6_K",)
# Types whose offset is a fixed multiple of the scale, w = ws * (u - zero): only ws is stored and the kernel
# folds the offset into its integer dot product.
_TYPE_ZERO = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128, "Q6_K": 32}


@dataclass
class TiledWeights:
    q: torch.Tensor  # uint8 [tiles, tile bytes]
    scales: torch.Tensor  # [tiles, k / group, 1 or 2, 16]: ws (then wc) of the tile's rows; float16 where exact
    n: int
    k: int
    group: int  # 16 or 32
    bits: int  # 4, 5 or 8 (group 32 below 8)
    zero: int  # 0: w = ws * u + wc; else w = ws * (u - zero) and no wc is stored

    @classmethod
    def from_affine(cls, u: torch.Tensor, ws: torch.Tensor, wc: torch.Tensor, group: int, bits: int,
                    zero: int = 0) -> "TiledWeights":
        """From u (uint8 [N, K], < 2**bits) and ws, wc (float32 [N, K / group]); with a zero point, wc must be
        exactly -zero * ws (it is then not stored)."""
        n, k = u.shape
        tiles = -(-n // TILE_ROWS)
        pad = tiles * TILE_ROWS - n
        u = torch.nn.functional.pad(u, (0, 0, 0, pad))
        quads = u.reshape(tiles, TILE_ROWS, k // 4, 4).permute(0, 2, 1, 3)  # [t][j][r][b]
        if bits == 8:
            q = quads
        else:
            pairs = quads.reshape(tiles, k // 8, 2, TILE_ROWS * 4)
            q = (pairs[:, :, 0] & 0x0F) | ((pairs[:, :, 1] & 0x0F) << 4)
            if bits == 5:  # bit i of each 64-bit mask = bit 4 of entry i (little-endian bytes)
                fifth = ((pairs >> 4) & 1).reshape(tiles, k // 8, 2, 8, 8).to(torch.int32)
                masks = (fifth << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)
                q = torch.cat([q, masks.reshape(tiles, k // 8, 16)], dim=-1)
        if zero and not torch.equal(wc, -zero * ws):
            raise ValueError(f"offsets are not -{zero} x the scales")
        scales = (ws.unsqueeze(-1) if zero else torch.stack([ws, wc], dim=-1)).float()  # [N, groups, 1 | 2]
        if torch.equal(scales.half().float(), scales):
            # the legacy GGUF types' scales are float16 in the file: fewer bytes to read, same values
            scales = scales.half()
        scales = torch.nn.functional.pad(scales, (0, 0, 0, 0, 0, pad))
        scales = scales.reshape(tiles, TILE_ROWS, k // group, -1).permute(0, 2, 3, 1)
        return cls(q.reshape(tiles, -1).contiguous(), scales.contiguous(), n, k, group, bits, zero)

    @classmethod
    def from_gguf(cls, blocks: GgufBlocks, kernels) -> "TiledWeights":
        u, ws16, wc16 = kernels.gguf_decode(blocks.type_code, blocks.raw, blocks.k)
        zero = _TYPE_ZERO.get(blocks.type_name, 0)
        if blocks.type_name in _GROUP_16_TYPES:
            return cls.from_affine(u, ws16, wc16, 16, 8, zero)
        # the two 16-weight halves of a 32-weight group share their scales in these types
        return cls.from_affine(u, ws16[:, 0::2], wc16[:, 0::2], 32, _TYPE_BITS[blocks.type_name], zero)

    @classmethod
    def from_group_quantized(cls, weight: GroupQuantized) -> "TiledWeights":
        """int4 groups (w = scale * (q - 8) + zero): groups wider than 32 repeat their scales per 32, since
        the activations' int8 scale changes every 32 values."""
        repeat = weight.group // 32
        ws = weight.scale.repeat_interleave(repeat, dim=1)
        wc = (weight.zero - 8 * weight.scale).repeat_interleave(repeat, dim=1)
        return cls.from_affine(weight.q.to(torch.uint8), ws, wc, 32, 4)

    @classmethod
    def from_int8(cls, weight: torch.Tensor, scales: torch.Tensor) -> "TiledWeights":
        """Symmetric int8 rows (w = scale * q): u = q + 128 with the offset -128 * scale."""
        n, k = weight.shape
        ws = scales.float()[:, None].expand(n, k // 32)
        return cls.from_affine((weight.to(torch.int16) + 128).to(torch.uint8), ws, -128 * ws, 32, 8, 128)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] (for tests: the exact weights the kernel multiplies by)."""
        tiles = self.q.shape[0]
        if self.bits == 8:
            quads = self.q.reshape(tiles, self.k // 4, TILE_ROWS, 4)
        else:
            records = self.q.reshape(tiles, self.k // 8, -1)
            packed = records[:, :, :64]
            pairs = torch.stack([packed & 0x0F, packed >> 4], dim=2)  # [t][p][2][64]
            if self.bits == 5:
                masks = records[:, :, 64:].reshape(tiles, self.k // 8, 2, 8, 1)
                fifth = (masks >> torch.arange(8, dtype=torch.uint8)) & 1
                pairs = pairs | (fifth.reshape(tiles, self.k // 8, 2, 64) << 4)
            quads = pairs.reshape(tiles, self.k // 4, TILE_ROWS, 4)
        u = quads.permute(0, 2, 1, 3).reshape(tiles * TILE_ROWS, self.k)[:self.n].float()
        scales = self.scales.float()
        ws = scales[:, :, 0].permute(0, 2, 1).reshape(tiles * TILE_ROWS, -1)[:self.n]
        wc = (-self.zero * ws if self.zero else scales[:, :, 1].permute(0, 2, 1).reshape(tiles * TILE_ROWS, -1)[:self.n])
        return (u.reshape(self.n, -1, self.group) * ws.unsqueeze(-1) + wc.unsqueeze(-1)).reshape(self.n, self.k)


class TiledLinear:
    """x @ W.T on the tiled kernel, one run of columns per stored part (like GgufLinear); float32 out, no
    bias: it is the `batched` path of a RowCountDispatch, which adds the bias and keeps the layer's own kernel
    for row counts below its threshold."""

    def __init__(self, parts: list[TiledWeights], kernels, residual_max_rows: int | None = None):
        self.parts = parts
        self.out_features, self.in_features = sum(p.n for p in parts), parts[0].k
        self.input_dtype = torch.float32  # bf16 / f16 are taken as well
        # calls of up to this many rows take two int8 activation levels (RESIDUAL_MAX_ROWS)
        self.residual_max_rows = (row_threshold("LIGHTLLM_ACT_RESIDUAL_MAX_ROWS", RESIDUAL_MAX_ROWS)
                                  if residual_max_rows is None else residual_max_rows)
        self._runs: list[tuple[int, Callable]] = []
        self._residual_runs: list[tuple[int, Callable]] = []
        start = 0
        for p in parts:
            self._runs.append((start, kernels.tiled_matmul_bound(p.q, p.scales, p.n, p.k, p.group, p.bits, p.zero)))
            self._residual_runs.append(
                (start, kernels.tiled_matmul_bound(p.q, p.scales, p.n, p.k, p.group, p.bits, p.zero, levels=2)))
            start += p.n

    @staticmethod
    def supports(layer: "GgufLinear | Int4Linear | Int8Linear", weight) -> bool:
        """Whether `layer`'s weights (stored as `weight`) map onto the tiles."""
        if isinstance(layer, GgufLinear):
            return layer.in_features % 32 == 0
        if isinstance(layer, Int4Linear):
            return isinstance(weight, GroupQuantized) and weight.group % 32 == 0 and weight.shape[1] % 32 == 0
        return isinstance(layer, Int8Linear) and layer.weight.shape[1] % 32 == 0

    @classmethod
    def from_layer(cls, layer: "GgufLinear | Int4Linear | Int8Linear", weight, kernels) -> "TiledLinear":
        if isinstance(layer, GgufLinear):
            parts = [TiledWeights.from_gguf(b, kernels) for b in layer.parts]
        elif isinstance(layer, Int4Linear):
            parts = [TiledWeights.from_group_quantized(weight)]
        else:
            parts = [TiledWeights.from_int8(layer.weight, layer.scales)]
        return cls(parts, kernels)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw(x).to(x.dtype)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0] if x.dim() == 2 else x.numel() // self.in_features
        runs = self._residual_runs if rows <= self.residual_max_rows else self._runs
        return run_column_parts(runs, x, self.in_features, self.out_features)
