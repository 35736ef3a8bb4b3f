"""The CLIP vision transformer (LLaVA's tower): patch embedding with a class token and learned positions, a
pre-norm, and pre-norm encoder layers with biased q/k/v and a quick-GELU MLP. SigLIP (siglip.py) is the same
tower with three options turned the other way: no class token, no pre-norm, a norm after the last layer."""

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
    class_token: bool = True  # a learned class embedding before the patches (CLIP; SigLIP has none)
    pre_norm: bool = True  # `pre_layrnorm` on the embeddings (CLIP)
    post_norm: bool = False  # `post_layernorm` after the last layer (SigLIP's last_hidden_state)

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
        """The encoder's hidden states after `layer` layers (0: the embeddings, pre-normed where the tower has a
        pre-norm; transformers' `hidden_states[layer]`), [images, class token + patches, hidden]; the layers above
        it are not run."""
        weight, bias = self.t["embeddings.patch_embedding.weight"], self.t.get("embeddings.patch_embedding.bias")
        patches = F.conv2d(pixels.to(weight.device, weight.dtype), weight, bias, stride=self.config.patch_size)
        h = patches.flatten(2).transpose(1, 2)  # [images, patches, hidden]
        if self.config.class_token:
            h = torch.cat([self.t["embeddings.class_embedding"].expand(h.shape[0], 1, -1), h], dim=1)
        h = h + self.t["embeddings.position_embedding.weight"]
        if self.config.pre_norm:
            h = self._norm(h, "pre_layrnorm")
        for i in range(layer):
            h = self._layer(h, i)
        return h

    def last_hidden_state(self, pixels: torch.Tensor) -> torch.Tensor:
        """Every layer, then the post-norm where the tower has one (transformers' `last_hidden_state`)."""
        h = self.hidden_state(pixels, self.config.num_layers)
        return self._norm(h, "post_layernorm") if self.config.post_norm else h
