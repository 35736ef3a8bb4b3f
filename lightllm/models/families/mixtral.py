"""Mixtral: the Llama decoder whose MLPs are routed experts (top-2 of a softmax, always renormalised)."""

from __future__ import annotations

from lightllm.models.decoder import LlamaModel
from lightllm.models.moe import RoutedExperts


class MixtralModel(RoutedExperts, LlamaModel):
    pass
