"""A vision-language checkpoint's vision weights (safetensors): the tensors under each group's name prefixes,
keyed by the name below the prefix (`embeddings.patch_embedding.weight`, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from lightllm.models.loading.hf import _safetensors_files

# LLaVA's and Gemma 3's tower and projector (transformers 5 saves the first form, older conversions the others)
TOWER_PREFIXES = ("model.vision_tower.vision_model.", "model.vision_tower.", "vision_tower.vision_model.",
                  "vision_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def _strip(name: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def read_vision_weights(model_dir: Path, groups: dict[str, tuple[str, ...]], device: torch.device,
                        dtype: torch.dtype, skip: Callable[[str, str], bool] = lambda group, name: False
                        ) -> dict[str, dict[str, torch.Tensor]]:
    """Each group's tensors (the first group whose prefixes match a name takes it); `skip(group, name)` leaves
    out what the model does not use."""
    from safetensors import safe_open

    out: dict[str, dict[str, torch.Tensor]] = {group: {} for group in groups}
    for file in _safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                for group, prefixes in groups.items():
                    if (short := _strip(name, prefixes)) is not None:
                        if not skip(group, short):
                            out[group][short] = handle.get_tensor(name).to(device, dtype)
                        break
    return out
