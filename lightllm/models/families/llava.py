"""LLaVA 1.5 (`LlavaForConditionalGeneration`): the Llama decoder (`text_config`) fed by a CLIP vision tower
and projector (models/vision/llava.py)."""

from __future__ import annotations

from typing import Any

from lightllm.models.decoder import LlamaModel
from lightllm.models.families.base import Family


def _hf_text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    text = cfg.get("text_config") or {}
    if text.get("model_type", "llama") != "llama":
        raise ValueError(f"LLaVA with a {text['model_type']!r} language model is not supported (llama only)")
    return {**text, "architectures": cfg.get("architectures") or []}


FAMILY = Family(
    name="llava",
    model_class=LlamaModel,
    hf_architectures=("LlavaForConditionalGeneration",),
    hf_model_types=("llava",),
    hf_text_config=_hf_text_config,
    hf_facts=lambda cfg: {"sliding_window": None},
    vision="llava",
)
