"""Each vision family's loader, by the name its `Family.vision` gives (families/*.py), and the vision tower of a
GGUF language model, which llama.cpp keeps in a separate mmproj file (`--mmproj`, models/vision/mmproj.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from lightllm.models.config import ModelConfig
from lightllm.models.loading.paths import find_gguf_file
from lightllm.models.vision.base import VisionEncoder
from lightllm.models.vision.gemma3 import load_gemma3_vision
from lightllm.models.vision.llava import load_llava_vision
from lightllm.models.vision.mmproj import IMAGE_TOKEN, gguf_image_token, load_mmproj_vision
from lightllm.models.vision.qwen2_vl import load_qwen2_vl_vision

LOADERS: dict[str, Callable[[Path, torch.device, torch.dtype], VisionEncoder]] = {
    "llava": load_llava_vision, "qwen2_vl": load_qwen2_vl_vision, "gemma3": load_gemma3_vision}


def load_vision(name: str, model_dir: str | Path, device: torch.device, dtype: torch.dtype) -> VisionEncoder:
    if not Path(model_dir).is_dir():
        raise ValueError(f"{model_dir}: a vision-language model is served from its Hugging Face directory, or as a "
                         "GGUF language model with its vision projector given by --mmproj")
    return LOADERS[name](Path(model_dir), device, dtype)


def load_gguf_vision(model_path: str | Path, mmproj: str | None, text: ModelConfig, device: torch.device,
                     dtype: torch.dtype) -> VisionEncoder | None:
    """The --mmproj file's encoder for a GGUF language model; None for a text-only model without --mmproj. A
    LLaVA's language model (its vocabulary has the `<image>` token) without --mmproj is refused: it needs one."""
    gguf = find_gguf_file(model_path)
    if mmproj is None:
        if gguf is not None and gguf_image_token(gguf) is not None:
            raise ValueError(f"{gguf} is a LLaVA's language model (its vocabulary has the {IMAGE_TOKEN} token): it "
                             "takes images with its vision projector, the mmproj GGUF llama.cpp's converter wrote "
                             "with it: start with --mmproj FILE")
        return None
    if gguf is None:
        raise ValueError(f"--mmproj {mmproj}: a vision projector goes with a GGUF language model; {model_path} is "
                         "not a GGUF file (a Hugging Face vision-language checkpoint holds its own vision tower)")
    return load_mmproj_vision(mmproj, gguf, text, device, dtype)
