"""Where an image goes in a prompt, per vision family: the text that stands for it in the chat text, the text it
becomes before tokenizing (as transformers' processors expand it), and how many placeholder tokens it takes.

Pure Python (no torch): the API process lays images out with it and the engine checks them with it. Each
vision family builds its layout from its checkpoint (models/vision/<family>.py) and the engine sends it to the
API process in EngineReady.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ResizeGrid:
    """Dynamic resolution (Qwen2-VL's `smart_resize`): the image is resized to a multiple of patch × merge
    pixels on each side, its area kept within [min_pixels, max_pixels], and every merge × merge patches make
    one token."""

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize; ValueError for an image too small or too elongated."""
        factor = self.patch_size * self.merge_size
        if min(width, height) < 1 or max(width, height) / min(width, height) > 200:
            raise ValueError(f"a {width}x{height} image is too elongated (aspect ratio above 200)")
        h, w = round(height / factor) * factor, round(width / factor) * factor
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h = max(factor, math.floor(height / beta / factor) * factor)
            w = max(factor, math.floor(width / beta / factor) * factor)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * beta / factor) * factor
            w = math.ceil(width * beta / factor) * factor
        return w, h

    def merged_grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, columns) of tokens the image becomes."""
        w, h = self.resized(width, height)
        step = self.patch_size * self.merge_size
        return h // step, w // step

    def tokens_for(self, width: int, height: int) -> int:
        rows, cols = self.merged_grid(width, height)
        return rows * cols


Pieces = tuple[str | int, ...]  # text: literal strings and special tokens by id (the API process knows their text)


@dataclass(frozen=True)
class LayoutText:
    """A layout's pieces as text, resolved with the tokenizer."""

    image_text: str
    placeholder_text: str
    before: str
    after: str


@dataclass(frozen=True)
class ImageLayout:
    """One family's image layout (LLaVA: "<image>" → that token × 576; Gemma 3: "<start_of_image>" →
    "\\n\\n<start_of_image>" + soft tokens × 256 + "<end_of_image>\\n\\n"; Qwen2-VL:
    "<|vision_start|><|image_pad|><|vision_end|>" with a run of pads that depends on the image's size)."""

    image_marker: Pieces  # what stands for one image in the chat text
    placeholder_id: int  # the token whose rows take the image's embeddings
    before: Pieces = ()  # what the marker becomes before the placeholder run
    after: Pieces = ()  # ... and after it
    tokens_per_image: int = 0  # a fixed run length; 0 when `grid` decides from the image's size
    grid: ResizeGrid | None = None

    def __post_init__(self) -> None:
        if (self.tokens_per_image > 0) == (self.grid is not None):
            raise ValueError("an image layout has either a fixed tokens_per_image or a resize grid")

    def tokens_for(self, width: int, height: int) -> int:
        """Placeholder tokens a width × height image takes; ValueError when the image cannot be taken."""
        return self.grid.tokens_for(width, height) if self.grid is not None else self.tokens_per_image

    def text(self, token_text: Callable[[int], str]) -> LayoutText:
        def join(pieces: Pieces) -> str:
            return "".join(p if isinstance(p, str) else token_text(p) for p in pieces)

        return LayoutText(join(self.image_marker), token_text(self.placeholder_id), join(self.before),
                          join(self.after))
