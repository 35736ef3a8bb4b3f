"""Images in prefill: each image's embeddings from the vision encoder (run on its own thread when the request
arrives, while the running requests' steps go on), kept in a bounded cache by content digest (LightLLM's
`--cache_capacity`: the same image in another request is not encoded again; one evicted before its request's
prefill is encoded again then), and laid on the rows of a step that hold its placeholder tokens. A prefill
chunk may begin or end inside an image: each row takes the embedding of its own position in the image's run."""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from lightllm.engine.protocol import ImageInput
from lightllm.engine.scheduler import ScheduledChunk
from lightllm.models.decoder import InputEmbeds
from lightllm.models.vision.base import VisionEncoder
from lightllm.models.vision.layout import ImageLayout


class ImageEmbedder:
    def __init__(self, encoder: VisionEncoder | None, model_name: str, capacity: int):
        self.encoder = encoder
        self.model_name = model_name
        self.capacity = capacity
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # digest -> embeddings, least recent first
        self._lock = threading.Lock()  # the cache is shared by the engine loop and the encoding thread
        self._thread: ThreadPoolExecutor | None = None  # started by the first image
        self.stats = {"encoded": 0, "cache_hits": 0}

    @property
    def layout(self) -> ImageLayout | None:
        return self.encoder.layout if self.encoder is not None else None

    def problem(self, prompt_ids: list[int], images: list[ImageInput]) -> str | None:
        """Why a request's images cannot be served as sent, or None. The API lays them out right; this guards
        the engine's own invariants for any sender (a run's length against the image's size is checked when
        the image is encoded: `prepare`)."""
        layout = self.layout
        if layout is None:
            return (f"model {self.model_name!r} does not take images (a text-only model)" if images
                    else None)
        token, end = layout.placeholder_id, 0
        for image in images:
            if layout.tokens_per_image and image.length != layout.tokens_per_image:
                return f"an image takes {layout.tokens_per_image} placeholder tokens, not {image.length}"
            if image.length < 1 or image.offset < end or image.offset + image.length > len(prompt_ids):
                return "images' placeholder runs must lie inside the prompt, in order and apart"
            if any(t != token for t in prompt_ids[image.offset:image.offset + image.length]):
                return f"an image's placeholder run must hold token {token} only"
            end = image.offset + image.length
        if prompt_ids.count(token) != sum(image.length for image in images):
            return f"the prompt holds image placeholder tokens ({token}) that no image fills"
        return None

    def prepare_async(self, images: list[ImageInput]) -> Future:
        """`prepare` on the encoding thread; the future's result is prepare's."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-encoder")
        return self._thread.submit(self.prepare, images)

    def prepare(self, images: list[ImageInput]) -> str | None:
        """Encode a new request's images before it is scheduled (into the cache), so an image the encoder cannot
        take fails its own request, not the step it would run in; why it failed, or None."""
        for image in images:
            try:
                rows = self.embeddings(image).shape[0]
            except (OSError, ValueError, RuntimeError) as exc:  # PIL's decode errors are OSErrors
                return f"the image could not be processed: {exc}"
            if rows != image.length:  # a dynamic-resolution image laid out for another size
                return f"the image takes {rows} placeholder tokens, not {image.length}"
        return None

    def embeddings(self, image: ImageInput) -> torch.Tensor:
        with self._lock:
            cached = self._cache.get(image.digest)
            if cached is not None:
                self._cache.move_to_end(image.digest)
                self.stats["cache_hits"] += 1
                return cached
        assert self.encoder is not None  # problem() refused images for a text-only model
        out = self.encoder.encode(image.data)  # outside the lock: the engine loop reads cached images meanwhile
        with self._lock:
            self.stats["encoded"] += 1
            if self.capacity > 0:
                self._cache[image.digest] = out
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        return out

    def input_embeds(self, plan: list[ScheduledChunk]) -> InputEmbeds | None:
        """The step's image rows (rows follow the plan's chunks, as ModelRunner.build_metadata lays them out)."""
        rows: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        row = 0
        for chunk in plan:
            start, end = chunk.start, chunk.start + chunk.num_tokens
            for image in chunk.seq.images:
                lo, hi = max(start, image.offset), min(end, image.offset + image.length)
                if lo < hi:
                    rows.append(torch.arange(row + lo - start, row + hi - start))
                    values.append(self.embeddings(image)[lo - image.offset:hi - image.offset])
            row += chunk.num_tokens
        if not rows:
            return None
        device = values[0].device
        return InputEmbeds(torch.cat(rows).to(device), torch.cat(values))
