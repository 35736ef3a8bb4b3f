"""Architecture family -> model class. Every family is the Llama decoder or a subclass overriding its hooks."""

from __future__ import annotations

from lightllm.models.families.gemma2 import GemmaModel
from lightllm.models.decoder import LlamaModel
from lightllm.models.families.mixtral import MixtralModel
from lightllm.models.families.qwen3moe import Qwen3MoeModel
from lightllm.models.families.qwen3 import Qwen3Model

MODEL_CLASSES: dict[str, type[LlamaModel]] = {
    "llama": LlamaModel,
    "mistral": LlamaModel,
    "qwen2": LlamaModel,
    "phi3": LlamaModel,  # the loader splits its fused qkv / gate_up tensors; longrope lives in the rotary
    "qwen3": Qwen3Model,
    "gemma2": GemmaModel,
    "gemma3": GemmaModel,
    "mixtral": MixtralModel,
    "qwen3moe": Qwen3MoeModel,
}


def model_class_for(architecture: str) -> type[LlamaModel]:
    try:
        return MODEL_CLASSES[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {sorted(MODEL_CLASSES)}") from None
