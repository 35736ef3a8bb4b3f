"""Image files → pixel tensors through the checkpoint's own image processor (transformers'
`AutoImageProcessor`, from preprocessor_config.json), decoding with PIL."""

from __future__ import annotations

import io
from pathlib import Path

import torch


def decode_rgb(data: bytes):
    """An encoded image file as an RGB PIL image (the API process has checked it decodes)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


class ImagePreprocessor:
    def __init__(self, model_dir: str | Path):
        from transformers import AutoImageProcessor

        if not (Path(model_dir) / "preprocessor_config.json").exists():
            raise FileNotFoundError(f"{model_dir} has no preprocessor_config.json: a vision model needs its "
                                    "image processor's settings")
        self.processor = AutoImageProcessor.from_pretrained(str(model_dir))

    def __call__(self, data: bytes) -> torch.Tensor:
        """[1, channels, height, width] float32 pixel values."""
        return self.processor(images=[decode_rgb(data)], return_tensors="pt")["pixel_values"].float()
