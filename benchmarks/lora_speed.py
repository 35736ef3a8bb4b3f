"""LoRA serving cost (issue 26): 16 streams spread over 8 adapters vs the same 16 streams on the base model,
same prompts (in process, no HTTP). Engines alike (the base model's streams, and the adapters' streams once per
--lora-dtypes storage), stepped in turn (one step of each, so the load of a shared machine falls on all alike);
prints output tokens/s of each, each LoRA engine's ratio to the base per round, and the time the adapters'
low-rank products took in the prefill step and per decode step (models/lora/batch.py).

    python benchmarks/lora_speed.py [--model smollm2] [--rank 16] [--adapters 8] [--streams 16] [--rounds 3]
                                    [--lora-dtypes float32,bfloat16]

The adapters are random (PEFT's folder format, written here for the model's shapes): speed does not depend on
their values. By default they target all seven projections (q/k/v/o/gate/up/down), the most work an adapter
can add; --targets q_proj,v_proj is PEFT's default for Llama models.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightllm.engine.engine import Engine
from lightllm.engine.protocol import AddRequest, EngineConfig, SamplingParams
from lightllm.models.lora import batch as lora_batch
from lightllm.models.lora.adapter import part_shapes


def write_adapter(folder: Path, config, rank: int, seed: int, targets: list[str]) -> Path:
    """A PEFT LoRA folder for the `targets` projections of `config`'s layers."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for module, (fan_in, fan_out) in part_shapes(config).items():
            if module not in targets:
                continue
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.02
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets,
        "bias": "none"}))
    return folder


def add_requests(engine: Engine, prompts: list[list[int]], loras: list[str | None], new_tokens: int) -> None:
    for i, (prompt, lora) in enumerate(zip(prompts, loras)):
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True, lora=lora)
        assert engine.add_request(AddRequest(f"r{time.monotonic_ns()}-{i}", prompt, params)) is None


def run_paired(engines: dict[str, Engine]) -> dict[str, dict]:
    """Step the engines in turn until all are idle, timing each engine's steps (a step of one, then a step of
    the other: the machine's load, which changes by the second on a shared box, falls on both alike)."""
    stats = {kind: {"steps": 0, "tokens": 0, "wall_s": 0.0, "lora_s": 0.0, "prefill_s": 0.0, "prefill_lora_s": 0.0}
             for kind in engines}
    while any(e.scheduler.has_work() for e in engines.values()):
        for kind, engine in engines.items():
            if not engine.scheduler.has_work():
                continue
            lora_batch.spent = 0.0
            t0 = time.perf_counter()
            outputs = engine.step()
            elapsed = time.perf_counter() - t0
            st = stats[kind]
            st["steps"] += 1
            st["wall_s"] += elapsed
            st["lora_s"] += lora_batch.spent
            if st["steps"] == 1:  # the prompts' prefill (all of them fit one step)
                st["prefill_s"], st["prefill_lora_s"] = elapsed, lora_batch.spent
            st["tokens"] += sum(1 for out in outputs if out.token_id is not None)
    for st in stats.values():
        decode_steps = max(st["steps"] - 1, 1)
        st.update(tok_s=st["tokens"] / st["wall_s"], prefill_step_ms=1000 * st["prefill_s"],
                  prefill_lora_ms=1000 * st["prefill_lora_s"],
                  decode_step_ms=1000 * (st["wall_s"] - st["prefill_s"]) / decode_steps,
                  decode_lora_ms=1000 * (st["lora_s"] - st["prefill_lora_s"]) / decode_steps)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                    help="the adapters' target modules (PEFT's default for Llama is q_proj,v_proj)")
    ap.add_argument("--lora-dtypes", default="float32",
                    help="comma-separated --lora_dtype values: one LoRA engine each, stepped beside the base")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lightllm.engine.model_setup import model_config_for
    from lightllm.models.loading.catalog import resolve_model

    model_path = resolve_model(args.model)
    config = model_config_for(EngineConfig(model_path=model_path))
    # time spent in the adapters' products, summed over a round
    original = lora_batch.LoraBatch.add_

    def timed_add(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return original(self, *a, **kw)
        finally:
            lora_batch.spent += time.perf_counter() - t0

    lora_batch.LoraBatch.add_ = timed_add
    targets = args.targets.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"lora{i}" for i in range(args.adapters)]
        modules = [f"{name}={write_adapter(Path(tmp) / name, config, args.rank, i, targets)}"
                   for i, name in enumerate(names)]
        # engines alike (all hold the adapters): one serves the streams on the base model, the others on the
        # adapters, stored as each --lora-dtypes value
        dtypes = args.lora_dtypes.split(",")
        kinds = {"base": "auto", **{f"lora-{d}": d for d in dtypes}}
        engines = {kind: Engine(EngineConfig(model_path=model_path, lora_modules=modules, max_loras=args.adapters,
                                             max_lora_rank=args.rank, max_total_token_num=16384, lora_dtype=dtype,
                                             running_max_req_size=max(args.streams, 16)))
                   for kind, dtype in kinds.items()}
        rng = random.Random(0)
        results: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for r in range(args.rounds + 1):  # round 0 warms up (kernels, allocator) and is not counted
            prompts = [[rng.randrange(100, config.vocab_size - 100) for _ in range(args.prompt_len)]
                       for _ in range(args.streams)]
            add_requests(engines["base"], prompts, [None] * args.streams, args.new_tokens)
            for kind in kinds:
                if kind != "base":
                    add_requests(engines[kind], prompts, [names[i % len(names)] for i in range(args.streams)],
                                 args.new_tokens)
            stats = run_paired(engines)
            if not r:
                continue
            for kind, result in stats.items():
                results[kind].append(result)
                print(f"round {r} {kind}: {result['tok_s']:.1f} tok/s, {result['steps']} steps; prefill step "
                      f"{result['prefill_step_ms']:.0f} ms (adapter products {result['prefill_lora_ms']:.0f}); "
                      f"decode step {result['decode_step_ms']:.1f} ms (adapter products "
                      f"{result['decode_lora_ms']:.1f})", flush=True)
    summary = {kind: {key: round(sum(x[key] for x in runs) / len(runs), 2) for key in
                      ("tok_s", "prefill_step_ms", "prefill_lora_ms", "decode_step_ms", "decode_lora_ms")}
               for kind, runs in results.items()}
    ratios = {kind: [lo["tok_s"] / ba["tok_s"] for lo, ba in zip(runs, results["base"])]
              for kind, runs in results.items() if kind != "base"}
    print(json.dumps({"model": args.model, "rank": args.rank, "targets": targets, "threads": args.threads,
                      "adapters": args.adapters, "streams": args.streams, "mean": summary,
                      "ratio_per_round": {kind: [round(x, 3) for x in r] for kind, r in ratios.items()},
                      "ratio_mean": {kind: round(sum(r) / len(r), 3) for kind, r in ratios.items()}}, indent=1))


if __name__ == "__main__":
    main()
