"""Qwen2 / Qwen2.5: the Llama decoder with q/k/v biases (always, whatever `attention_bias` says); `yarn` rope
scaling; the sliding window only when `use_sliding_window` is set."""

from __future__ import annotations

from typing import Any

from lightllm.models.decoder import LlamaModel
from lightllm.models.families.base import Family, no_hf_sliding_window


def _hf_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**no_hf_sliding_window(cfg), "attention_bias": True}


FAMILY = Family(
    name="qwen2",
    model_class=LlamaModel,
    hf_architectures=("Qwen2ForCausalLM",),
    hf_model_types=("qwen2",),
    gguf_architecture="qwen2",
    hf_facts=_hf_facts,
)
