"""Qwen3 dense: the Llama decoder plus an RMSNorm over each q and k head (weights [head_dim]) between the
qkv projection and rotary. No q/k/v bias; `head_dim` comes from the config and may differ from hidden/heads."""

from __future__ import annotations

from typing import Any

import torch

from lightllm.models.decoder import LayerWeights, LlamaModel
from lightllm.models.families.base import Family, no_hf_sliding_window
from lightllm.models.layers import rms_norm


def norm_heads_(qk: torch.Tensor, lw: LayerWeights, num_heads: int, eps: float) -> None:
    """RMSNorm each q head with `lw.q_norm` and each k head with `lw.k_norm`, in place ([T, H + KVH, D])."""
    for part, weight in ((qk[:, :num_heads], lw.q_norm), (qk[:, num_heads:], lw.k_norm)):
        # computed in the weights' dtype: the fused path's quantized matmuls hand over bf16 rows
        part.copy_(rms_norm(part.to(weight.dtype), weight, eps))


class Qwen3Model(LlamaModel):
    def _norm_qk_(self, qk: torch.Tensor, lw: LayerWeights) -> None:
        norm_heads_(qk, lw, self.config.num_heads, self.config.rms_norm_eps)


def hf_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**no_hf_sliding_window(cfg), "qk_norm": True}


FAMILY = Family(
    name="qwen3",
    model_class=Qwen3Model,
    hf_architectures=("Qwen3ForCausalLM",),
    hf_model_types=("qwen3",),
    gguf_architecture="qwen3",
    hf_facts=hf_facts,
)
