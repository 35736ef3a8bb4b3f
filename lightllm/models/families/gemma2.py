"""Gemma 2 and Gemma 3: the Llama decoder with
- embeddings scaled by sqrt(hidden_size) (in the weights' dtype, as transformers does),
- RMSNorm weights used as (1 + w) (folded into the weights at load, see ModelConfig.norm_weight_offset),
- "sandwich" norms: the attention and MLP outputs are normalised before their residual adds,
- a GELU-tanh gated MLP (ModelConfig.hidden_act), attention scaled by query_pre_attn_scalar ** -0.5,
- sliding-window layers interleaved with global ones (Gemma 3: the sliding ones with their own rope base),
- Gemma 2: scores and final logits soft-capped (cap * tanh(x / cap)); Gemma 3: per-head q/k norms instead.
The window, rope tables and score cap are per-layer facts the base class already takes from the config."""

from __future__ import annotations

from typing import Any

import torch

from lightllm.models.decoder import LayerWeights, LlamaModel
from lightllm.models.families.base import Family, GgufMetadata
from lightllm.models.families.qwen3 import norm_heads_
from lightllm.models.layers import rms_norm


class GemmaModel(LlamaModel):
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


# Gemma's checkpoints: post_attention_layernorm normalises the attention output; the pre-MLP norm has its own name
HF_LAYER_NAMES = {
    "post_attention_layernorm.weight": "attn_out_norm",
    "pre_feedforward_layernorm.weight": "post_norm",
    "post_feedforward_layernorm.weight": "mlp_out_norm",
}


def gemma_layer_types(num_layers: int, pattern: int) -> list[str]:
    """Gemma's interleaving: every `pattern`-th layer is global, the rest slide (Gemma 2: 2, Gemma 3: 6)."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def hf_gemma_facts(cfg: dict[str, Any], pattern: int) -> dict[str, Any]:
    """What Gemma 2 and 3 share in config.json (`pattern`: every how many layers one is global)."""
    return {
        "layer_types": cfg.get("layer_types") or gemma_layer_types(int(cfg["num_hidden_layers"]), pattern),
        "hidden_act": "gelu_tanh",
        "attention_scale": float(cfg["query_pre_attn_scalar"]) ** -0.5,
        "attn_logit_softcap": _optional_float(cfg.get("attn_logit_softcapping")),
        "final_logit_softcap": _optional_float(cfg.get("final_logit_softcapping")),
        "embedding_scale": int(cfg["hidden_size"]) ** 0.5,
        "norm_weight_offset": 1.0,  # HF's norms compute x * (1 + w)
    }


def gguf_gemma_facts(meta: GgufMetadata, pattern: int) -> dict[str, Any]:
    """What Gemma 2 and 3 share in GGUF metadata; llama.cpp's converter stores the norms with the +1 added."""
    window = meta.value("attention.sliding_window")
    return {
        "layer_types": gemma_layer_types(meta.num_layers, pattern) if window else None,
        "hidden_act": "gelu_tanh",
        "attn_logit_softcap": meta.value("attn_logit_softcapping"),
        "final_logit_softcap": meta.value("final_logit_softcapping"),
        "embedding_scale": int(meta.value("embedding_length")) ** 0.5,
    }


FAMILY = Family(
    name="gemma2",
    model_class=GemmaModel,
    hf_architectures=("Gemma2ForCausalLM",),
    hf_model_types=("gemma2",),
    gguf_architecture="gemma2",
    hf_layer_names=HF_LAYER_NAMES,
    hf_facts=lambda cfg: hf_gemma_facts(cfg, pattern=2),
    gguf_facts=lambda meta: gguf_gemma_facts(meta, pattern=2),
)
