"""Token-level KV pool (LightLLM's TokenAttention layout) and the req_to_token table.

Every token of every request owns one index into per-layer pools of shape [P, kv_heads, head_dim];
`req_to_token[slot, pos]` maps a request's positions to those indices. Token granularity means no
fragmentation and exact prefix sharing.
"""

from __future__ import annotations

import math
import mmap

import numpy as np
import torch


class OutOfKVCache(RuntimeError):
    pass


def zeros_on_use(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On CPU it lies in its own anonymous mapping: the kernel hands out zero pages as they are
    first written, so a KV pool sized for many long requests is resident only as far as tokens fill it
    (torch.zeros writes every page at once)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    pages = mmap.mmap(-1, max(nbytes, 1))  # page-aligned; kept alive by the numpy array (and so the tensor)
    return torch.from_numpy(np.frombuffer(pages, np.uint8, nbytes)).view(dtype).view(shape)


class TokenKVPool:
    def __init__(self, num_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.size = num_tokens
        self.device = device
        shape = (num_tokens, num_kv_heads, head_dim)
        self.k = [zeros_on_use(shape, dtype, device) for _ in range(num_layers)]
        self.v = [zeros_on_use(shape, dtype, device) for _ in range(num_layers)]
        # Free indices live in a stack: allocation takes from the top, release pushes back.
        self._free = torch.arange(num_tokens, dtype=torch.long, device=device)
        self._top = num_tokens

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self.size - self._top

    def alloc(self, n: int) -> torch.Tensor:
        if n > self._top:
            raise OutOfKVCache(f"need {n} KV tokens, {self._top} free")
        self._top -= n
        return self._free[self._top:self._top + n].clone()

    def free(self, indices: torch.Tensor) -> None:
        n = indices.numel()
        if n == 0:
            return
        if self._top + n > self.size:
            raise RuntimeError("KV pool double free")
        self._free[self._top:self._top + n] = indices.to(self._free.device)
        self._top += n


class ReqToTokenTable:
    """Rows are request slots; row `s` holds the pool indices of that request's positions."""

    def __init__(self, max_requests: int, max_len: int, device: torch.device):
        self.table = zeros_on_use((max_requests, max_len), torch.long, device)
        self._free_slots = list(range(max_requests - 1, -1, -1))

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def alloc_slot(self) -> int:
        return self._free_slots.pop()

    def free_slot(self, slot: int) -> None:
        self._free_slots.append(slot)
