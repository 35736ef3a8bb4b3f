"""The adapters' products of one step alone (models/lora/batch.py), float32 against bfloat16 storage
(--lora_dtype), stepped in turn: a decode step (16 rows, two per adapter: the BGMV kernel, one call per fused
linear) and a prefill step (1,024 rows, each adapter's 128 in two ranges of 64, as lora_speed.py's streams lay
them out: segment matmuls). Eight random rank-16 adapters on all seven projections of the model's shapes.

    OMP_NUM_THREADS=1 python benchmarks/lora_kernel.py [--model smollm2] [--steps 30]
"""

from __future__ import annotations

import argparse
import time

import torch

from lightllm.engine.model_setup import model_config_for
from lightllm.engine.protocol import EngineConfig
from lightllm.models.loading.catalog import resolve_model
from lightllm.models.lora.adapter import MODULE_PARTS, LoraAdapter, _join, part_shapes
from lightllm.models.lora.batch import LoraBatch


def random_adapter(config, rank: int, dtype: torch.dtype, seed: int) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    shapes = part_shapes(config)
    layers = []
    for _ in range(config.num_layers):
        parts: dict[str, list] = {}
        for module, (target, part) in MODULE_PARTS.items():
            fan_in, fan_out = shapes[module]
            parts.setdefault(target, []).append((part, torch.randn(rank, fan_in, generator=gen) * 0.02,
                                                 torch.randn(fan_out, rank, generator=gen) * 0.02))
        layers.append({target: _join(target, p, shapes, dtype) for target, p in parts.items()})
    return LoraAdapter(f"a{seed}", "", rank, list(MODULE_PARTS), layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    config = model_config_for(EngineConfig(model_path=resolve_model(args.model)))
    widths = {"qkv": (config.hidden_size, (config.num_heads + 2 * config.num_kv_heads) * config.head_dim),
              "o": (config.num_heads * config.head_dim, config.hidden_size),
              "gate_up": (config.hidden_size, 2 * config.intermediate_size),
              "down": (config.intermediate_size, config.hidden_size)}
    n = args.adapters
    stores = {dtype: [random_adapter(config, args.rank, dtype, i) for i in range(n)]
              for dtype in (torch.float32, torch.bfloat16)}
    # decode: stream i on adapter i mod n, one row each; prefill: 64 rows per stream
    layouts = {"decode": (1, 2 * n), "prefill": (64, 2 * n)}
    inputs = {kind: {t: torch.randn(rows * streams, w_in) for t, (w_in, _) in widths.items()}
              for kind, (rows, streams) in layouts.items()}
    times: dict[tuple[str, torch.dtype], list[float]] = {}
    for step in range(args.steps + 3):  # 3 warm-up steps
        for kind, (rows, streams) in layouts.items():
            for dtype, adapters in stores.items():
                batch = LoraBatch.from_runs([(adapters[i % n], i * rows, rows) for i in range(streams)])
                outs = {t: torch.zeros(rows * streams, w_out) for t, (_, w_out) in widths.items()}
                t0 = time.perf_counter()
                for layer in range(config.num_layers):
                    for target in widths:
                        batch.add_(layer, target, inputs[kind][target], outs[target])
                if step >= 3:
                    times.setdefault((kind, dtype), []).append(time.perf_counter() - t0)
    for (kind, dtype), ts in times.items():
        ts.sort()
        mb = sum(a.nbytes for a in stores[dtype]) / 1e6
        print(f"{kind:8s} {str(dtype):15s} adapters {mb:6.1f} MB: median {1e3 * ts[len(ts) // 2]:7.1f} ms, "
              f"min {1e3 * ts[0]:7.1f}, max {1e3 * ts[-1]:7.1f} ({len(ts)} steps)")


if __name__ == "__main__":
    main()
