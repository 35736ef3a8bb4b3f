"""Every model family, and the lookups that pick one from a checkpoint's names. Adding a family: its own file
in families/ with a `FAMILY`, and one entry here."""

from __future__ import annotations

from typing import Any

from lightllm.models.decoder import LlamaModel
from lightllm.models.families import (gemma2, gemma3, gemma3_vl, llama, llava, mistral, mixtral, phi3, qwen2,
                                      qwen2_vl, qwen3, qwen3moe)
from lightllm.models.families.base import Family

FAMILIES: tuple[Family, ...] = tuple(m.FAMILY for m in (llama, mistral, qwen2, qwen3, qwen3moe, mixtral, gemma2, gemma3,
                                                         phi3, llava, qwen2_vl, gemma3_vl))
_BY_NAME = {f.name: f for f in FAMILIES}


def family_named(name: str) -> Family:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unsupported architecture {name!r}; supported: {', '.join(_BY_NAME)}") from None


def model_class_for(name: str) -> type[LlamaModel]:
    return family_named(name).model_class


def family_for_hf(cfg: dict[str, Any]) -> Family:
    """The family a config.json names: by `architectures`, else by `model_type`."""
    archs = cfg.get("architectures") or []
    for arch in archs:
        for family in FAMILIES:
            if arch in family.hf_architectures:
                return family
    for family in FAMILIES:
        if cfg.get("model_type") in family.hf_model_types:
            return family
    supported = "; ".join(f"{f.name} ({', '.join(f.hf_architectures)})" for f in FAMILIES)
    raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r}; supported: {supported}")


# llama.cpp's language-model architectures of vision-language models whose mmproj (vision tower) is not read here
_GGUF_VLM_ARCHITECTURES = {"qwen2vl": "Qwen2-VL / Qwen2.5-VL"}


def family_for_gguf(architecture: str, has_experts: bool) -> Family:
    for family in FAMILIES:
        if family.gguf_architecture == architecture and family.gguf_has_experts == has_experts:
            return family
    if architecture in _GGUF_VLM_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {architecture!r} is {_GGUF_VLM_ARCHITECTURES[architecture]}'s language "
                         "model, which takes its images through llama.cpp's mmproj file; --mmproj reads LLaVA 1.5's "
                         "only: serve this model from its Hugging Face directory (safetensors)")
    supported = sorted({f.gguf_architecture for f in FAMILIES if f.gguf_architecture})
    raise ValueError(f"unsupported GGUF architecture {architecture!r}"
                     f"{' with experts' if has_experts else ''}; supported: {', '.join(supported)}")
