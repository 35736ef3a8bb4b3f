"""Qwen3-MoE: Qwen3's attention (per-head q/k norms) with routed-expert MLPs (renormalised per `norm_topk_prob`).
Checkpoints with dense layers among the expert ones (`mlp_only_layers`) are refused."""

from __future__ import annotations

from typing import Any

from lightllm.models.families import qwen3
from lightllm.models.families.base import Family, hf_expert_facts
from lightllm.models.moe import RoutedExperts


class Qwen3MoeModel(RoutedExperts, qwen3.Qwen3Model):
    pass


def _hf_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**qwen3.hf_facts(cfg), **hf_expert_facts(cfg)}


FAMILY = Family(
    name="qwen3moe",
    model_class=Qwen3MoeModel,
    hf_architectures=("Qwen3MoeForCausalLM",),
    hf_model_types=("qwen3_moe", "qwen3moe"),
    gguf_architecture="qwen3moe",
    gguf_has_experts=True,
    hf_facts=_hf_facts,
)
