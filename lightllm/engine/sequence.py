"""Engine-side state of one request."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from lightllm.engine.lora import namespaced
from lightllm.engine.protocol import ImageInput, SamplingParams
from lightllm.engine.speculative import PromptLookup

_admission_counter = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: the scheduler's `in` and `remove` must not compare token lists
class Sequence:
    rid: str
    prompt_ids: list[int]  # as the request sent it; never changes
    params: SamplingParams
    status: SeqStatus = SeqStatus.WAITING
    slot: int | None = None  # row in the req_to_token table while KV is held
    num_computed: int = 0  # leading tokens of all_ids whose K/V are in the pool
    num_cached: int = 0  # prompt tokens served by the prefix cache at admission
    admission_order: int = -1
    generator: torch.Generator | None = None
    grammar: Any = None  # a grammar matcher when the request is constrained
    finish_reason: str | None = None
    prefix_waits: int = 0  # scheduling steps deferred while a running request computed a shared prefix
    passed_over: int = 0  # steps in which a request that arrived later was admitted before this one
    lookup: PromptLookup = field(default_factory=PromptLookup)  # n-gram memo for speculative drafting
    images: list[ImageInput] = field(default_factory=list)  # the prompt's images (engine/image_embedder.py)
    lora_name: str | None = None  # the LoRA adapter the request asked for (None: the base model)
    lora_uid: int = 0  # that adapter's prefix-cache namespace (engine/lora.py)
    lora: Any = None  # the adapter's weights (models/lora/adapter.py), bound at admission
    mrope: Any = None  # M-RoPE prompt positions (models/mrope.py), laid out at its first step with images
    # Prompt then output in one list that only grows (as nano-vllm keeps it): every step reads it, and
    # rebuilding prompt + output there would cost a copy of the whole context per sequence per step.
    token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    @property
    def all_ids(self) -> list[int]:
        """Prompt + output: the sequence's own list, not a copy (read or slice it; add with append_token)."""
        return self.token_ids

    def cache_key(self, end: int) -> list[int]:
        """The prefix-cache key of the first `end` tokens: their ids in the request's adapter namespace."""
        ids = self._content_ids(end)
        return ids if self.lora_uid == 0 else namespaced(ids, self.lora_uid)

    def _content_ids(self, end: int) -> list[int]:
        """The first `end` token ids (a copy), each image's tokens standing for its content, not for the
        placeholder token."""
        ids = self.token_ids[:end]
        for image in self.images:
            if image.offset < end:
                run = min(end, image.offset + image.length) - image.offset
                ids[image.offset:image.offset + run] = [image.cache_token] * run
        return ids

    @property
    def prompt_content(self) -> list[int]:
        """The prompt as the prefix cache tells prompts apart within one adapter (its own list, not a copy,
        when it holds no image)."""
        return self._content_ids(len(self.prompt_ids)) if self.images else self.prompt_ids

    @property
    def output_ids(self) -> tuple[int, ...]:
        """The generated tokens (a copy, read-only: append_token adds one)."""
        return tuple(self.token_ids[len(self.prompt_ids):])

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def total_len(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V must still be computed before the next token can be sampled."""
        return self.total_len - self.num_computed

    @property
    def remaining_new_tokens(self) -> int:
        return max(0, self.params.max_new_tokens - self.num_output_tokens)

    @property
    def can_draft(self) -> bool:
        """Whether prompt-lookup drafting may run for this sequence (engine/speculative.py): greedy without
        logits processing, so verifying a draft needs nothing but an argmax per position."""
        p = self.params
        return (p.greedy and p.logprobs is None and self.grammar is None and not p.logit_bias
                and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
                and self.num_output_tokens >= p.min_new_tokens)

    def mark_admitted(self) -> None:
        self.status = SeqStatus.RUNNING
        self.admission_order = next(_admission_counter)
