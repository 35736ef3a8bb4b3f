"""Quantized weight matrices as data: int4 groups, GGUF blocks as stored in the file, and fused runs of them.

No kernels here: the linear layers (quant/linear.py) and the tiled kernel (quant/tiled.py) run these forms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lightllm.models.quant.gguf_decode import dequantize as gguf_dequantize


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
        return gguf_dequantize(self.raw.numpy(), self.type_name, tuple(self.shape))

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
