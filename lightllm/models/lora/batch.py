"""The low-rank products of one step whose token rows use different adapters (S-LoRA / Punica's SGMV idea).

Rows are grouped by adapter (a chunk's tokens are contiguous; one request's rows always share its adapter);
per group and fused linear, one shrink matmul (rows x in @ in x R) and one expand matmul (rows x R @ R x out),
added to the base linear's output in float32. Rows without an adapter cost nothing, and the base matmul runs
once over all rows in whatever form its weights are stored. Each row's delta depends on that row only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightllm.models.lora.adapter import LoraAdapter


@dataclass
class LoraBatch:
    """(adapter, its rows: a slice when contiguous, else an index tensor) for each adapter in the step."""

    groups: list[tuple[LoraAdapter, slice | torch.Tensor]]

    @classmethod
    def from_runs(cls, runs: list[tuple[LoraAdapter | None, int, int]]) -> "LoraBatch | None":
        """From the step's (adapter or None, first row, row count) runs in row order; None when no row has an
        adapter (the step then runs exactly as without LoRA)."""
        rows: dict[int, tuple[LoraAdapter, list[tuple[int, int]]]] = {}
        for adapter, start, n in runs:
            if adapter is not None and n:
                rows.setdefault(id(adapter), (adapter, []))[1].append((start, start + n))
        if not rows:
            return None
        groups: list[tuple[LoraAdapter, slice | torch.Tensor]] = []
        for adapter, spans in rows.values():
            merged: list[list[int]] = []
            for start, end in spans:
                if merged and merged[-1][1] == start:
                    merged[-1][1] = end
                else:
                    merged.append([start, end])
            if len(merged) == 1:
                groups.append((adapter, slice(merged[0][0], merged[0][1])))
            else:
                groups.append((adapter, torch.cat([torch.arange(s, e) for s, e in merged])))
        return cls(groups)

    def add_(self, layer: int, target: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the base linear's [T, out] output for input `x` [T, in]) plus each row's adapter delta; float32
        when a delta was added (in place when `out` is float32 already)."""
        for adapter, rows in self.groups:
            pair = adapter.layers[layer].get(target)
            if pair is None:
                continue
            if out.dtype != torch.float32:
                out = out.float()
            xs = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
            delta = torch.mm(torch.mm(xs.float(), pair.a.t()), pair.b.t())
            if isinstance(rows, slice):
                out[rows] += delta
            else:
                out.index_add_(0, rows, delta)
        return out
