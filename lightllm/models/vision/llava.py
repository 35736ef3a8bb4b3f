"""LLaVA 1.5 (`LlavaForConditionalGeneration`): a CLIP tower's hidden states at `vision_feature_layer`, the
class token dropped (`vision_feature_select_strategy` "default") or kept ("full"), through a two-layer MLP
projector into the language model's width. The language model is the Llama family's decoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lightllm.models.vision.base import VisionEncoder
from lightllm.models.vision.checkpoint import PROJECTOR_PREFIXES, TOWER_PREFIXES, read_vision_weights
from lightllm.models.vision.clip import ACTIVATIONS, ClipConfig, ClipTower
from lightllm.models.vision.layout import ImageLayout
from lightllm.models.vision.preprocess import ImagePreprocessor

class LlavaVision(VisionEncoder):
    def __init__(self, cfg: dict[str, Any], tower: dict[str, torch.Tensor], projector: dict[str, torch.Tensor],
                 preprocess: ImagePreprocessor):
        self.clip = ClipTower(ClipConfig.from_hf(cfg["vision_config"]), tower)
        layer = cfg.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer {layer!r}: only a single layer is supported")
        layers = self.clip.config.num_layers
        self.layer = layer if layer >= 0 else layers + 1 + layer
        if not 0 <= self.layer <= layers:
            raise ValueError(f"vision_feature_layer {layer} is outside the tower's {layers} layers")
        self.strategy = cfg.get("vision_feature_select_strategy", "default")
        if self.strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {self.strategy!r} (default, full)")
        act = cfg.get("projector_hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported projector_hidden_act {act!r} ({', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[act]
        self.projector = projector
        self.preprocess = preprocess
        tokens = self.clip.config.num_patches + (1 if self.strategy == "full" else 0)
        image_token = int(cfg.get("image_token_index", cfg.get("image_token_id", 32000)))
        # the image token stands for the image in the chat text and becomes a run of itself (LlavaProcessor)
        self.layout = ImageLayout(image_marker=(image_token,), placeholder_id=image_token, tokens_per_image=tokens)

    @torch.inference_mode()
    def encode(self, image: bytes) -> torch.Tensor:
        features = self.clip.hidden_state(self.preprocess(image), self.layer)
        if self.strategy == "default":
            features = features[:, 1:]
        p = self.projector
        hidden = F.linear(features, p["linear_1.weight"], p.get("linear_1.bias"))
        out = F.linear(self.act(hidden), p["linear_2.weight"], p.get("linear_2.bias"))
        return out[0]


def load_llava_vision(model_dir: Path, device: torch.device, dtype: torch.dtype) -> LlavaVision:
    cfg = json.loads((model_dir / "config.json").read_text())
    weights = read_vision_weights(model_dir, {"tower": TOWER_PREFIXES, "projector": PROJECTOR_PREFIXES}, device,
                                  dtype)
    tower, projector = weights["tower"], weights["projector"]
    if not tower or "linear_1.weight" not in projector:
        raise ValueError(f"{model_dir}: a LLaVA checkpoint without its vision tower or projector weights")
    return LlavaVision(cfg, tower, projector, ImagePreprocessor(model_dir))
