"""What the engine asks of a vision encoder, whatever the family."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from lightllm.models.vision.layout import ImageLayout


class VisionEncoder(ABC):
    layout: ImageLayout  # where its images go in a prompt (the API process lays them out by it)

    @abstractmethod
    def encode(self, image: bytes) -> torch.Tensor:
        """One encoded image file → its embeddings, [placeholder tokens, text hidden size]."""
