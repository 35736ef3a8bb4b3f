#!/usr/bin/env python3
"""Constrained decoding cost, engine only (no HTTP), in CPU time of this process (`time.process_time`: on a
shared box wall time mostly measures the neighbours; `--threads 1` by default so it is not inflated by idle
threads spinning):

1. per-token step time with every stream constrained vs none, at 1 and 16 streams (grammar: GBNF words, and a
   regex), greedy decode after prefill;
2. decode step time of 4 unconstrained streams while a slow JSON schema (string patterns) compiles on the
   grammar thread, against the same streams' step time before.

  python benchmarks/structured.py                      # embedded SmolLM2
  python benchmarks/structured.py --model_dir X.gguf --steps 48
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from lightllm.engine.engine import Engine
from lightllm.engine.protocol import AddRequest, EngineConfig, GrammarSpec, SamplingParams
from lightllm.models.loading.catalog import smollm2_path

GRAMMARS = {
    # never ending (the streams must decode every timed step): a GBNF word list, a regex of 300+ words
    "gbnf": GrammarSpec("grammar", text='root ::= [a-z]+ " " root'),
    "regex": GrammarSpec("regex", text=r"([a-z]+, ){300,}"),
}


def slow_schema(n: int) -> dict:
    props = {f"f{i}": {"type": "string", "pattern": f"[a-z]{{{i % 7 + 1},{i % 7 + 9}}}[0-9]{{2}}-x{i}"}
             for i in range(n)}
    return {"type": "object", "properties": props, "required": list(props)}


def settle(engine: Engine) -> None:
    """Wait for pending compilations and prefill every request (not timed)."""
    while engine.compiling:
        engine.admit_compiled()
        time.sleep(0.005)
    while any(s.num_pending > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    engine.step()


def decode_times(engine: Engine, batch: int, grammar: GrammarSpec | None, steps: int, tag: str) -> list[float]:
    rng = random.Random(batch)
    vocab = engine.model_config.vocab_size
    for i in range(batch):
        prompt = [rng.randrange(100, vocab - 100) for _ in range(64)]
        engine.add_request(AddRequest(f"{tag}-{i}", prompt, SamplingParams(max_new_tokens=steps + 16, temperature=0.0,
                                                                           ignore_eos=True, grammar=grammar)))
    settle(engine)
    times = []
    for _ in range(steps):
        start = time.process_time()
        engine.step()
        times.append(time.process_time() - start)
    assert len(engine.scheduler.running) == batch, "a stream ended early: the timing would mix batch sizes"
    for seq in list(engine.scheduler.running):
        engine.scheduler.abort(seq.rid)
    return times


def compile_stall(engine: Engine, properties: int, steps_before: int) -> dict:
    before = decode_times_keep(engine, 4, steps_before)
    spec = GrammarSpec.json_schema(slow_schema(properties))
    sent = time.perf_counter()
    engine.add_request(AddRequest("slow-schema", [5, 6, 7], SamplingParams(max_new_tokens=4, grammar=spec)))
    during = []  # wall time here: the compile thread's CPU would count in this process's CPU time
    while engine.compiling:
        start = time.perf_counter()
        engine.admit_compiled()
        engine.step()
        during.append(time.perf_counter() - start)
    compile_s = time.perf_counter() - sent
    for seq in list(engine.scheduler.running):
        engine.scheduler.abort(seq.rid)
    return {"properties": properties, "compile_s": round(compile_s, 2), "steps_during_compile": len(during),
            "wall_step_ms_before": round(1e3 * statistics.median(before), 2),
            "wall_step_ms_during_median": round(1e3 * statistics.median(during), 2),
            "wall_step_ms_during_max": round(1e3 * max(during), 2)}


def decode_times_keep(engine: Engine, batch: int, steps: int) -> list[float]:
    """Like decode_times (unconstrained) but leaves the streams running."""
    rng = random.Random(99)
    vocab = engine.model_config.vocab_size
    for i in range(batch):
        prompt = [rng.randrange(100, vocab - 100) for _ in range(64)]
        engine.add_request(AddRequest(f"keep-{i}", prompt, SamplingParams(max_new_tokens=1000,
                                                                          temperature=0.0, ignore_eos=True)))
    settle(engine)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times  # wall time, as the steps during compilation are measured


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", default=str(smollm2_path()))
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--schema_properties", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(EngineConfig(model_path=args.model_dir, max_total_token_num=8192, disable_dynamic_prompt_cache=True,
                                 running_max_req_size=64, spec_ngram_tokens=0))
    engine.grammars.wait()
    rows = []
    def step_time(batch: int, spec: GrammarSpec | None, tag: str) -> float:
        """The best of `repeats` medians (a shared box: the least disturbed run)."""
        return min(statistics.median(decode_times(engine, batch, spec, args.steps, f"{tag}{batch}-{r}"))
                   for r in range(args.repeats))

    for batch in args.batch:
        base = step_time(batch, None, "plain")
        row = {"streams": batch, "cpu_plain_ms_per_step": round(1e3 * base, 2)}
        for name, spec in GRAMMARS.items():
            t = step_time(batch, spec, name)
            row[f"{name}_ms_per_step"] = round(1e3 * t, 2)
            row[f"{name}_extra_ms_per_token"] = round(1e3 * (t - base) / batch, 3)
        rows.append(row)
        print("\n" + json.dumps(row), flush=True)
    print("\n" + json.dumps(compile_stall(engine, args.schema_properties, args.steps)), flush=True)


if __name__ == "__main__":
    main()
