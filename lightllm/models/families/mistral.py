"""Mistral: the Llama decoder with a sliding attention window (config.json `sliding_window`). llama.cpp's
converter writes most Mistral GGUF files as `llama` (the llama family reads those) and some as `mistral`."""

from __future__ import annotations

from lightllm.models.decoder import LlamaModel
from lightllm.models.families.base import Family

FAMILY = Family(
    name="mistral",
    model_class=LlamaModel,
    hf_architectures=("MistralForCausalLM",),
    hf_model_types=("mistral",),
    gguf_architecture="mistral",
    gguf_qk_permuted=True,
)
