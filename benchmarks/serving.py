#!/usr/bin/env python3
"""Serving benchmark for any OpenAI-compatible server (in the spirit of vLLM's benchmark_serving).

Streams chat completions with deterministic synthetic prompts at a fixed concurrency (or Poisson request
rate) and reports request/s, output tok/s, TTFT, TPOT, ITL and end-to-end latency (mean, p50, p99).

  python benchmarks/serving.py --base-url http://127.0.0.1:8088 --concurrency 1 4 16 --num-prompts 32
  python benchmarks/serving.py --shared-prefix-len 2000 --num-prompts 32 --concurrency 32   # prefix cache
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river mountain ocean city garden music science history "
         "language computer story question answer system program market energy water light animal plant").split()


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2el: float = 0.0
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)
    error: str = ""


def make_prompts(n: int, input_words: int, seed: int, shared_prefix_words: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    prefix = ""
    if shared_prefix_words:
        prefix_rng = random.Random(seed + 1)
        prefix = "Reference notes: " + " ".join(prefix_rng.choice(WORDS) for _ in range(shared_prefix_words))
    prompts = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(input_words))
        messages = [{"role": "user", "content": f"Request {i}. Write a long story using these words: {body}"}]
        if prefix:
            messages.insert(0, {"role": "system", "content": prefix})
        prompts.append(messages)
    return prompts


async def one_request(client: httpx.AsyncClient, url: str, model: str, messages: list[dict], max_tokens: int,
                      ignore_eos: bool, headers: dict) -> RequestResult:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    start = time.perf_counter()
    last = start
    result = RequestResult(ok=False)
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                choices = chunk.get("choices") or []
                if not choices or not choices[0].get("delta", {}).get("content"):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
                chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = repr(exc)
        return result
    result.e2el = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    result.ok = chunks > 0
    return result


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "p50": ordered[len(ordered) // 2],
            "p99": ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]}


async def run_level(args, prompts: list[list[dict]], concurrency: int, model: str) -> dict:
    url = args.base_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        # warm-up: one short request, not measured (its own text, so it primes no prefix of the workload)
        await one_request(client, url, model, [{"role": "user", "content": "Warm-up: say OK."}], 4, False, headers)
        semaphore = asyncio.Semaphore(concurrency)
        rng = random.Random(args.seed)

        async def guarded(messages):
            async with semaphore:
                return await one_request(client, url, model, messages, args.output_len, args.ignore_eos, headers)

        start = time.perf_counter()
        tasks = []
        for messages in prompts:
            tasks.append(asyncio.create_task(guarded(messages)))
            if args.request_rate > 0:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "concurrency": concurrency, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3], "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_output_tokens": out_tokens,
        "ttft_ms": {k: v * 1000 for k, v in percentiles([r.ttft for r in ok]).items()},
        "tpot_ms": {k: v * 1000 for k, v in percentiles(tpots).items()},
        "itl_ms": {k: v * 1000 for k, v in percentiles([x for r in ok for x in r.itls]).items()},
        "e2el_ms": {k: v * 1000 for k, v in percentiles([r.e2el for r in ok]).items()},
    }


def print_table(label: str, rows: list[dict]) -> None:
    print(f"\n== {label}")
    print(f"{'conc':>5} {'ok':>4} {'fail':>4} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'ITL p50':>8} {'ITL p99':>8} {'E2E p50':>8}")
    for r in rows:
        print(f"{r['concurrency']:>5} {r['completed']:>4} {r['failed']:>4} {r['request_throughput']:>7.2f} "
              f"{r['output_throughput']:>10.1f} {r['ttft_ms']['p50']:>9.0f} {r['ttft_ms']['p99']:>9.0f} "
              f"{r['tpot_ms']['p50']:>9.1f} {r['itl_ms']['p50']:>8.1f} {r['itl_ms']['p99']:>8.1f} "
              f"{r['e2el_ms']['p50']:>8.0f}")
        if r["errors"]:
            print("      errors:", r["errors"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8088")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--num-prompts", type=int, default=None, help="default: 2 x concurrency (at least 8)")
    p.add_argument("--input-len", type=int, default=180, help="words of random text per prompt (~1.2 tokens each)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--shared-prefix-len", type=int, default=0, help="words of a system prompt shared by all requests")
    p.add_argument("--request-rate", type=float, default=0.0, help="Poisson arrivals per second (0: all at once)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --output-len tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--label", default="server")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    model = args.model
    if model is None:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    rows = []
    for concurrency in args.concurrency:
        n = args.num_prompts or max(8, 2 * concurrency)
        # Fresh prompts per level, so one level's prefix-cache entries do not flatter the next one.
        prompts = make_prompts(n, args.input_len, args.seed + 1000 * concurrency, args.shared_prefix_len)
        rows.append(asyncio.run(run_level(args, prompts, concurrency, model)))
        print_table(args.label, rows[-1:])
        sys.stdout.flush()
    print_table(args.label, rows)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"label": args.label, "base_url": args.base_url, "model": model, "args": vars(args),
                       "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
