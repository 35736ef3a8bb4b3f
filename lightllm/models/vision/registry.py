"""Each vision family's loader, by the name its `Family.vision` gives (families/*.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from lightllm.models.vision.base import VisionEncoder
from lightllm.models.vision.gemma3 import load_gemma3_vision
from lightllm.models.vision.llava import load_llava_vision

LOADERS: dict[str, Callable[[Path, torch.device, torch.dtype], VisionEncoder]] = {"llava": load_llava_vision,
                                                                                  "gemma3": load_gemma3_vision}


def load_vision(name: str, model_dir: str | Path, device: torch.device, dtype: torch.dtype) -> VisionEncoder:
    if not Path(model_dir).is_dir():
        raise ValueError(f"{model_dir}: a vision-language model is served from its Hugging Face directory "
                         "(GGUF files keep the vision tower in a separate mmproj file, which is not supported)")
    return LOADERS[name](Path(model_dir), device, dtype)
