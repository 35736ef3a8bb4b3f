"""Llama 2/3.x and SmolLM: the shared decoder itself (models/decoder.py), rope scaling `linear` / `llama3`."""

from __future__ import annotations

from lightllm.models.decoder import LlamaModel
from lightllm.models.families.base import Family

FAMILY = Family(
    name="llama",
    model_class=LlamaModel,
    hf_architectures=("LlamaForCausalLM",),
    hf_model_types=("llama",),
    gguf_architecture="llama",
    gguf_qk_permuted=True,
    hf_facts=lambda cfg: {"sliding_window": None},  # Llama configs may name one they do not use
)
