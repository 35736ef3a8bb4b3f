"""Qwen2-VL / Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`): Qwen2's
decoder with M-RoPE (models/mrope.py) fed by a vision transformer and patch merger (models/vision/qwen2_vl.py).
Released checkpoints keep the text settings at the top level of config.json; transformers 5 nests them in
`text_config`."""

from __future__ import annotations

from typing import Any

from lightllm.models.families.base import Family, no_hf_sliding_window
from lightllm.models.mrope import MRopeModel


def _hf_text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    text = cfg.get("text_config") or {k: v for k, v in cfg.items() if k != "vision_config"}
    return {**text, "architectures": cfg.get("architectures") or [],
            "tie_word_embeddings": cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))}


def _hf_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    section = rope.get("mrope_section")
    if not section:
        raise ValueError("a Qwen2-VL config without rope mrope_section")
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        raise ValueError(f"Qwen2-VL with rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    return {**no_hf_sliding_window(cfg), "attention_bias": True, "rope_scaling": None,
            "mrope_section": tuple(int(s) for s in section)}


FAMILY = Family(
    name="qwen2_vl",
    model_class=MRopeModel,
    hf_architectures=("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
    hf_model_types=("qwen2_vl", "qwen2_5_vl"),
    hf_text_config=_hf_text_config,
    hf_facts=_hf_facts,
    vision="qwen2_vl",
)
