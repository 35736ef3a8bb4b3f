"""Gemma 3 with images (`Gemma3ForConditionalGeneration`): the Gemma 3 decoder (families/gemma3.py, its
`text_config`) fed by a SigLIP tower and projector (models/vision/gemma3.py). In prefill an image's tokens attend
to each other both ways (transformers builds that from token_type_ids); everything else stays causal, and
sliding where the layer slides."""

from __future__ import annotations

from typing import Any

from lightllm.models.families.base import Family
from lightllm.models.families.gemma2 import HF_LAYER_NAMES, GemmaModel
from lightllm.models.families.gemma3 import hf_facts

# Gemma3TextConfig's defaults: the published checkpoints' config.json leaves out every text_config value equal to
# them (gemma-3-4b-it's lists six: hidden and intermediate sizes, layers, rope_scaling, sliding_window, model_type)
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1,
}


class Gemma3VisionModel(GemmaModel):
    bidirectional_images = True


def _hf_text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    text = cfg.get("text_config") or {}
    # the checkpoint's own end tokens (gemma-3-4b-it: 1 and <end_of_turn>) sit beside text_config
    top = {key: cfg[key] for key in ("eos_token_id", "bos_token_id") if key in cfg and key not in text}
    return {**TEXT_DEFAULTS, **top, **text, "architectures": cfg.get("architectures") or []}


FAMILY = Family(
    name="gemma3_vl",
    model_class=Gemma3VisionModel,
    hf_architectures=("Gemma3ForConditionalGeneration",),
    hf_model_types=("gemma3",),
    hf_layer_names=HF_LAYER_NAMES,
    hf_text_config=_hf_text_config,
    hf_facts=hf_facts,
    vision="gemma3",
)
