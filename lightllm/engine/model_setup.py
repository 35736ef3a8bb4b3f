"""Building a rank's model from the engine's configuration: device, dtypes, weights, and the KV token budget.

Shared by the engine process (rank 0) and the tensor-parallel worker ranks (engine/distributed.py).
"""

from __future__ import annotations

import logging

import torch

from lightllm.engine.protocol import EngineConfig
from lightllm.models.config import ModelConfig
from lightllm.models.decoder import LlamaModel
from lightllm.models.families.registry import model_class_for
from lightllm.models.loading.loader import load_model_config, load_model_weights, resolve_quant_type
from lightllm.models.loading.sharding import TPComm, TPShard, shard_config
from lightllm.models.quant import policy as quant_policy
from lightllm.models.quant.factory import dense_copy_bytes
from lightllm.models.quant.policy import LinearPolicy

logger = logging.getLogger("lightllm.engine")

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_CPU_MAX_AUTO_TOKENS = 131072


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name in ("auto", None):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # AVX2 CPUs have no fast bf16 matmul
    if name not in _DTYPES:
        raise ValueError(f"--data_type {name!r} is not supported; use one of fp32, bf16, fp16")
    return _DTYPES[name]


def pick_kv_dtype(name: str, model_dtype: torch.dtype, fused_cpu_kernels: bool) -> torch.dtype:
    """'auto': fp16 when the fused CPU kernels read the cache (decode attention is bound by KV bytes; they
    convert with F16C), else the model's dtype."""
    if name in ("auto", None):
        return torch.float16 if fused_cpu_kernels else model_dtype
    if name not in _DTYPES:
        raise ValueError(f"--kv_cache_dtype {name!r} is not supported; use one of auto, fp32, fp16, bf16")
    return _DTYPES[name]


def _available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def kv_budget_tokens(cfg: EngineConfig, bytes_per_token: int, device: torch.device) -> int:
    if cfg.max_total_token_num:
        return cfg.max_total_token_num
    fraction = cfg.mem_fraction if cfg.mem_fraction is not None else (0.85 if device.type == "cuda" else 0.2)
    tokens = int(_available_memory_bytes(device) * fraction) // bytes_per_token
    if device.type == "cpu":
        tokens = min(tokens, _CPU_MAX_AUTO_TOKENS)
    return max(tokens, 256)


def model_config_for(cfg: EngineConfig) -> ModelConfig:
    """The whole model's configuration, with the start arguments that override it applied."""
    model_cfg = load_model_config(cfg.model_path)
    if cfg.eos_id:
        model_cfg.eos_token_ids = list(cfg.eos_id)
    return model_cfg


def build_model(cfg: EngineConfig, full: ModelConfig, rank: int,
                device: torch.device) -> tuple[LlamaModel, torch.dtype]:
    """This rank's model (all of it without tensor parallelism; `full` is the whole model's configuration)
    and the KV cache dtype it runs with."""
    dtype = pick_dtype(cfg.data_type, device)
    shard = TPShard(rank, cfg.tp) if cfg.tp > 1 else None
    rank_config = shard_config(full, cfg.tp)  # refuses head counts that do not divide, naming them
    quant_type = resolve_quant_type(cfg.quant_type, cfg.model_path, device)
    quant_policy.configure(LinearPolicy(act_levels=cfg.act_levels, dense_min_rows=cfg.dense_bf16_min_rows))
    weights = load_model_weights(cfg.model_path, full, device, dtype, quant_type, shard)
    if dense_copy_bytes():
        logger.warning("--dense_bf16_min_rows %d: dense bf16 copies of the quantized matrices hold %.0f MiB more",
                       cfg.dense_bf16_min_rows, dense_copy_bytes() / 2**20)
    comm = TPComm(shard, full.vocab_size) if shard is not None else None
    model = model_class_for(full.architecture)(rank_config, weights, device, dtype, comm)
    return model, pick_kv_dtype(cfg.kv_cache_dtype, dtype, model.kernels is not None)
