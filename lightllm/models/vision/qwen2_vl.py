"""Qwen2-VL and Qwen2.5-VL vision transformers (`Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`): dynamic resolution. The image processor resizes an image to a multiple of
patch × merge pixels (smart_resize) and emits its patches flattened, [patches, channels × temporal × patch ×
patch], in merge-block order (each merge × merge block of patches consecutive, blocks row by row), with the
grid (t, h, w) in patches. The tower: the Conv3d patch embedding as one linear over those rows, 2-D rotary
embeddings (row and column) in every attention, blocks of pre-norm attention and MLP, then the patch merger
(a norm, merge × merge neighbours concatenated, two linears into the language model's width).

Qwen2-VL: LayerNorm, quick-GELU MLP, full attention within an image. Qwen2.5-VL: RMSNorm, SiLU-gated MLP,
attention within windows of `window_size` pixels except the `fullatt_block_indexes` blocks (transformers
reorders the tokens window by window; gathering each window's patches computes the same). The language
model is Qwen2's decoder with M-RoPE (models/mrope.py)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lightllm.models.layers import RotaryEmbedding
from lightllm.models.vision.base import VisionEncoder
from lightllm.models.vision.checkpoint import read_vision_weights
from lightllm.models.vision.clip import ACTIVATIONS
from lightllm.models.vision.layout import ImageLayout, ResizeGrid
from lightllm.models.vision.preprocess import ImagePreprocessor, decode_rgb

_PREFIXES = ("model.visual.", "visual.")  # transformers 5 in memory / as saved (and the released checkpoints)
ACTIVATIONS = {**ACTIVATIONS, "silu": F.silu}


@dataclass(frozen=True)
class QwenVisionConfig:
    width: int  # the tower's hidden size
    out_width: int  # the language model's hidden size (the merger's output)
    num_heads: int
    depth: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    hidden_act: str
    rope_theta: float
    gated_rms: bool  # Qwen2.5-VL: RMSNorm and a gated MLP; Qwen2-VL: LayerNorm and fc1/fc2
    window_size: int | None = None  # Qwen2.5-VL's attention windows, in pixels
    full_attention_blocks: frozenset[int] = frozenset()

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], qwen25: bool) -> "QwenVisionConfig":
        act = cfg.get("hidden_act", "silu" if qwen25 else "quick_gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported vision hidden_act {act!r} ({', '.join(ACTIVATIONS)})")
        rope = cfg.get("rope_parameters") or {}
        common = dict(num_heads=int(cfg["num_heads"]), depth=int(cfg["depth"]),
                      patch_size=int(cfg.get("patch_size", 14)),
                      merge_size=int(cfg.get("spatial_merge_size", 2)),
                      temporal_patch_size=int(cfg.get("temporal_patch_size", 2)), hidden_act=act,
                      rope_theta=float(rope.get("rope_theta", 10000.0)), gated_rms=qwen25)
        if qwen25:
            return cls(int(cfg["hidden_size"]), int(cfg["out_hidden_size"]), window_size=int(cfg["window_size"]),
                       full_attention_blocks=frozenset(int(i) for i in cfg.get("fullatt_block_indexes") or ()),
                       **common)
        return cls(int(cfg["embed_dim"]), int(cfg["hidden_size"]), **common)


class QwenVisionTower:
    """Weights by the checkpoint's names below `visual.` (`patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`,
    `merger.mlp.0.weight`, ...)."""

    def __init__(self, config: QwenVisionConfig, tensors: dict[str, torch.Tensor]):
        self.config = config
        self.t = tensors
        self.act = ACTIVATIONS[config.hidden_act]
        self.head_dim = config.width // config.num_heads
        # the Conv3d's kernel equals its stride: one linear over each flattened (channels, t, p, p) patch
        self.patch_weight = tensors["patch_embed.proj.weight"].reshape(config.width, -1)
        quarter = self.head_dim // 4  # rows rotate the first half of each head, columns the second
        exponents = torch.arange(0, 2 * quarter, 2, dtype=torch.float) / (2 * quarter)
        self.inv_freq = 1.0 / config.rope_theta ** exponents

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.config.gated_rms:
            return F.rms_norm(x, (x.shape[-1],), self.t[f"{name}.weight"], 1e-6)
        return F.layer_norm(x, (x.shape[-1],), self.t[f"{name}.weight"], self.t[f"{name}.bias"], 1e-6)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.t[f"{name}.weight"], self.t.get(f"{name}.bias"))

    def _rotary(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [patches, 1, head_dim] for a rows × cols patch grid, in the processor's merge-block order."""
        m = self.config.merge_size
        h = torch.arange(rows).view(rows // m, m, 1, 1).expand(-1, -1, cols // m, m)
        w = torch.arange(cols).view(1, 1, cols // m, m).expand(rows // m, m, -1, -1)
        h, w = (p.permute(0, 2, 1, 3).reshape(-1) for p in (h, w))  # block-major: (block row, block col, i, j)
        freqs = torch.cat([torch.outer(h.float(), self.inv_freq), torch.outer(w.float(), self.inv_freq)], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        return emb.cos(), emb.sin()

    def _windows(self, rows: int, cols: int) -> list[torch.Tensor]:
        """Qwen2.5-VL's attention windows (`window_size` pixels a side, cut by the image's edges) as patch indices,
        grouped by size: one [windows, patches] tensor per size, so each group is one batched attention."""
        cfg = self.config
        m = cfg.merge_size
        span = cfg.window_size // m // cfg.patch_size  # a window's side in merged tokens
        units = torch.arange((rows // m) * (cols // m)).view(rows // m, cols // m)
        groups: dict[int, list[torch.Tensor]] = {}
        for r in range(0, rows // m, span):
            for c in range(0, cols // m, span):
                window = units[r:r + span, c:c + span].reshape(-1, 1) * (m * m) + torch.arange(m * m)
                groups.setdefault(window.numel(), []).append(window.reshape(-1))
        return [torch.stack(group) for group in groups.values()]

    @staticmethod
    def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   windows: list[torch.Tensor] | None) -> torch.Tensor:
        """[patches, heads, head_dim] each; attention over the whole image, or within each window."""
        # 4-D [batch, heads, patches, head_dim] inputs: PyTorch's CPU flash kernel takes them (3-D ones fall back
        # to the math path, which materializes every head's score matrix)
        if windows is None:
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            return F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1)
        out = torch.empty_like(q)
        for index in windows:  # [windows, patches]: gathered to [windows, heads, patches, head_dim]
            q_w, k_w, v_w = (t[index].transpose(1, 2) for t in (q, k, v))
            out[index.reshape(-1)] = F.scaled_dot_product_attention(q_w, k_w, v_w).transpose(1, 2).flatten(0, 1)
        return out

    def _block(self, h: torch.Tensor, i: int, cos: torch.Tensor, sin: torch.Tensor,
               windows: list[torch.Tensor] | None) -> torch.Tensor:
        p, n = f"blocks.{i}", h.shape[0]
        x = self._norm(h, f"{p}.norm1")
        q, k, v = self._linear(x, f"{p}.attn.qkv").view(n, 3, self.config.num_heads, self.head_dim).unbind(1)
        q, k = (RotaryEmbedding.apply(t.float(), cos, sin).to(v.dtype) for t in (q, k))
        attn = self._attention(q, k, v, windows)
        h = h + self._linear(attn.reshape(n, -1), f"{p}.attn.proj")
        x = self._norm(h, f"{p}.norm2")
        if self.config.gated_rms:
            mlp = self._linear(self.act(self._linear(x, f"{p}.mlp.gate_proj")) * self._linear(x, f"{p}.mlp.up_proj"),
                               f"{p}.mlp.down_proj")
        else:
            mlp = self._linear(self.act(self._linear(x, f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
        return h + mlp

    def forward(self, patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """One image's patch rows [t × h × w, C·T·P·P] → its merged tokens [t × h × w / merge², out_width]."""
        cfg = self.config
        frames, rows, cols = grid
        if frames != 1:
            raise ValueError("only still images are supported (a temporal grid of 1)")
        h = F.linear(patches.to(self.patch_weight.device, self.patch_weight.dtype), self.patch_weight)
        cos, sin = (t.to(h.device) for t in self._rotary(rows, cols))
        windows = [w.to(h.device) for w in self._windows(rows, cols)] if cfg.window_size else None
        for i in range(cfg.depth):
            h = self._block(h, i, cos, sin, None if i in cfg.full_attention_blocks else windows)
        x = self._norm(h, "merger.ln_q").reshape(-1, cfg.width * cfg.merge_size ** 2)
        return self._linear(F.gelu(self._linear(x, "merger.mlp.0")), "merger.mlp.2")


def _pixel_bound(processor: Any, key: str, old_name: str, default: int) -> int:
    """The processor's `size` bound (transformers 5 keeps min/max_pixels there), else its old attribute."""
    size = getattr(processor, "size", None)
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value or getattr(processor, old_name, None) or default)


def qwen2_vl_layout(cfg: dict[str, Any], processor: Any) -> ImageLayout:
    """<|vision_start|><|image_pad|><|vision_end|> for each image, the pads repeated once per merged patch of
    the resized image (the processor's patch, merge and pixel bounds)."""
    grid = ResizeGrid(int(processor.patch_size), int(processor.merge_size),
                      _pixel_bound(processor, "shortest_edge", "min_pixels", 56 * 56),
                      _pixel_bound(processor, "longest_edge", "max_pixels", 28 * 28 * 1280))
    start, pad, end = (int(cfg.get(k, d)) for k, d in (("vision_start_token_id", 151652), ("image_token_id", 151655),
                                                       ("vision_end_token_id", 151653)))
    return ImageLayout(image_marker=(start, pad, end), placeholder_id=pad, before=(start,), after=(end,), grid=grid)


class Qwen2VLVision(VisionEncoder):
    def __init__(self, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], preprocess: ImagePreprocessor):
        qwen25 = "Qwen2_5_VLForConditionalGeneration" in (cfg.get("architectures") or []) or \
            cfg.get("model_type") == "qwen2_5_vl"
        self.tower = QwenVisionTower(QwenVisionConfig.from_hf(cfg["vision_config"], qwen25), tensors)
        self.processor = preprocess.processor
        tower = self.tower.config
        processor = self.processor
        if (int(processor.patch_size), int(processor.merge_size), int(processor.temporal_patch_size)) != \
                (tower.patch_size, tower.merge_size, tower.temporal_patch_size):
            raise ValueError("the image processor's patch_size / merge_size / temporal_patch_size differ from the "
                             "vision tower's")
        if getattr(processor, "do_resize", True) is False:  # the token count follows smart_resize (layout.py)
            raise ValueError("the image processor must resize (do_resize: true) for Qwen2-VL's dynamic resolution")
        self.layout = qwen2_vl_layout(cfg, self.processor)

    def token_grid(self, image: bytes) -> tuple[int, int]:
        """(rows, columns) of the tokens an encoded image becomes, from its header's size (M-RoPE lays their
        positions out so)."""
        from PIL import Image

        with Image.open(io.BytesIO(image)) as decoded:
            width, height = decoded.size
        assert self.layout.grid is not None
        return self.layout.grid.merged_grid(width, height)

    @torch.inference_mode()
    def encode(self, image: bytes) -> torch.Tensor:
        out = self.processor(images=[decode_rgb(image)], return_tensors="pt")
        t, h, w = (int(v) for v in out["image_grid_thw"][0])
        return self.tower.forward(out["pixel_values"].float(), (t, h, w))


def load_qwen2_vl_vision(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Qwen2VLVision:
    cfg = json.loads((model_dir / "config.json").read_text())
    tensors = read_vision_weights(model_dir, {"tower": _PREFIXES}, device, dtype)["tower"]
    if "patch_embed.proj.weight" not in tensors or "merger.mlp.2.weight" not in tensors:
        raise ValueError(f"{model_dir}: a Qwen2-VL checkpoint without its vision tower or merger weights")
    return Qwen2VLVision(cfg, tensors, ImagePreprocessor(model_dir))
