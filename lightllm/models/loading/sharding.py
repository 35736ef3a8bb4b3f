"""Tensor-parallel sharding of a checkpoint (Megatron layout, as LightLLM and vLLM split it):
column-parallel q/k/v and gate/up (each rank keeps whole heads / an intermediate slice), row-parallel o and
down (their partial outputs are summed by an all-reduce), vocab-parallel embedding and lm_head, the KV cache
split by KV heads. Norms and MoE routers are replicated.

Sharding happens on the canonical tensors before the linears are built, so quantized GGUF blocks stay
quantized: rows slice freely, columns by whole quantization groups.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from lightllm.models.config import ModelConfig
from lightllm.models.quant.weights import GgufBlocks, GroupQuantized


@dataclass(frozen=True)
class TPShard:
    """This process's place in a tensor-parallel group."""

    rank: int
    world: int

    def span(self, total: int) -> tuple[int, int]:
        size = total // self.world
        return self.rank * size, (self.rank + 1) * size


def sharding_problems(config: ModelConfig, world: int) -> list[str]:
    """What keeps `config` from splitting `world` ways (empty when it can)."""
    sizes = {"num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
             "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size}
    if config.num_experts:
        sizes["moe_intermediate_size"] = config.moe_intermediate_size
    return [f"{name} {value} is not divisible by {world}" for name, value in sizes.items() if value % world]


def shard_config(config: ModelConfig, world: int) -> ModelConfig:
    """The per-rank view the model code computes with: its heads, its intermediate slice."""
    if world == 1:
        return config
    problems = sharding_problems(config, world)
    if problems:
        raise ValueError(f"--tp {world} cannot split {config.name}: " + "; ".join(problems))
    return dataclasses.replace(config, num_heads=config.num_heads // world, num_kv_heads=config.num_kv_heads // world,
                               intermediate_size=config.intermediate_size // world,
                               moe_intermediate_size=config.moe_intermediate_size // world)


def slice_rows(weight: Any, start: int, end: int) -> Any:
    if isinstance(weight, GgufBlocks):
        return weight.rows(start, end)
    if isinstance(weight, GroupQuantized):
        return GroupQuantized(weight.q[start:end], weight.scale[start:end], weight.zero[start:end], weight.group)
    return weight[start:end]


def slice_cols(weight: Any, start: int, end: int) -> Any:
    if isinstance(weight, GgufBlocks):
        cut = weight.cols(start, end)  # None: the cut falls inside a block
        return cut if cut is not None else weight.dequantize()[:, start:end].contiguous()
    if isinstance(weight, GroupQuantized):
        if start % weight.group or end % weight.group:  # the cut falls inside a quantization group
            return weight.dequantize()[:, start:end].contiguous()
        g0, g1 = start // weight.group, end // weight.group
        return GroupQuantized(weight.q[:, start:end].contiguous(), weight.scale[:, g0:g1].contiguous(),
                              weight.zero[:, g0:g1].contiguous(), weight.group)
    return weight[:, start:end].contiguous()


class Sharder:
    """Cuts the canonical tensors of one checkpoint for one rank (identity when there is no TP group)."""

    def __init__(self, config: ModelConfig, shard: TPShard | None):
        self.config = config
        self.shard = shard

    @property
    def active(self) -> bool:
        return self.shard is not None and self.shard.world > 1

    def rows(self, weight: Any, total: int | None = None) -> Any:
        """This rank's slice of the output rows (or a bias), of `total` rows (default: all of them)."""
        if not self.active:
            return weight
        start, end = self.shard.span(total if total is not None else weight.shape[0])
        return slice_rows(weight, start, end)

    def cols(self, weight: Any) -> Any:
        if not self.active:
            return weight
        return slice_cols(weight, *self.shard.span(weight.shape[1]))

    def split_rows(self, weight: Any, sizes: list[int]) -> list[Any]:
        """A fused tensor (Phi-3's qkv, gate_up) → this rank's slice of each part."""
        parts, start = [], 0
        for size in sizes:
            parts.append(self.rows(slice_rows(weight, start, start + size)))
            start += size
        return parts

    def vocab(self, weight: torch.Tensor | Any) -> Any:
        return self.rows(weight, self.config.vocab_size)


class TPComm:
    """The collectives a sharded model runs in its forward pass, over torch.distributed's default group
    (gloo on CPU, NCCL on CUDA). Sums travel in float32: the quantized kernels hand back bf16 partials."""

    def __init__(self, shard: TPShard, vocab_size: int):
        self.shard = shard
        self.vocab_start, self.vocab_end = shard.span(vocab_size)

    def all_reduce_(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum the row-parallel partial outputs of every rank, in place when the dtype allows."""
        import torch.distributed as dist

        if partial.dtype == torch.float32:
            dist.all_reduce(partial)
            return partial
        total = partial.float()
        dist.all_reduce(total)
        partial.copy_(total)
        return partial

    def embed(self, table: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: each rank fills the rows of the ids it holds, zeros elsewhere; summed."""
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.vocab_end - self.vocab_start)
        rows = table.index_select(0, local.clamp(0, table.shape[0] - 1)) * mine.unsqueeze(1).to(table.dtype)
        return self.all_reduce_(rows.contiguous())

    def gather_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """[T, V / world] per rank → [T, V] on every rank."""
        import torch.distributed as dist

        parts = [torch.empty_like(local_logits) for _ in range(self.shard.world)]
        dist.all_gather(parts, local_logits.contiguous())
        return torch.cat(parts, dim=-1)
