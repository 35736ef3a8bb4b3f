"""Building a rank's model from the engine's configuration: device, dtypes, weights, and the KV token budget.

Shared by the engine process (rank 0) and the tensor-parallel worker ranks (engine/distributed.py).
"""

from __future__ import annotations

import logging

import torch

from lightllm.engine.memory import KVBudget, available_memory_bytes, kv_budget
from lightllm.engine.protocol import EngineConfig
from lightllm.models.config import ModelConfig
from lightllm.models.decoder import LlamaModel
from lightllm.models.families.registry import family_named, model_class_for
from lightllm.models.loading.loader import load_model_config, load_model_weights, resolve_quant_type
from lightllm.models.loading.sharding import TPComm, TPShard, shard_config
from lightllm.kernels import cpu as cpu_kernels
from lightllm.models.quant import policy as quant_policy
from lightllm.models.quant import tile_cache
from lightllm.models.quant.factory import dense_copy_bytes
from lightllm.models.quant.policy import LinearPolicy
from lightllm.models.vision.base import VisionEncoder
from lightllm.models.vision.registry import load_gguf_vision, load_vision

logger = logging.getLogger("lightllm.engine")

def configure_process(cfg: EngineConfig) -> None:
    """This process's share of the server's flags that modules read at load time (before the model loads):
    --cpu_kernels, --tile_cache, --tile_cache_dir."""
    cpu_kernels.configure(cfg.cpu_kernels)
    tile_cache.configure(cfg.tile_cache, cfg.tile_cache_dir)


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


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


def kv_budget_for(cfg: EngineConfig, max_model_len: int, bytes_per_token: int, device: torch.device) -> KVBudget:
    """The KV pool's size by the rule in engine/memory.py, from the start arguments."""
    return kv_budget(cfg.max_total_token_num, cfg.mem_fraction, max_model_len, cfg.running_max_req_size,
                     bytes_per_token, available_memory_bytes(device), device.type)


def model_config_for(cfg: EngineConfig) -> ModelConfig:
    """The whole model's configuration, with the start arguments that override it applied."""
    model_cfg = load_model_config(cfg.model_path)
    if cfg.eos_id:
        model_cfg.eos_token_ids = list(cfg.eos_id)
    return model_cfg


def build_vision(cfg: EngineConfig, full: ModelConfig, device: torch.device, dtype: torch.dtype) -> VisionEncoder | None:
    """The vision encoder of a vision-language model (None for a text-only one): the family's own tower, or for a
    GGUF language model the --mmproj file's. Rank 0 alone runs it (its embeddings travel with each step)."""
    family = family_named(full.architecture)
    if family.vision is None or cfg.mmproj is not None:
        return load_gguf_vision(cfg.model_path, cfg.mmproj, full, device, dtype)
    return load_vision(family.vision, cfg.model_path, device, dtype)


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
