"""The engine's LoRA adapters: which names are registered (at start, or loaded later), which are resident in
memory (at most --max_loras, least recently used evicted), and the prefix-cache namespace of each.

A request names its adapter; the scheduler admits it only once that adapter is resident (`acquire`), loading
it from its folder when there is room or when the least recently used resident adapter has no running
request. Otherwise the request waits, never running on another adapter. A running request holds its adapter
object, so unloading or evicting that name never changes a request in flight.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass

from lightllm.models.config import ModelConfig
from lightllm.models.lora.adapter import AdapterError, LoraAdapter, load_adapter

logger = logging.getLogger("lightllm.engine")

_uids = itertools.count(1)  # 0 is the base model's namespace


@dataclass
class Registered:
    path: str
    uid: int  # prefix-cache namespace: a new one per registration, so reloaded weights never share KV


class LoraManager:
    def __init__(self, config: ModelConfig, max_loras: int, max_rank: int, moe_layers: bool = False):
        if max_loras < 1 or max_rank < 1:
            raise ValueError("--max_loras and --max_lora_rank must be at least 1")
        self.config = config
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
        adapter = load_adapter(name, path, self.config, self.max_rank, self.moe_layers)
        self.loads += 1
        return adapter


def namespaced(ids: list[int], uid: int) -> list[int]:
    """Prefix-cache keys of `ids` under adapter namespace `uid` (0, the base model: the ids themselves): the
    same prompt under different adapters has different K/V, so their keys never match."""
    if uid == 0:
        return ids
    offset = uid << 32  # token ids are below 2**32
    return [t + offset for t in ids]


__all__ = ["AdapterError", "LoraManager", "namespaced"]
