"""The CLIP vision transformer (LLaVA's tower): patch embedding with a class token and learned positions, a
pre-norm, and pre-norm encoder layers with biased q/k/v and a quick-GELU MLP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class ClipConfig:
    hidden_size: int
    num_heads: int
    num_layers: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ClipConfig":
        act = cfg.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported vision hidden_act {act!r} ({', '.join(ACTIVATIONS)})")
        return cls(int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"]),
                   int(cfg["image_size"]), int(cfg["patch_size"]), float(cfg.get("layer_norm_eps", 1e-5)), act)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ClipTower:
    """Weights by the checkpoint's names below the tower (`embeddings.patch_embedding.weight`, ...)."""

    def __init__(self, config: ClipConfig, tensors: dict[str, torch.Tensor]):
        self.config = config
        self.t = tensors
        self.act = ACTIVATIONS[config.hidden_act]

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.t[f"{name}.weight"], self.t[f"{name}.bias"],
                            self.config.layer_norm_eps)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.t[f"{name}.weight"], self.t[f"{name}.bias"])

    def _layer(self, h: torch.Tensor, i: int) -> torch.Tensor:
        cfg, p = self.config, f"encoder.layers.{i}"
        n, tokens, width = h.shape
        head_dim = width // cfg.num_heads
        x = self._norm(h, f"{p}.layer_norm1")
        q, k, v = (self._linear(x, f"{p}.self_attn.{w}_proj").view(n, tokens, cfg.num_heads, head_dim).transpose(1, 2)
                   for w in "qkv")
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, tokens, width)
        h = h + self._linear(attn, f"{p}.self_attn.out_proj")
        x = self._norm(h, f"{p}.layer_norm2")
        return h + self._linear(self.act(self._linear(x, f"{p}.mlp.fc1")), f"{p}.mlp.fc2")

    def hidden_state(self, pixels: torch.Tensor, layer: int) -> torch.Tensor:
        """The encoder's hidden states after `layer` layers (0: the normed embeddings; transformers'
        `hidden_states[layer]`), [images, 1 + patches, hidden]; the layers above it are not run."""
        weight = self.t["embeddings.patch_embedding.weight"]
        patches = F.conv2d(pixels.to(weight.device, weight.dtype), weight, stride=self.config.patch_size)
        patches = patches.flatten(2).transpose(1, 2)  # [images, patches, hidden]
        cls = self.t["embeddings.class_embedding"].expand(patches.shape[0], 1, -1)
        h = torch.cat([cls, patches], dim=1) + self.t["embeddings.position_embedding.weight"]
        h = self._norm(h, "pre_layrnorm")
        for i in range(layer):
            h = self._layer(h, i)
        return h
