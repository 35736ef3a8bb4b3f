"""Qwen3 dense: the Llama decoder plus an RMSNorm over each q and k head (weights [head_dim]) between the
qkv projection and rotary. No q/k/v bias; `head_dim` comes from the config and may differ from hidden/heads."""

from __future__ import annotations

import torch

from lightllm.models.layers import rms_norm
from lightllm.models.llama import LayerWeights, LlamaModel


class Qwen3Model(LlamaModel):
    def _norm_qk_(self, qk: torch.Tensor, lw: LayerWeights) -> None:
        heads, eps = self.config.num_heads, self.config.rms_norm_eps
        for part, weight in ((qk[:, :heads], lw.q_norm), (qk[:, heads:], lw.k_norm)):
            # computed in the weights' dtype: the fused path's quantized matmuls hand over bf16 rows
            part.copy_(rms_norm(part.to(weight.dtype), weight, eps))
