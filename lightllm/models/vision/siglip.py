"""The SigLIP vision transformer (Gemma 3's tower): CLIP's tower (clip.py) with a biased patch embedding, no class
token, no pre-norm, a layer norm after the last layer, and a GELU-tanh MLP. Its pooling head
(`vision_use_head`) is not used: Gemma 3 reads the last hidden state."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lightllm.models.vision.clip import ClipConfig, ClipTower


def siglip_config(cfg: dict[str, Any]) -> ClipConfig:
    """A `siglip_vision_model` config.json section as the shared tower's options (SigLIP's own defaults)."""
    defaults = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "hidden_size": 768,  # SiglipVisionConfig's
                "num_attention_heads": 12, "num_hidden_layers": 12, "image_size": 224, "patch_size": 16}
    base = ClipConfig.from_hf({**defaults, **cfg})
    return dataclasses.replace(base, class_token=False, pre_norm=False, post_norm=True)


def siglip_tower(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ClipTower:
    """The tower over its weights, named below it (`embeddings.patch_embedding.weight`, `post_layernorm.bias`, ...)."""
    config = siglip_config(cfg)
    missing = [name for name in ("embeddings.patch_embedding.bias", "post_layernorm.weight") if name not in tensors]
    if missing:
        raise ValueError(f"a SigLIP vision tower without {', '.join(missing)}")
    return ClipTower(config, tensors)
