"""Quantized weights in the 16-row tiles of kernels/tiled_matmul.c: on AVX512-VNNI CPUs the one form GGUF,
int4 and int8 layers are stored and run in, at every row count (see quant/factory.py).

A weight is held as w = ws * u + wc (or ws * (u - zero)) with u small unsigned integers and the scales per
group of 16 or 32 weights of a row, which every GGUF block type, the int4 groups and int8 rows are exactly;
the tiles interleave 16 rows so one 512-bit register holds 4 consecutive weights of each (see the kernel's
header for the byte layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lightllm.models.quant import tile_cache
from lightllm.models.quant.linear import GgufLinear, Int4Linear, Int8Linear, run_column_parts
from lightllm.models.quant.weights import GgufBlocks, GroupQuantized

TILE_ROWS = 16
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
    """x @ W.T (+ bias) on the tiled kernel, one run of columns per stored part (like GgufLinear); float32
    out. Every call quantizes its activations the same way (`levels`, fixed at construction), and the kernel
    computes each activation row on its own (per-row int8 scales, exact integer dot products, then the same
    float operations in the same order whatever the row count): an output row depends on its input row
    only, which is what makes a request's results independent of the batch it runs in."""

    def __init__(self, parts: list[TiledWeights], kernels, levels: int = 1, bias: torch.Tensor | None = None,
                 exact: bool = False):
        """`exact`: the tiles hold the model's own weights (a GGUF file's blocks decode exactly into them),
        not a re-quantization of them (int8wo / int4wo)."""
        self.exact = exact
        if levels not in (1, 2):
            raise ValueError(f"the tiled kernel takes 1 or 2 activation levels, not {levels}")
        self.parts = parts
        self._kernels = kernels
        self.out_features, self.in_features = sum(p.n for p in parts), parts[0].k
        self.input_dtype = torch.float32  # bf16 / f16 are taken as well
        self.levels = levels
        self.bias = bias
        self._runs: list[tuple[int, Callable]] = []
        start = 0
        for p in parts:
            self._runs.append((start, kernels.tiled_matmul_bound(p.q, p.scales, p.n, p.k, p.group, p.bits, p.zero,
                                                                 levels=levels)))
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
    def from_layer(cls, layer: "GgufLinear | Int4Linear | Int8Linear", weight, kernels,
                   levels: int = 1) -> "TiledLinear":
        """The tiles of `layer`'s weights (and its bias); `layer` itself is not kept."""
        def build() -> list[TiledWeights]:
            if isinstance(layer, GgufLinear):
                return [TiledWeights.from_gguf(b, kernels) for b in layer.parts]
            if isinstance(layer, Int4Linear):
                return [TiledWeights.from_group_quantized(weight)]
            return [TiledWeights.from_int8(layer.weight, layer.scales)]

        shape = (sum(int(p.shape[0]) for p in layer.parts), layer.in_features) if isinstance(layer, GgufLinear) \
            else tuple(weight.shape if isinstance(layer, Int4Linear) else layer.weight.shape)
        parts = tile_cache.cached_parts(build, shape, TiledWeights)  # packed once per model file, then mapped
        return cls(parts, kernels, levels, layer.bias, exact=isinstance(layer, GgufLinear))

    def dequantized(self) -> torch.Tensor:
        """The float32 weights this layer computes with."""
        return torch.cat([p.dequantize() for p in self.parts])

    def exact_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Float32 weight rows `indices` (output features), decoded from the tiles by the kernels (the weights
        exactly, as TiledWeights.dequantize gives them)."""
        out = torch.empty(indices.shape[0], self.in_features)
        start = 0
        for part in self.parts:
            end = start + part.n
            mine = (indices >= start) & (indices < end)
            if mine.any():
                local = (indices[mine] - start).contiguous()
                out[mine] = self._kernels.tiled_rows(part.q, part.scales, part.n, part.k, part.group, part.bits,
                                                     part.zero, local)
            start = end
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw(x).to(x.dtype)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        return run_column_parts(self._runs, x, self.in_features, self.out_features, self.bias)
