"""Gemma 3: Gemma 2's layer (families/gemma2.py) with per-head q/k norms instead of score soft-capping, 5 sliding
layers to 1 global, and the sliding layers' own rope base. `Gemma3ForConditionalGeneration` (with images) is
families/gemma3_vl.py on this decoder."""

from __future__ import annotations

from typing import Any

from lightllm.models.families.base import Family, GgufMetadata
from lightllm.models.families.gemma2 import HF_LAYER_NAMES, GemmaModel, gguf_gemma_facts, hf_gemma_facts


def hf_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    return {**hf_gemma_facts(cfg, pattern), "qk_norm": True}


def _gguf_facts(meta: GgufMetadata) -> dict[str, Any]:
    # llama.cpp's Gemma 3 rotates its sliding layers with base 10000 whatever the global base is
    return {**gguf_gemma_facts(meta, pattern=6), "local_rope_theta": 10000.0}


FAMILY = Family(
    name="gemma3",
    model_class=GemmaModel,
    hf_architectures=("Gemma3ForCausalLM",),
    hf_model_types=("gemma3_text",),
    gguf_architecture="gemma3",
    hf_layer_names=HF_LAYER_NAMES,
    hf_facts=hf_facts,
    gguf_facts=_gguf_facts,
)
