#!/usr/bin/env python3
"""Where an engine step's time goes, per op: each linear layer by role and kernel, the fused CPU kernels,
the rest of the forward pass, sampling and the engine's own bookkeeping.

Timers wrap the layer objects' and kernels' Python entry points (every op here is synchronous on the CPU),
so the figures are wall time per step, medians over the measured steps, with the wrappers' own cost
(about 1 us per call) inside "rest of forward".

  python benchmarks/step_profile.py --model_dir qwen2.5-coder --quant_type gguf --batch 1 16 --context 256
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_bench import build_engine, random_prompt  # noqa: E402

from lightllm.engine.protocol import AddRequest, SamplingParams  # noqa: E402
from lightllm.kernels.cpu import CpuKernels  # noqa: E402
from lightllm.models.quant import linear as quant  # noqa: E402
from lightllm.models.quant.tiled import TiledLinear  # noqa: E402

LINEAR_CLASSES = (quant.DenseLinear, quant.Int8Linear, quant.Int4Linear, quant.GgufLinear, TiledLinear)
KERNEL_METHODS = ("add_rms_norm", "silu_mul", "rope_store", "decode_attention", "prefill_attention", "topk_rows")


class Timers:
    def __init__(self) -> None:
        self.step: dict[str, float] = defaultdict(float)

    def add(self, label: str, seconds: float) -> None:
        self.step[label] += seconds


def linear_roles(model) -> dict[int, str]:
    """id(layer object) -> its role; a RowCountDispatch's two paths are told apart by their class."""
    roles: dict[int, str] = {}

    def tag(layer, role: str) -> None:
        if layer is None:
            return
        if isinstance(layer, quant.RowCountDispatch):
            tag(layer.quantized, role)
            tag(layer.batched, role)
            return
        roles[id(layer)] = role

    for lw in model.weights.layers:
        for role in ("qkv", "o", "gate_up", "down"):
            tag(getattr(lw, role), role)
        if lw.experts is not None:
            tag(lw.experts.router, "router")
            for layer in [*lw.experts.gate_up, *lw.experts.down]:
                tag(layer, "experts")
    tag(model.weights.lm_head, "lm_head")
    return roles


def instrument(engine, timers: Timers) -> None:
    roles = linear_roles(engine.model)
    for cls in LINEAR_CLASSES:
        original = cls.raw

        def timed(self, x, _original=original, _cls=cls.__name__):
            start = time.perf_counter()
            out = _original(self, x)
            timers.add(f"linear {roles.get(id(self), '?')} [{_cls}]", time.perf_counter() - start)
            return out

        cls.raw = timed
    for name in KERNEL_METHODS:
        original = getattr(CpuKernels, name)

        def timed_kernel(self, *args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            out = _original(self, *args, **kwargs)
            timers.add(f"kernel {_name}", time.perf_counter() - start)
            return out

        setattr(CpuKernels, name, timed_kernel)
    model, runner = engine.model, engine.runner
    forward, execute = model.forward, runner.execute

    def timed_forward(*args, **kwargs):
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        timers.add("forward (total)", time.perf_counter() - start)
        return out

    def timed_execute(*args, **kwargs):
        start = time.perf_counter()
        out = execute(*args, **kwargs)
        timers.add("runner.execute (total)", time.perf_counter() - start)
        return out

    model.forward = timed_forward
    runner.execute = timed_execute


def profile_steps(engine, timers: Timers, steps: int) -> dict[str, float]:
    """Median ms per step of each label over `steps` engine steps, plus the derived remainders."""
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(steps):
        timers.step.clear()
        start = time.perf_counter()
        engine.step()
        total = time.perf_counter() - start
        parts = dict(timers.step)
        ops = sum(v for k, v in parts.items() if not k.endswith("(total)"))
        parts["rest of forward (embedding, residual adds, logits refinement, Python)"] = parts.get("forward (total)", 0) - ops
        parts["sampling and metadata (runner outside forward)"] = (parts.get("runner.execute (total)", 0)
                                                                  - parts.get("forward (total)", 0))
        parts["engine outside the runner (scheduler, bookkeeping)"] = total - parts.get("runner.execute (total)", 0)
        parts["step (total)"] = total
        for k, v in parts.items():
            samples[k].append(v * 1000)
    return {k: statistics.median(v) for k, v in samples.items()}


def decode_profile(engine, timers: Timers, batch: int, context: int, steps: int, rng: random.Random) -> dict:
    vocab = engine.model_config.vocab_size
    for i in range(batch):
        engine.add_request(AddRequest(f"d{batch}-{i}", random_prompt(rng, context, vocab),
                                      SamplingParams(max_new_tokens=steps + 8, temperature=0.0, ignore_eos=True)))
    while engine.scheduler.waiting or any(s.num_pending > 1 for s in engine.scheduler.running):
        engine.step()
    engine.step()
    result = profile_steps(engine, timers, steps)
    for seq in list(engine.scheduler.running):
        engine.scheduler.abort(seq.rid)
    return result


def prefill_profile(engine, timers: Timers, length: int, repeats: int, rng: random.Random) -> dict:
    vocab = engine.model_config.vocab_size
    samples: dict[str, list[float]] = defaultdict(list)
    for r in range(repeats):
        engine.add_request(AddRequest(f"p{r}", random_prompt(rng, length, vocab),
                                      SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)))
        for k, v in profile_steps(engine, timers, 1).items():
            samples[k].append(v)
    return {k: statistics.median(v) for k, v in samples.items()}


def print_table(title: str, result: dict[str, float]) -> None:
    total = result["step (total)"]
    print(f"\n{title}: {total:.1f} ms per step")
    rows = sorted(((k, v) for k, v in result.items() if not k.endswith("(total)")), key=lambda kv: -kv[1])
    for k, v in rows:
        print(f"  {v:8.2f} ms {100 * v / total:5.1f} %  {k}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default=None, help="path or catalog name (default: the embedded SmolLM2)")
    p.add_argument("--quant_type", default="gguf")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    from lightllm.models.loading.catalog import resolve_model, smollm2_path

    model_dir = str(smollm2_path()) if args.model_dir is None else resolve_model(args.model_dir)
    need = max(args.batch) * (args.context + args.steps + 16) + args.prefill * 4
    engine = build_engine(model_dir, need, max(args.prefill, 2048), "auto", args.quant_type)
    timers = Timers()
    instrument(engine, timers)
    rng = random.Random(0)
    results = {"model": model_dir, "quant_type": args.quant_type, "decode": {}, "prefill": None}
    print(f"model {model_dir} quant={args.quant_type}")
    for batch in args.batch:
        results["decode"][batch] = decode_profile(engine, timers, batch, args.context, args.steps, rng)
        print_table(f"decode, batch {batch}, context {args.context}", results["decode"][batch])
    results["prefill"] = prefill_profile(engine, timers, args.prefill, 3, rng)
    print_table(f"prefill, one {args.prefill}-token prompt", results["prefill"])
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
