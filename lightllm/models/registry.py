"""Architecture family -> model class. All supported families share the Llama decoder; Qwen3 adds a hook."""

from __future__ import annotations

from lightllm.models.config import SUPPORTED_ARCHITECTURES
from lightllm.models.llama import LlamaModel
from lightllm.models.qwen3 import Qwen3Model

MODEL_CLASSES: dict[str, type[LlamaModel]] = {arch: LlamaModel for arch in SUPPORTED_ARCHITECTURES}
MODEL_CLASSES["qwen3"] = Qwen3Model


def model_class_for(architecture: str) -> type[LlamaModel]:
    try:
        return MODEL_CLASSES[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {sorted(MODEL_CLASSES)}") from None
