"""Llama-family decoder (Llama 2/3, SmolLM, Mistral with sliding window, Qwen2 with q/k/v bias).

Weights are plain tensors with q/k/v and gate/up fused at load time, so each layer runs four matmuls.
The model is stateless apart from its weights: the KV pool and the batch layout come in per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lightllm.models.config import ModelConfig
from lightllm.models.layers import AttentionMetadata, RotaryEmbedding, paged_attention, rms_norm


Linear = Callable[[torch.Tensor], torch.Tensor]  # dense or weight-only quantized (see quant.py)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear  # hidden -> (H + 2 * KVH) * D, with Qwen2's bias
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear  # hidden -> 2 * intermediate
    down: Linear


@dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: Linear


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: ModelWeights, device: torch.device, dtype: torch.dtype):
        self.config = config
        self.weights = weights
        self.device = device
        self.dtype = dtype
        self.scale = config.head_dim ** -0.5
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling, device, dtype)
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                k_cache: list[torch.Tensor], v_cache: list[torch.Tensor],
                logit_rows: torch.Tensor) -> torch.Tensor:
        """Run one ragged batch; returns float32 logits for the token rows listed in `logit_rows`."""
        cfg = self.config
        hidden = self.weights.embed.index_select(0, input_ids)
        n_tokens = input_ids.shape[0]
        cos, sin = self.rotary.lookup(positions)
        for layer_idx, lw in enumerate(self.weights.layers):
            residual = hidden
            x = rms_norm(hidden, lw.input_norm, cfg.rms_norm_eps)
            qkv = lw.qkv(x)
            qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
            # q and k heads rotate together: half the rotary ops per layer
            qk = self.rotary.apply(qk.view(n_tokens, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim), cos, sin)
            q, k = qk[:, :cfg.num_heads], qk[:, cfg.num_heads:]
            v = v.view(n_tokens, cfg.num_kv_heads, cfg.head_dim)
            k_cache[layer_idx].index_copy_(0, meta.slot_indices, k)
            v_cache[layer_idx].index_copy_(0, meta.slot_indices, v)
            attn = paged_attention(q, k_cache[layer_idx], v_cache[layer_idx], meta, self.scale)
            hidden = residual + lw.o(attn.reshape(n_tokens, self.q_size))
            residual = hidden
            x = rms_norm(hidden, lw.post_norm, cfg.rms_norm_eps)
            gate, up = lw.gate_up(x).chunk(2, dim=-1)
            hidden = residual + lw.down(F.silu(gate) * up)
        last = rms_norm(hidden.index_select(0, logit_rows), self.weights.final_norm, cfg.rms_norm_eps)
        return self.weights.lm_head(last).float()
