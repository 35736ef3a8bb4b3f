"""llama.cpp's vision projector files (`--mmproj FILE`, llama.cpp's flag) for LLaVA 1.5.

llama.cpp splits a LLaVA into the language model GGUF (a plain llama-arch file) and an mmproj GGUF
(`general.architecture` "clip", written by tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py) holding the
CLIP tower and the MLP projector under its own names (`v.patch_embd.weight`, `v.blk.N.attn_q.weight`, `mm.0.weight`,
...) with `clip.vision.*` metadata. The converter keeps the tower's layers up to the feature layer only and drops
its post-layernorm. Here the tensors are renamed onto the checkpoint names clip.py and llava.py read, so the one
LLaVA encoder serves both forms; preprocessing follows the file's metadata (there is no preprocessor_config.json),
and the image token is the language model vocabulary's `<image>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightllm.models.config import ModelConfig
from lightllm.models.loading.gguf import open_gguf
from lightllm.models.quant.gguf_decode import dequantize as gguf_dequantize
from lightllm.models.vision.llava import LlavaVision
from lightllm.models.vision.preprocess import ImagePreprocessor

IMAGE_TOKEN = "<image>"  # LLaVA's image token in a converted llava-hf vocabulary
_ADDED_TOKEN_TYPES = (3, 4)  # GGUF token types CONTROL and USER_DEFINED: tokens added to the base vocabulary

_GLOBAL_NAMES = {
    "v.patch_embd.weight": "embeddings.patch_embedding.weight",
    "v.class_embd": "embeddings.class_embedding",
    "v.position_embd.weight": "embeddings.position_embedding.weight",
    "v.pre_ln.weight": "pre_layrnorm.weight", "v.pre_ln.bias": "pre_layrnorm.bias",
}
_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2",
                "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}
_PROJECTOR_NAMES = {"mm.0.weight": "linear_1.weight", "mm.0.bias": "linear_1.bias",
                    "mm.2.weight": "linear_2.weight", "mm.2.bias": "linear_2.bias"}
# what no LLaVA 1.5 mmproj holds and this encoder would not run: refused rather than left out
_UNSUPPORTED = {"v.post_ln.weight": "a post-layernorm after the feature layer",
                "v.patch_embd.bias": "a patch embedding bias"}

_REQUIRED = object()


def _value(reader: Any, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"{reader.path}: the mmproj file has no {key} metadata")
        return default
    return field.contents()


def gguf_image_token(lm_path: Path) -> int | None:
    """The id of `<image>` in a GGUF language model's vocabulary when it is an added token (a LLaVA's), else None."""
    reader = open_gguf(lm_path)
    if "tokenizer.ggml.tokens" not in reader.fields:
        return None
    index = reader.fields["tokenizer.ggml.tokens"].index_of(IMAGE_TOKEN)
    if index is None:
        return None
    types = _value(reader, "tokenizer.ggml.token_type", None)
    return index if types is None or types[index] in _ADDED_TOKEN_TYPES else None


class MetadataPreprocessor(ImagePreprocessor):
    """CLIP's preprocessing from the mmproj's metadata: the shorter side resized to image_size (bicubic), the
    center crop, rescaling to [0, 1], normalization by the file's image_mean / image_std (what llava-hf's
    CLIPImageProcessor does, so a converted checkpoint sees the pixels its Hugging Face form sees)."""

    def __init__(self, image_size: int, mean: list[float], std: list[float]):  # no directory to read
        from transformers import CLIPImageProcessor

        self.processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size},
                                            image_mean=mean, image_std=std)


def _feature_layer(reader: Any, block_count: int) -> int:
    """Hidden states after how many layers feed the projector: the file's feature layer (non-negative, as the
    converter writes it), else llama.cpp's default for a LLaVA projector, the input of the last layer kept."""
    layers = sorted(set(int(x) for x in _value(reader, "clip.vision.feature_layer", [])))
    if len(layers) > 1:
        raise ValueError(f"{reader.path}: features from several layers {layers} (granite-vision) are not supported")
    return layers[0] if layers else block_count - 1


