"""How much memory the engine takes and why: the KV sizing rule and the start-up breakdown.

KV rule (every device): `--max_total_token_num` when given; else a full context for every running request,
`max_model_len x --running_max_req_size` tokens, capped by `--mem_fraction` of the memory available at start
(default 0.2 on CPU, 0.85 on GPU) divided by the bytes one token takes in every layer; at least 256 tokens.

Breakdown (logged at start, in /get_server_info's `memory` and as /metrics gauges), in bytes:
- weights: every tensor the model holds, counted once (tiles mapped from the tile cache and the embedding
  blocks mapped from the GGUF file included, though only the pages read are resident);
- kv_cache: the KV pool (all layers, K and V) and the request-to-token table;
- activations: the largest step's working buffers, estimated from the model's shapes at --batch_max_tokens
  rows (hidden, q/k/v, attention output, the MLP's gate/up and activation, one vocabulary-wide logits row
  per running request);
- runtime: the engine process's resident memory before the weights were loaded (interpreter, PyTorch,
  kernels).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
from dataclasses import dataclass

import torch

from lightllm.models.config import ModelConfig

CPU_MEM_FRACTION = 0.2
GPU_MEM_FRACTION = 0.85
MIN_KV_TOKENS = 256


@dataclass
class KVBudget:
    tokens: int
    rule: str  # how `tokens` was reached, in words (logged and shown in /get_server_info)


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def kv_budget(max_total_token_num: int | None, mem_fraction: float | None, max_model_len: int,
              running_max_req_size: int, bytes_per_token: int, available_bytes: int, device_type: str) -> KVBudget:
    """The KV pool's size in tokens by the rule above."""
    if max_total_token_num:
        return KVBudget(max_total_token_num, f"--max_total_token_num {max_total_token_num}")
    fraction = mem_fraction if mem_fraction is not None else (
        GPU_MEM_FRACTION if device_type == "cuda" else CPU_MEM_FRACTION)
    wanted = max_model_len * running_max_req_size
    cap = int(available_bytes * fraction) // bytes_per_token
    tokens = max(min(wanted, cap), MIN_KV_TOKENS)
    rule = (f"min(max_model_len {max_model_len} x running_max_req_size {running_max_req_size} = {wanted}, "
            f"mem_fraction {fraction:g} x available {available_bytes >> 20} MiB / {bytes_per_token} B per token "
            f"= {cap}) = {tokens} tokens")
    return KVBudget(tokens, rule)


def process_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim():
    libc = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(libc).malloc_trim if libc else None
    except (OSError, AttributeError):  # not glibc
        return None


_trim = _malloc_trim()
TRIM_GROWTH_BYTES = 64 << 20
_rss_after_trim = 0


def release_free_heap() -> None:
    """Hand the heap's free pages back to the OS once the process has grown by TRIM_GROWTH_BYTES since the last
    time. glibc keeps what a large step freed (its mmap threshold grows to the sizes it sees, so a long
    prompt's activation buffers stay in the heap): ~300 MB after one 1,500-token prompt on
    Qwen2.5-Coder-0.5B. The engine calls this when it goes idle, where the cost (the next large step faults
    its pages in again) lands on no request; short requests do not grow the heap enough to trigger it."""
    global _rss_after_trim
    if _trim is None or process_rss_bytes() - _rss_after_trim < TRIM_GROWTH_BYTES:
        return
    _trim(0)
    _rss_after_trim = process_rss_bytes()


def tensor_bytes(root: object) -> int:
    """Bytes of the distinct tensor storages reachable from `root` through public attributes, dataclass
    fields, lists, tuples and dicts (a storage shared by several views counts once)."""
    seen_objects: set[int] = set()
    storages: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif dataclasses.is_dataclass(obj) or type(obj).__module__.startswith("lightllm."):
            stack.extend(value for name, value in vars(obj).items() if not name.startswith("_"))
    return sum(storages.values())


def activation_bytes(config: ModelConfig, step_tokens: int, running_requests: int, dtype_bytes: int = 4) -> int:
    """Peak working buffers of one forward step of `step_tokens` rows (an estimate from the shapes)."""
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    per_row = 2 * config.hidden_size + (q + 2 * kv) + 2 * q + 3 * config.intermediate_size
    logits = min(step_tokens, running_requests) * config.vocab_size
    return (step_tokens * per_row + 2 * logits) * dtype_bytes


@dataclass
class MemoryBreakdown:
    weights: int
    kv_cache: int
    activations: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.runtime

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}

    def describe(self) -> str:
        mib = {name: value / 2**20 for name, value in self.as_dict().items()}
        return (f"weights {mib['weights']:.0f} MiB, KV cache {mib['kv_cache']:.0f} MiB, activations "
                f"{mib['activations']:.0f} MiB, runtime {mib['runtime']:.0f} MiB; total {mib['total']:.0f} MiB")
