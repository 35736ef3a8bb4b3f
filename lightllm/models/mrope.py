"""M-RoPE (Qwen2-VL / Qwen2.5-VL language models): every token has three positions (temporal, height, width)
and each third of the rotary frequencies (`mrope_section`, in frequency pairs) turns with one of them. Text
tokens hold one position in all three (plain rope); an image's tokens hold (t, h, w) on its grid of merged
patches, offset by the position where the image starts, and the text after an image continues at the largest
position + 1. So after the prompt a token's positions are its index + the prompt's `delta`, the same in all
three sections.

The engine gives the model positions [3, T] when a step holds a sequence with images ([T] otherwise: every
section equal); `PromptPositions` computes a prompt's table once (engine/model_runner.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lightllm.models.config import ModelConfig
from lightllm.models.decoder import LlamaModel
from lightllm.models.layers import RotaryEmbedding


class MRotaryEmbedding(RotaryEmbedding):
    """The rope tables of the plain rotary; a row's cos/sin take each frequency from its section's position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, section: Sequence[int],
                 device: torch.device, dtype: torch.dtype):
        super().__init__(head_dim, max_positions, theta, None, device, dtype)
        if sum(section) != head_dim // 2:
            raise ValueError(f"mrope_section {list(section)} does not cover the head's {head_dim // 2} frequencies")
        half = torch.cat([torch.full((n,), i) for i, n in enumerate(section)])
        self.column_section = torch.cat([half, half]).to(device)  # [D]: which of the 3 positions each column uses
        self.columns = torch.arange(head_dim, device=device)

    def _rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, D] for positions [3, T]."""
        at = positions.index_select(0, self.column_section).t()  # [T, D]: each column's position
        return self.cos[at, self.columns], self.sin[at, self.columns]

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().lookup(positions)
        cos, sin = self._rows(positions)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().tables(positions)
        cos, sin = self._rows(positions)
        return torch.arange(positions.shape[1], device=positions.device), cos.contiguous(), sin.contiguous()


class MRopeModel(LlamaModel):
    """Qwen2's decoder with M-RoPE (`config.mrope_section`)."""

    def __init__(self, config: ModelConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if config.mrope_section:
            self.rotary = MRotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                           config.mrope_section, self.device, self.dtype)
            self.layer_rotary = [self.rotary] * config.num_layers

    @property
    def uses_mrope(self) -> bool:
        return isinstance(self.rotary, MRotaryEmbedding)


@dataclass(frozen=True)
class PromptPositions:
    """A prompt's M-RoPE positions: `table` [3, prompt length] and `delta`, what every later token's positions
    add to its index."""

    table: torch.Tensor
    delta: int

    @classmethod
    def build(cls, prompt_len: int, images: Sequence[tuple[int, int, int, int]]) -> "PromptPositions":
        """`images`: (offset, length, rows, columns) of each image's token run, in prompt order, runs apart."""
        parts: list[torch.Tensor] = []
        index = position = 0  # the next token's index, and its position if it is text
        for offset, length, rows, cols in images:
            if rows * cols != length:
                raise ValueError(f"an image of {rows}x{cols} merged patches takes {rows * cols} tokens, not {length}")
            parts.append(torch.arange(offset - index).expand(3, -1) + position)
            position += offset - index
            grid = torch.stack([torch.zeros(rows, cols, dtype=torch.long),
                                torch.arange(rows).unsqueeze(1).expand(rows, cols),
                                torch.arange(cols).unsqueeze(0).expand(rows, cols)]).reshape(3, -1)
            parts.append(grid + position)
            position += max(rows, cols)
            index = offset + length
        parts.append(torch.arange(prompt_len - index).expand(3, -1) + position)
        table = torch.cat(parts, dim=1)
        return cls(table, int(table.max()) + 1 - prompt_len if prompt_len else 0)

    def slice(self, start: int, end: int) -> torch.Tensor:
        """Positions [3, end - start] of tokens start..end (the prompt's from the table, later ones index + delta)."""
        prompt_len = self.table.shape[1]
        inside = self.table[:, start:min(end, prompt_len)]
        if end <= prompt_len:
            return inside
        after = torch.arange(max(start, prompt_len), end).expand(3, -1) + self.delta
        return torch.cat([inside, after], dim=1)
