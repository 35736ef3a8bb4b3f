"""Token-level KV pool (LightLLM's TokenAttention layout) and the req_to_token table.

Every token of every request owns one index into per-layer pools of shape [P, kv_heads, head_dim];
`req_to_token[slot, pos]` maps a request's positions to those indices. Token granularity means no
fragmentation and exact prefix sharing.
"""

from __future__ import annotations

import torch


class OutOfKVCache(RuntimeError):
    pass


class TokenKVPool:
    def __init__(self, num_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.size = num_tokens
        self.device = device
        self.k = [torch.zeros(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
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
        self.table = torch.zeros(max_requests, max_len, dtype=torch.long, device=device)
        self._free_slots = list(range(max_requests - 1, -1, -1))

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def alloc_slot(self) -> int:
        return self._free_slots.pop()

    def free_slot(self, slot: int) -> None:
        self._free_slots.append(slot)
