"""The low-rank products of one step whose token rows use different adapters (S-LoRA / Punica).

Two ways, chosen per adapter by how many rows it has in the step:
- SGMV (segments): an adapter with at least SEGMENT_MIN_ROWS rows (a prefill chunk) runs as matmuls over its
  rows (shrink x @ A.T, then each part's expand added by BLAS straight into its columns of the output, range by
  range: no delta tensor and no scatter, half the time of mm + index_add_ for 1,024 prefill rows).
- BGMV (gathered per row): the rows of all the other adapters (decoding streams, a few rows each) go through
  one kernel call per linear (kernels/lora_bgmv.c) in which each row reads its own adapter's pair. A matmul
  pair per adapter and linear would cost 2 x adapters x linears x layers calls per step (1,920 for 8 adapters on
  a 30-layer model), each dearer than its arithmetic at these sizes. Without the C kernels these rows run as
  segments too.
The deltas are added to the base linear's output in float32, whatever form the base weights take; rows without an
adapter cost nothing. Each row's delta depends on that row only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from lightllm.kernels import cpu as cpu_kernels
from lightllm.models.lora.adapter import FUSED_TARGETS, LoraAdapter

SEGMENT_MIN_ROWS = 16  # an adapter with this many rows in the step runs as its own matmuls
SLICED_MAX_RANGES = 4  # a segment of at most this many row ranges adds its products into `out` range by range
_POINTER_TABLES = 8  # adapter sets whose per-linear pointer tables are kept (decoding steps repeat their set)

# (layer, target) -> (A addresses, Bt addresses, part tables' addresses, ranks, the weights' dtype) per adapter
# set; the key holds the adapters, so their tensors stay alive (and their addresses valid) while an entry exists.
_tables: "OrderedDict[tuple[LoraAdapter, ...], dict[tuple[int, str], tuple]]" = OrderedDict()


def _pointer_tables(adapters: tuple[LoraAdapter, ...]) -> dict[tuple[int, str], tuple]:
    tables = _tables.get(adapters)
    if tables is not None:
        _tables.move_to_end(adapters)
        return tables
    tables = {}
    for layer in range(len(adapters[0].layers)):
        for target in FUSED_TARGETS:
            pairs = [adapter.layers[layer].get(target) for adapter in adapters]
            tables[(layer, target)] = tuple(torch.tensor(values, dtype=torch.int64) for values in (
                [p.a.data_ptr() if p else 0 for p in pairs], [p.bt.data_ptr() if p else 0 for p in pairs],
                [p.meta.data_ptr() if p else 0 for p in pairs], [p.a.shape[0] if p else 0 for p in pairs]))
            dtypes = {p.a.dtype for p in pairs if p}
            if len(dtypes) > 1:  # one manager stores every adapter alike (--lora_dtype)
                raise ValueError(f"adapters of one step stored in several dtypes: {dtypes}")
            tables[(layer, target)] += (dtypes.pop() if dtypes else torch.float32,)
    _tables[adapters] = tables
    while len(_tables) > _POINTER_TABLES:
        _tables.popitem(last=False)
    return tables


@dataclass
class LoraBatch:
    """The step's adapters: segments (adapter, its rows as a slice or an index tensor, their ranges) and the
    gathered rows."""

    segments: list[tuple[LoraAdapter, slice | torch.Tensor, list[tuple[int, int]]]]
    gathered: tuple[LoraAdapter, ...] = ()  # adapters of the BGMV rows
    row_index: torch.Tensor | None = None  # their rows, grouped by adapter (CSR with `offsets`)
    offsets: torch.Tensor | None = None  # [len(gathered) + 1]
    kernels: object = None

    @classmethod
    def from_runs(cls, runs: list[tuple[LoraAdapter | None, int, int]]) -> "LoraBatch | None":
        """From the step's (adapter or None, first row, row count) runs covering its rows in order; None when no
        row has an adapter (the step then runs exactly as without LoRA)."""
        spans: dict[int, tuple[LoraAdapter, list[tuple[int, int]]]] = {}
        for adapter, start, n in runs:
            if adapter is not None and n:
                spans.setdefault(id(adapter), (adapter, []))[1].append((start, start + n))
        if not spans:
            return None
        kernels = cpu_kernels.load()
        batch = cls([], kernels=kernels)
        gathered: list[LoraAdapter] = []
        row_index: list[int] = []
        offsets = [0]
        for adapter, ranges in spans.values():
            rows = sum(end - start for start, end in ranges)
            if kernels is not None and rows < SEGMENT_MIN_ROWS:
                for start, end in ranges:
                    row_index.extend(range(start, end))
                offsets.append(len(row_index))
                gathered.append(adapter)
            else:
                batch.segments.append((adapter, *_rows(ranges)))
        if gathered:
            batch.gathered = tuple(gathered)
            batch.row_index = torch.tensor(row_index, dtype=torch.int64)
            batch.offsets = torch.tensor(offsets, dtype=torch.int64)
        return batch

    def add_(self, layer: int, target: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the base linear's [T, out] output for input `x` [T, in]) plus each row's adapter delta; float32
        when a delta was added (in place when `out` is float32 and contiguous already)."""
        if out.dtype != torch.float32 or not out.is_contiguous():
            out = out.float().contiguous()
        for adapter, rows, ranges in self.segments:
            pair = adapter.layers[layer].get(target)
            if pair is None:
                continue
            xs = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
            v = torch.mm(xs.float(), pair.a.t().float())  # (bfloat16 weights widened: float32 arithmetic)
            for r0, col, r, bt in pair.parts:
                bt, end = bt.float(), col + bt.shape[1]
                if isinstance(rows, slice) or len(ranges) <= SLICED_MAX_RANGES:  # straight into out's rows
                    at = 0
                    for start, stop in ranges:
                        out[start:stop, col:end].addmm_(v[at:at + stop - start, r0:r0 + r], bt)
                        at += stop - start
                else:
                    out[:, col:end].index_add_(0, rows, torch.mm(v[:, r0:r0 + r], bt))
        if self.gathered:
            a_ptrs, bt_ptrs, meta_ptrs, ranks, weight_dtype = _pointer_tables(self.gathered)[(layer, target)]
            xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
            self.kernels.lora_bgmv(xf, out, a_ptrs, bt_ptrs, meta_ptrs, ranks, self.row_index, self.offsets,
                                   weight_dtype)
        return out


def _rows(ranges: list[tuple[int, int]]) -> tuple[slice | torch.Tensor, list[tuple[int, int]]]:
    """Row ranges merged: one slice when contiguous, else the row indices; and the merged ranges."""
    merged: list[list[int]] = []
    for start, end in ranges:
        if merged and merged[-1][1] == start:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    spans = [(s, e) for s, e in merged]
    if len(merged) == 1:
        return slice(merged[0][0], merged[0][1]), spans
    return torch.cat([torch.arange(s, e) for s, e in merged]), spans
