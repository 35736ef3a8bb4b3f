"""Gemma 2 and Gemma 3: the Llama decoder with
- embeddings scaled by sqrt(hidden_size) (in the weights' dtype, as transformers does),
- RMSNorm weights used as (1 + w) (folded into the weights at load, see ModelConfig.norm_weight_offset),
- "sandwich" norms: the attention and MLP outputs are normalised before their residual adds,
- a GELU-tanh gated MLP (ModelConfig.hidden_act), attention scaled by query_pre_attn_scalar ** -0.5,
- sliding-window layers interleaved with global ones (Gemma 3: the sliding ones with their own rope base),
- Gemma 2: scores and final logits soft-capped (cap * tanh(x / cap)); Gemma 3: per-head q/k norms instead.
The window, rope tables and score cap are per-layer facts the base class already takes from the config."""

from __future__ import annotations

import torch

from lightllm.models.layers import rms_norm
from lightllm.models.decoder import LayerWeights, LlamaModel
from lightllm.models.families.qwen3 import norm_heads_


class GemmaModel(LlamaModel):
    supports_fused_kernels = False  # the C kernels implement SwiGLU layers with two norms

    def _norm_qk_(self, qk: torch.Tensor, lw: LayerWeights) -> None:
        if lw.q_norm is not None:
            norm_heads_(qk, lw, self.config.num_heads, self.config.rms_norm_eps)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super()._embed(input_ids) * torch.tensor(self.config.embedding_scale, dtype=self.weights.embed.dtype)

    def _attention_output(self, out: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        return rms_norm(out, lw.attn_out_norm, self.config.rms_norm_eps)

    def _mlp_output(self, out: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        return rms_norm(out, lw.mlp_out_norm, self.config.rms_norm_eps)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super()._logits(hidden)
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
