"""What the engine asks of a vision encoder, whatever the family."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisionFacts:
    """What the API process needs to lay out an image's tokens: the placeholder token the chat text holds
    for each image and how many of them one image becomes."""

    image_token_id: int
    tokens_per_image: int


class VisionEncoder(ABC):
    facts: VisionFacts

    @abstractmethod
    def encode(self, image: bytes) -> torch.Tensor:
        """One encoded image file → its embeddings, [facts.tokens_per_image, text hidden size]."""