def load_mmproj_vision(mmproj: str | Path, lm_path: Path, text: ModelConfig, device: torch.device,
                       dtype: torch.dtype) -> LlavaVision:
    """The LLaVA encoder of an mmproj file, for the GGUF language model at `lm_path` (`text`: its config)."""
    path = Path(mmproj)
    if not path.is_file():
        raise ValueError(f"--mmproj {path}: no such file")
    reader = open_gguf(path)
    arch = _value(reader, "general.architecture", None)
    if arch != "clip":
        raise ValueError(f"--mmproj {path}: not a vision projector (llama.cpp's mmproj has general.architecture "
                         f"'clip', this file {arch!r})")
    if not _value(reader, "clip.has_vision_encoder", True):
        raise ValueError(f"--mmproj {path}: the file has no vision encoder")
    projector_type = _value(reader, "clip.projector_type", "mlp")
    if projector_type != "mlp":
        raise ValueError(f"--mmproj {path}: projector type {projector_type!r} is not supported (LLaVA 1.5's 'mlp')")
    image_token = gguf_image_token(lm_path)
    if image_token is None:
        raise ValueError(f"{lm_path}: the language model's vocabulary has no {IMAGE_TOKEN} token, so its chat text "
                         f"cannot hold an image (--mmproj needs a LLaVA language model converted from llava-hf)")
    block_count = int(_value(reader, "clip.vision.block_count"))
    layer = _feature_layer(reader, block_count)
    vision_config = {"hidden_size": int(_value(reader, "clip.vision.embedding_length")),
                     "num_attention_heads": int(_value(reader, "clip.vision.attention.head_count")),
                     "num_hidden_layers": block_count,
                     "image_size": int(_value(reader, "clip.vision.image_size")),
                     "patch_size": int(_value(reader, "clip.vision.patch_size")),
                     "layer_norm_eps": float(_value(reader, "clip.vision.attention.layer_norm_epsilon")),
                     "hidden_act": "gelu" if _value(reader, "clip.use_gelu", False) else "quick_gelu"}
    if _value(reader, "clip.use_silu", False):
        raise ValueError(f"--mmproj {path}: a SiLU vision tower is not LLaVA 1.5's CLIP")
    tensors = {t.name: t for t in reader.tensors}
    if ("clip.vision.image_grid_pinpoints" in reader.fields or "model.image_newline" in tensors
            or _value(reader, "clip.vision.mm_patch_merge_type", "flat") != "flat"):
        raise ValueError(f"--mmproj {path}: a LLaVA-NeXT projector (any-resolution image tiles) is not supported, "
                         "only LLaVA 1.5's single-tile one")
    for name, what in _UNSUPPORTED.items():
        if name in tensors:
            raise ValueError(f"--mmproj {path}: the file holds {what} ({name}), which LLaVA 1.5's tower has not")
    tower, projector = _rename(path, tensors, layer, vision_config["hidden_size"], device, dtype)
    width = vision_config["hidden_size"]
    if projector["linear_1.weight"].shape[1] != width:
        raise ValueError(f"--mmproj {path}: the projector takes {projector['linear_1.weight'].shape[1]}-wide "
                         f"features, the tower gives {width}")
    if projector["linear_2.weight"].shape[0] != text.hidden_size:
        raise ValueError(f"--mmproj {path} does not match the language model: its projector gives "
                         f"{projector['linear_2.weight'].shape[0]}-wide embeddings, the model's hidden size is "
                         f"{text.hidden_size}")
    cfg = {"vision_config": vision_config, "vision_feature_layer": layer,
           "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
           "image_token_index": image_token}
    preprocess = MetadataPreprocessor(vision_config["image_size"], list(_value(reader, "clip.vision.image_mean")),
                                      list(_value(reader, "clip.vision.image_std")))
    return LlavaVision(cfg, tower, projector, preprocess)


def _rename(path: Path, tensors: dict[str, Any], layers: int, width: int, device: torch.device,
            dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tower's tensors of the `layers` layers that run and the projector's, decoded, by checkpoint names."""

    def load(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ValueError(f"--mmproj {path}: tensor {name} is missing")
        t = tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        return gguf_dequantize(t.data, t.tensor_type.name, shape, name=name).to(device, dtype)

    tower = {ours: load(theirs) for theirs, ours in _GLOBAL_NAMES.items()}
    for i in range(layers):
        names = dict(_LAYER_NAMES)
        # the legacy converter wrote fc1 as ffn_down and fc2 as ffn_up; llama.cpp tells them apart by shape (an
        # ffn_down that takes the tower's width is the first linear; so is one as wide as the tower), and so does this
        down = tensors.get(f"v.blk.{i}.ffn_down.weight")
        if down is not None and int(down.shape[0]) == width:
            names["ffn_up"], names["ffn_down"] = "mlp.fc2", "mlp.fc1"
        for theirs, ours in names.items():
            for kind in ("weight", "bias"):
                tower[f"encoder.layers.{i}.{ours}.{kind}"] = load(f"v.blk.{i}.{theirs}.{kind}")
    projector = {ours: load(theirs) for theirs, ours in _PROJECTOR_NAMES.items()}
    return tower, projector
