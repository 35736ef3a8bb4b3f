#!/usr/bin/env python3
"""Micro-benchmark of one engine step without HTTP: decode at several batch sizes and context lengths,
and one prefill chunk. Compares kernels and engine changes directly.

  python benchmarks/step_bench.py                       # embedded SmolLM2
  python benchmarks/step_bench.py --model_dir X.gguf --batch 1 8 32 --context 512 2048
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from lightllm.engine.engine import Engine
from lightllm.engine.protocol import AddRequest, EngineConfig, SamplingParams


def build_engine(model_dir: str, tokens: int, batch_max_tokens: int, data_type: str, quant_type: str = "none") -> Engine:
    return Engine(EngineConfig(model_path=model_dir, max_total_token_num=tokens, disable_dynamic_prompt_cache=True,
                               batch_max_tokens=batch_max_tokens, chunked_prefill_size=batch_max_tokens,
                               running_max_req_size=64, data_type=data_type, grammar_backend="none",
                               quant_type=quant_type,
                               router_max_new_token_len=1))


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


def bench_decode(engine: Engine, batch: int, context: int, steps: int, rng: random.Random) -> float:
    for i in range(batch):
        engine.add_request(AddRequest(f"d{batch}-{context}-{i}", random_prompt(rng, context, engine.model_config.vocab_size),
                                      SamplingParams(max_new_tokens=steps + 8, temperature=0.0, ignore_eos=True)))
    while any(s.num_pending > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill everything first (not timed)
    engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for seq in list(engine.scheduler.running):
        engine.scheduler.abort(seq.rid)
    return statistics.median(times)


def bench_prefill(engine: Engine, length: int, repeats: int, rng: random.Random) -> float:
    times = []
    for r in range(repeats):
        engine.add_request(AddRequest(f"p{r}", random_prompt(rng, length, engine.model_config.vocab_size),
                                      SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)))
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default=None)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--context", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--data_type", default="auto")
    p.add_argument("--quant_type", default="none")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    if args.model_dir is None:
        from lightllm.models.loading.catalog import smollm2_path

        args.model_dir = str(smollm2_path())
    torch.set_num_threads(torch.get_num_threads())
    rng = random.Random(0)
    need = max(args.batch) * (max(args.context) + args.steps + 16) + args.prefill * 4
    engine = build_engine(args.model_dir, need, max(args.prefill, 2048), args.data_type, args.quant_type)
    results = {"model": args.model_dir, "quant_type": args.quant_type, "threads": torch.get_num_threads(), "decode": [], "prefill": None}
    print(f"model {args.model_dir} threads={torch.get_num_threads()} dtype={engine.dtype} quant={args.quant_type}")
    for context in args.context:
        for batch in args.batch:
            step = bench_decode(engine, batch, context, args.steps, rng)
            results["decode"].append({"batch": batch, "context": context, "step_ms": step * 1000,
                                      "tokens_per_s": batch / step})
            print(f"decode batch={batch:>3} context={context:>5}: {step * 1000:8.1f} ms/step  {batch / step:8.1f} tok/s")
    prefill = bench_prefill(engine, args.prefill, 3, rng)
    results["prefill"] = {"tokens": args.prefill, "ms": prefill * 1000, "tokens_per_s": args.prefill / prefill}
    print(f"prefill {args.prefill} tokens: {prefill * 1000:8.1f} ms  {args.prefill / prefill:8.1f} tok/s")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
