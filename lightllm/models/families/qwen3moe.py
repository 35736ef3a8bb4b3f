"""Qwen3-MoE: Qwen3's attention (per-head q/k norms) with routed-expert MLPs (renormalised per `norm_topk_prob`)."""

from __future__ import annotations

from lightllm.models.families.qwen3 import Qwen3Model
from lightllm.models.moe import RoutedExperts


class Qwen3MoeModel(RoutedExperts, Qwen3Model):
    pass
