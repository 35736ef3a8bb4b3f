"""Quantized weight matrices as data: int4 groups, GGUF blocks as stored in the file, and fused runs of them.

No kernels here: the linear layers (quant/linear.py) and the tiled kernel (quant/tiled.py) run these forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


class GgufBlocks:
    """Rows of a weight matrix as GGUF quantized blocks, bytes exactly as stored in the file.

    `raw` may be deferred: a fused q/k/v, a permuted or a cut part is copied out of the file's pages only when
    something reads its bytes. A start whose tiles come from the tile cache never does, and on this kind of
    host each first touch of a mapped page is a fault (the 48 q/k/v and gate/up copies of Qwen2.5-0.5B cost
    4 s of a 5.4 s load)."""

    def __init__(self, raw: "torch.Tensor | Callable[[], torch.Tensor]", type_name: str, k: int,
                 rows: int | None = None):
        if callable(raw) and rows is None:
            raise ValueError("deferred GGUF blocks need their row count")
        # the bytes once they exist (public, so memory accounting sees them), else how to make them
        self.data: torch.Tensor | None = None if callable(raw) else raw
        self._make = raw if callable(raw) else None
        self._rows = rows if callable(raw) else int(raw.shape[0])
        self.type_name = type_name  # one of GGUF_NATIVE_TYPES
        self.k = k

    @classmethod
    def deferred(cls, make: "Callable[[], torch.Tensor]", type_name: str, k: int, rows: int) -> "GgufBlocks":
        return cls(make, type_name, k, rows)

    @property
    def raw(self) -> torch.Tensor:
        """uint8 [N, K / block_weights * block_bytes], built on first read when deferred."""
        if self.data is None:
            self.data, self._make = self._make(), None
        return self.data

    @property
    def materialized(self) -> bool:
        return self.data is not None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._rows, self.k))

    def __repr__(self) -> str:
        return f"GgufBlocks({self.type_name}, rows={self._rows}, k={self.k}, deferred={not self.materialized})"

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
        if self.materialized:
            return GgufBlocks(self.raw[start:end], self.type_name, self.k)  # a view: nothing read
        return GgufBlocks.deferred(lambda: self.raw[start:end], self.type_name, self.k, len(range(self._rows)[start:end]))

    def rows_at(self, indices: torch.Tensor) -> "GgufBlocks":
        return GgufBlocks(self.raw.index_select(0, indices), self.type_name, self.k)

    def permute_rows(self, fn) -> "GgufBlocks":
        return GgufBlocks.deferred(lambda: fn(self.raw).contiguous(), self.type_name, self.k, self._rows)

    def cols(self, start: int, end: int) -> "GgufBlocks | None":
        """Columns start..end, or None when the cut falls inside a block."""
        weights, nbytes = self.block
        if start % weights or end % weights:
            return None
        return GgufBlocks.deferred(
            lambda: self.raw[:, start // weights * nbytes:end // weights * nbytes].contiguous(), self.type_name,
            end - start, self._rows)


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


def _joined(first: GgufBlocks, second: GgufBlocks) -> GgufBlocks:
    return GgufBlocks.deferred(lambda: torch.cat([first.raw, second.raw]), first.type_name, first.k,
                               first.shape[0] + second.shape[0])


def cat_rows(parts: list) -> "torch.Tensor | GroupQuantized | GgufBlocks | GgufRowGroups":
    """Concatenate weights along the output dimension (fusing q/k/v or gate/up)."""
    if all(isinstance(p, GgufBlocks) for p in parts):
        merged: list[GgufBlocks] = []
        for p in parts:  # neighbours of one type become one run of rows
            if merged and merged[-1].type_name == p.type_name:
                merged[-1] = _joined(merged[-1], p)
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
