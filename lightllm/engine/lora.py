"""The engine's LoRA adapters: which names are registered (at start, or loaded later), which are resident in
memory (at most --max_loras, least recently used evicted), and the prefix-cache namespace of each.

A request names its adapter; the scheduler admits it only once that adapter is resident (`acquire`), loading
it from its folder when there is room or when the least recently used resident adapter has no running
request. Otherwise the request waits, never running on another adapter. A running request holds its adapter
object, so unloading or evicting that name never changes a request in flight.

Under tensor parallelism rank 0 alone decides (this manager); every other rank mirrors it (`LoraReplica`).
Each read of a folder is one adapter object with its own key; rank 0 sends the other ranks each read's
checked weights (they cut their own shard) and, once rank 0's object is gone (evicted or unloaded, and no
request or cached batch holds it any more), that the key is dropped. These ride on the step broadcast,
ahead of the step's rows, which name their adapters by key: every rank runs a row on the same read.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from lightllm.models.config import ModelConfig
from lightllm.models.loading.sharding import TPShard
from lightllm.models.lora.adapter import AdapterError, AdapterWeights, LoraAdapter, read_adapter, shard_adapter
from lightllm.models.lora.batch import LoraBatch

logger = logging.getLogger("lightllm.engine")

_uids = itertools.count(1)  # 0 is the base model's namespace


@dataclass
class Registered:
    path: str
    uid: int  # prefix-cache namespace: a new one per registration, so reloaded weights never share KV


# what rank 0 sends the other ranks: ("load", key, weights) or ("drop", key, None), in order
LoraOp = tuple[str, int, AdapterWeights | None]


@dataclass
class LoraSync:
    """Loads/drops sent to the other ranks between steps (at start, a dynamic load), applied like a step's
    `lora_ops` (engine/distributed.py)."""

    lora_ops: list[LoraOp]


class LoraOutbox:
    """Rank 0's adapter loads and drops not yet sent to the other ranks."""

    def __init__(self) -> None:
        self.pending: list[LoraOp] = []

    def loaded(self, adapter: LoraAdapter, weights: AdapterWeights) -> None:
        self.pending.append(("load", adapter.key, weights))
        weakref.finalize(adapter, self._dropped, adapter.key)  # holds the key, not the adapter

    def _dropped(self, key: int) -> None:
        for i, (op, k, _) in enumerate(self.pending):
            if op == "load" and k == key:  # never sent: the other ranks need not hear of it
                del self.pending[i]
                return
        self.pending.append(("drop", key, None))

    def take(self) -> list[LoraOp]:
        ops, self.pending = self.pending, []
        return ops


class LoraReplica:
    """A worker rank's adapters: its shard of each read rank 0 holds, by key."""

    def __init__(self, config: ModelConfig, shard: TPShard, dtype: torch.dtype = torch.float32):
        self.config = config  # the whole model's
        self.shard = shard
        self.dtype = dtype
        self.adapters: dict[int, LoraAdapter] = {}

    def apply(self, ops: list[LoraOp]) -> None:
        for op, key, weights in ops:
            if op == "load":
                self.adapters[key] = shard_adapter(weights, self.config, self.shard, self.dtype)
            else:
                self.adapters.pop(key, None)

    def batch(self, runs: list[tuple[int | None, int, int]] | None) -> LoraBatch | None:
        """The step's LoraBatch from its (adapter key or None, first row, rows) runs (a key rank 0 sent)."""
        if not runs:
            return None
        return LoraBatch.from_runs([(None if key is None else self.adapters[key], start, n) for key, start, n in runs])


class LoraManager:
    def __init__(self, config: ModelConfig, max_loras: int, max_rank: int, moe_layers: bool = False,
                 shard: TPShard | None = None, dtype: torch.dtype = torch.float32):
        """`config`: the whole model's; `shard`: rank 0's place under tensor parallelism (None without): the
        adapters it holds are its shards, and `outbox` collects what the other ranks must mirror; `dtype`: the
        adapters' storage (--lora_dtype, `lora_dtype`)."""
        if max_loras < 1 or max_rank < 1:
            raise ValueError("--max_loras and --max_lora_rank must be at least 1")
        self.config = config
        self.shard = shard
        self.dtype = dtype
        self.outbox = LoraOutbox() if shard is not None and shard.world > 1 else None
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.moe_layers = moe_layers
        self.registered: dict[str, Registered] = {}
        self.resident: OrderedDict[str, LoraAdapter] = OrderedDict()  # least recently used first
        self.loads = 0  # adapters read from disk (start, dynamic loads and reloads after eviction)
        self.evictions = 0

    def register(self, name: str, path: str) -> LoraAdapter:
        """Check and register the adapter at `path` under `name` (AdapterError: why it cannot be served). It
        stays resident when there is room (evicting an idle adapter is left to `acquire`)."""
        if name in self.registered:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        adapter = self._read(name, path)
        self.registered[name] = Registered(path, next(_uids))
        if len(self.resident) < self.max_loras:
            self.resident[name] = adapter
        logger.info("LoRA adapter %s registered from %s (rank %d, modules %s, %.1f MB)", name, path, adapter.rank,
                    ",".join(adapter.target_modules), adapter.nbytes / 1e6)
        return adapter

    def unregister(self, name: str) -> None:
        if self.registered.pop(name, None) is None:
            raise KeyError(name)
        self.resident.pop(name, None)

    def uid(self, name: str | None) -> int:
        return 0 if name is None else self.registered[name].uid

    def acquire(self, name: str, busy: set[str]) -> LoraAdapter | None:
        """The resident adapter `name` (marked most recently used), loading it if there is room or an adapter
        outside `busy` (those running requests use) can be evicted; None: not now, the request waits.
        KeyError when `name` is not registered; AdapterError when its folder no longer reads."""
        entry = self.registered[name]
        adapter = self.resident.get(name)
        if adapter is not None:
            self.resident.move_to_end(name)
            return adapter
        if len(self.resident) >= self.max_loras:
            victim = next((n for n in self.resident if n not in busy), None)
            if victim is None:
                return None
            del self.resident[victim]
            self.evictions += 1
            logger.info("LoRA adapter %s evicted (least recently used) for %s", victim, name)
        adapter = self._read(name, entry.path)
        self.resident[name] = adapter
        return adapter

    def _read(self, name: str, path: str) -> LoraAdapter:
        weights = read_adapter(name, path, self.config, self.max_rank, self.moe_layers)
        adapter = shard_adapter(weights, self.config, self.shard, self.dtype)
        self.loads += 1
        if self.outbox is not None:
            self.outbox.loaded(adapter, weights)
        return adapter


LORA_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def lora_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """--lora_dtype: float32 or bfloat16 storage of the adapters' weights (their products are computed in float32
    either way); auto: the model's dtype where it is one of those (float32 on CPU by default), else float32."""
    if name == "auto":
        return model_dtype if model_dtype in (torch.float32, torch.bfloat16) else torch.float32
    if name not in LORA_DTYPES:
        raise ValueError(f"--lora_dtype {name!r} is not supported; use auto, float32 or bfloat16")
    return LORA_DTYPES[name]


def namespaced(ids: list[int], uid: int) -> list[int]:
    """Prefix-cache keys of `ids` under adapter namespace `uid` (0, the base model: the ids themselves): the
    same prompt under different adapters has different K/V, so their keys never match."""
    if uid == 0:
        return ids
    offset = uid << 32  # token ids are below 2**32
    return [t + offset for t in ids]


__all__ = ["AdapterError", "LoraManager", "LoraOutbox", "LoraReplica", "namespaced"]
