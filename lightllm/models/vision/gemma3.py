"""Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP tower's last hidden state (siglip.py), its patch grid
average-pooled down to `mm_tokens_per_image` tokens, a Gemma RMSNorm (x * (1 + w)) and a matmul by
`mm_input_projection_weight` into the language model's width (transformers' Gemma3MultiModalProjector). The
language model is the Gemma 3 decoder (families/gemma3_vl.py), whose prefill attention among one image's tokens
goes both ways.

The processor turns each `<start_of_image>` of the chat text into "\\n\\n<start_of_image>", the soft image token
× mm_tokens_per_image and "<end_of_image>\\n\\n" (Gemma3Processor.full_image_sequence); the soft tokens' rows
take the embeddings, and they are not scaled by sqrt(hidden) as the text embeddings are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lightllm.models.vision.base import VisionEncoder
from lightllm.models.vision.checkpoint import PROJECTOR_PREFIXES, TOWER_PREFIXES, read_vision_weights
from lightllm.models.vision.layout import ImageLayout
from lightllm.models.vision.preprocess import ImagePreprocessor
from lightllm.models.vision.siglip import siglip_tower


def gemma3_layout(cfg: dict[str, Any]) -> ImageLayout:
    """Gemma3Processor's: the <start_of_image> marker becomes "\\n\\n<start_of_image>", the soft tokens and
    "<end_of_image>\\n\\n" (Gemma3Config's defaults for what config.json leaves out)."""
    boi, eoi = int(cfg.get("boi_token_index", 255_999)), int(cfg.get("eoi_token_index", 256_000))
    return ImageLayout(image_marker=(boi,), placeholder_id=int(cfg.get("image_token_index", 262_144)),
                       before=("\n\n", boi), after=(eoi, "\n\n"),
                       tokens_per_image=int(cfg.get("mm_tokens_per_image", 256)))


class Gemma3Vision(VisionEncoder):
    def __init__(self, cfg: dict[str, Any], tower: dict[str, torch.Tensor], projector: dict[str, torch.Tensor],
                 preprocess: ImagePreprocessor):
        vision_cfg = cfg.get("vision_config") or {}
        self.tower = siglip_tower(vision_cfg, tower)
        self.layout = gemma3_layout(cfg)
        tokens = self.layout.tokens_per_image
        self.patches_per_side = self.tower.config.image_size // self.tower.config.patch_size
        tokens_per_side = round(tokens ** 0.5)
        if tokens_per_side ** 2 != tokens or self.patches_per_side % tokens_per_side:
            raise ValueError(f"mm_tokens_per_image {tokens} does not pool a {self.patches_per_side}x"
                             f"{self.patches_per_side} patch grid (a square whose side divides it)")
        self.pool = self.patches_per_side // tokens_per_side
        missing = [n for n in ("mm_input_projection_weight", "mm_soft_emb_norm.weight") if n not in projector]
        if missing:
            raise ValueError(f"a Gemma 3 projector without {', '.join(missing)}")
        self.projection = projector["mm_input_projection_weight"]  # [vision hidden, text hidden]
        self.norm_weight = projector["mm_soft_emb_norm.weight"]
        self.norm_eps = self.tower.config.layer_norm_eps  # the projector's norm takes the tower's eps
        self.preprocess = preprocess

    @torch.inference_mode()
    def encode(self, image: bytes) -> torch.Tensor:
        hidden = self.tower.last_hidden_state(self.preprocess(image))  # [1, patches, vision hidden]
        n, _, width = hidden.shape
        side = self.patches_per_side
        grid = hidden.transpose(1, 2).reshape(n, width, side, side)
        pooled = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)  # [1, tokens, vision hidden]
        x = pooled.float()  # Gemma's RMSNorm computes in fp32 with weights used as (1 + w)
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm_eps) * (1.0 + self.norm_weight.float())
        return (normed.to(pooled.dtype) @ self.projection)[0]


def _read_preprocessor(model_dir: Path, image_size: int) -> ImagePreprocessor:
    settings = json.loads((model_dir / "preprocessor_config.json").read_text()) \
        if (model_dir / "preprocessor_config.json").exists() else {}
    if settings.get("do_pan_and_scan"):
        raise ValueError("Gemma 3 pan-and-scan (do_pan_and_scan in preprocessor_config.json) is not supported: each "
                         "image is one resized view")
    size = settings.get("size") or {}
    if size and (size.get("height"), size.get("width")) != (image_size, image_size):
        raise ValueError(f"preprocessor_config.json resizes images to {size}, the vision tower takes "
                         f"{image_size}x{image_size}")
    return ImagePreprocessor(model_dir)


def load_gemma3_vision(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Gemma3Vision:
    cfg = json.loads((model_dir / "config.json").read_text())
    vocab = int((cfg.get("text_config") or {}).get("vocab_size", 262_208))
    if not 0 <= int(cfg.get("image_token_index", 262_144)) < vocab:
        raise ValueError(f"image_token_index {cfg.get('image_token_index')} is outside the {vocab}-token vocabulary")
    weights = read_vision_weights(  # the same names as LLaVA's; SigLIP's pooling head is not used by Gemma 3
        model_dir, {"tower": TOWER_PREFIXES, "projector": PROJECTOR_PREFIXES}, device, dtype,
        skip=lambda group, name: group == "tower" and name.startswith("head."))
    tower, projector = weights["tower"], weights["projector"]
    if not tower or not projector:
        raise ValueError(f"{model_dir}: a Gemma 3 checkpoint without its vision tower or projector weights")
    image_size = int((cfg.get("vision_config") or {}).get("image_size", 224))
    return Gemma3Vision(cfg, tower, projector, _read_preprocessor(model_dir, image_size))
