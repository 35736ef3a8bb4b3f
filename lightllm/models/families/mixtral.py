"""Mixtral: the Llama decoder whose MLPs are routed experts (top-2 of a softmax, always renormalised).
llama.cpp writes it as a `llama` GGUF with an expert count."""

from __future__ import annotations

from typing import Any

from lightllm.models.decoder import LlamaModel
from lightllm.models.families.base import Family, hf_expert_facts
from lightllm.models.moe import RoutedExperts


class MixtralModel(RoutedExperts, LlamaModel):
    pass


def _hf_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**hf_expert_facts(cfg), "norm_topk_prob": True}


FAMILY = Family(
    name="mixtral",
    model_class=MixtralModel,
    hf_architectures=("MixtralForCausalLM",),
    hf_model_types=("mixtral",),
    gguf_architecture="llama",
    gguf_has_experts=True,
    gguf_qk_permuted=True,
    hf_facts=_hf_facts,
)
