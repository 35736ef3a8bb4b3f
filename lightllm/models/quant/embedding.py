"""An embedding table kept in the GGUF file's quantization: rows decoded on lookup.

Decoding the whole table to float32 costs vocab x hidden x 4 bytes (545 MB for Qwen2.5-Coder-0.5B's 151,936 x
896), while a step looks up a few rows. The blocks stay views of the mapped file (no copy): only the pages of
rows ever looked up become resident."""

from __future__ import annotations

import torch

from lightllm.models.quant.weights import GgufBlocks


def decode_rows(blocks: GgufBlocks, kernels=None) -> torch.Tensor:
    """float32 [rows, k]: the weights of `blocks` exactly, by the kernels' decoder where given (w = ws * u + wc
    per 16 weights, the same values as gguf's dequantization), else by the PyTorch one."""
    if blocks.raw.shape[0] == 0:
        return torch.empty(0, blocks.k)
    if kernels is None:
        return blocks.dequantize().reshape(blocks.raw.shape[0], blocks.k)
    u, ws, wc = kernels.gguf_decode(blocks.type_code, blocks.raw, blocks.k)
    rows = u.shape[0]
    return (u.view(rows, -1, 16).float() * ws.unsqueeze(-1) + wc.unsqueeze(-1)).view(rows, blocks.k)


class QuantizedEmbedding:
    """What the model reads of an embedding tensor (`index_select(0, ids)`, `shape`, `dtype`), over blocks."""

    def __init__(self, blocks: GgufBlocks, dtype: torch.dtype, kernels=None):
        self.blocks = blocks
        self.dtype = dtype  # of the rows handed out
        self.device = torch.device("cpu")
        self._kernels = kernels

    @property
    def shape(self) -> torch.Size:
        return self.blocks.shape

    @property
    def nbytes(self) -> int:
        return self.blocks.raw.numel()

    def index_select(self, dim: int, indices: torch.Tensor) -> torch.Tensor:
        if dim != 0:
            raise ValueError("an embedding table is looked up by rows")
        rows = decode_rows(self.blocks.rows_at(indices), self._kernels)
        return rows if self.dtype == torch.float32 else rows.to(self.dtype)
