"""Qwen3 dense: the Llama decoder plus an RMSNorm over each q and k head (weights [head_dim]) between the
qkv projection and rotary. No q/k/v bias; `head_dim` comes from the config and may differ from hidden/heads."""

from __future__ import annotations

import torch

from lightllm.models.layers import rms_norm
from lightllm.models.decoder import LayerWeights, LlamaModel


def norm_heads_(qk: torch.Tensor, lw: LayerWeights, num_heads: int, eps: float) -> None:
    """RMSNorm each q head with `lw.q_norm` and each k head with `lw.k_norm`, in place ([T, H + KVH, D])."""
    for part, weight in ((qk[:, :num_heads], lw.q_norm), (qk[:, num_heads:], lw.k_norm)):
        # computed in the weights' dtype: the fused path's quantized matmuls hand over bf16 rows
        part.copy_(rms_norm(part.to(weight.dtype), weight, eps))


class Qwen3Model(LlamaModel):
    def _norm_qk_(self, qk: torch.Tensor, lw: LayerWeights) -> None:
        norm_heads_(qk, lw, self.config.num_heads, self.config.rms_norm_eps)
