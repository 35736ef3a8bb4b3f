#!/usr/bin/env python3
"""Data-parallel lightllm replicas behind sglang-router: a shared-prefix workload routed by `cache_aware`
and by `round_robin`, reporting the prefix-cache hit rate (summed from each replica's /metrics), where each
prefix's requests landed, and TTFT of streamed requests.

Starts N replicas of a model (default: 2 of the embedded SmolLM2) and, for each policy, one router, all on
loopback. Each policy run draws its own prefixes, so both start cold on the same replicas. Workload: P
distinct prefixes of ~T tokens, R requests each with a short distinct question after the prefix, in a
seeded shuffled order, as streamed `/v1/completions`, C at a time. Afterwards each replica is asked directly
which prefixes its prefix cache holds.

    .venv/bin/python benchmarks/router_prefix.py [--replicas 2 --prefixes 4 --per-prefix 6 --prefix-words 580]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the tests' process helpers live in the repository
    sys.path.insert(0, str(REPO))

from tests.conftest import LoopbackProcess, ServerProcess, free_port  # noqa: E402
POLICIES = ("cache_aware", "round_robin")
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river mountain ocean city garden music science history "
         "language computer story question answer system program market energy water light animal plant").split()


def router_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("sglang_router") is not None


class Router(LoopbackProcess):
    """`python -m sglang_router.launch_router` on loopback in front of `worker_urls`, until `stop()`."""

    def __init__(self, worker_urls: list[str], policy: str, log_path: Path, api_key: str | None = None,
                 timeout: float = 120.0):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.worker_urls = worker_urls
        # the router also serves Prometheus metrics on its own port (29000 by default): pick a free one
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
               "--policy", policy, "--host", "127.0.0.1", "--port", str(self.port),
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), "--log-level", "warn"]
        if api_key:
            cmd += ["--api-key", api_key]
        super().__init__(cmd, log_path, timeout, what="router")

    def _ready(self) -> bool:
        """Every worker registered and healthy."""
        try:
            workers = requests.get(self.base_url + "/workers", headers=self.headers, timeout=1).json()["workers"]
        except (requests.RequestException, ValueError, KeyError):
            return False
        return len(workers) == len(self.worker_urls) and all(w["is_healthy"] for w in workers)


def scrape(base_url: str) -> dict[str, float]:
    """The replica's `lightllm_*` gauges from /metrics."""
    out = {}
    for line in requests.get(base_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("lightllm_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def make_workload(prefixes: int, per_prefix: int, prefix_words: int, seed: int) -> list[tuple[int, str]]:
    """(prefix index, prompt) pairs in a seeded shuffled order; every prompt distinct."""
    rng = random.Random(seed)
    texts = [f"Reference notes {seed}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(prefix_words))
             for i in range(prefixes)]
    work = [(i, f"{texts[i]}\nQuestion {j}: which word about {rng.choice(WORDS)} comes first?\nAnswer:")
            for i in range(prefixes) for j in range(per_prefix)]
    rng.shuffle(work)
    return work


@dataclass
class Result:
    prefix: int
    ttft: float
    prompt_tokens: int
    cached_tokens: int


def stream_completion(base_url: str, prompt: str, max_tokens: int, headers: dict) -> tuple[float, int, int]:
    """Streamed /v1/completions: (TTFT, prompt tokens, cached prompt tokens from the usage chunk)."""
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, usage = None, None
    with requests.post(base_url + "/v1/completions", json=body, headers=headers, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if ttft is None and chunk.get("choices"):  # the first token's chunk
                ttft = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    if ttft is None or usage is None:
        raise RuntimeError(f"stream without tokens or usage: ttft={ttft} usage={usage}")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return ttft, usage["prompt_tokens"], cached


@dataclass
class PolicyRun:
    policy: str
    results: list[Result] = field(default_factory=list)
    replica_delta: list[dict[str, float]] = field(default_factory=list)
    holders: dict[int, list[int]] = field(default_factory=dict)  # prefix -> replicas whose cache holds it
    wall_s: float = 0.0

    def hit_rate(self) -> float:
        prompt = sum(d["lightllm_prompt_tokens_total"] for d in self.replica_delta)
        hits = sum(d["lightllm_prefix_cache_hit_tokens_total"] for d in self.replica_delta)
        return hits / prompt if prompt else 0.0

    def ttft(self, q: float) -> float:
        values = sorted(r.ttft for r in self.results)
        return values[min(len(values) - 1, int(q * len(values)))]

    def summary(self) -> dict:
        ttfts = [r.ttft for r in self.results]
        return {"policy": self.policy, "requests": len(self.results), "hit_rate": round(self.hit_rate(), 4),
                "hit_tokens": int(sum(d["lightllm_prefix_cache_hit_tokens_total"] for d in self.replica_delta)),
                "prompt_tokens": int(sum(d["lightllm_prompt_tokens_total"] for d in self.replica_delta)),
                "requests_per_replica": [int(d["lightllm_requests_total"]) for d in self.replica_delta],
                "hit_rate_per_replica": [round(d["lightllm_prefix_cache_hit_tokens_total"] /
                                               d["lightllm_prompt_tokens_total"], 4)
                                         if d["lightllm_prompt_tokens_total"] else 0.0 for d in self.replica_delta],
                "prefix_on_replicas": {str(k): v for k, v in self.holders.items()},
                "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
                "ttft_mean_ms": round(1000 * statistics.fmean(ttfts), 1),
                "ttft_p90_ms": round(1000 * self.ttft(0.9), 1), "wall_s": round(self.wall_s, 2)}


def run_policy(router: Router, policy: str, replica_urls: list[str], workload: list[tuple[int, str]],
               max_tokens: int = 4, concurrency: int = 4) -> PolicyRun:
    """Send `workload` through `router`, `concurrency` at a time; the replicas' /metrics before and after
    give the hit counts. Then ask each replica directly whether its prefix cache holds each prefix (one
    1-token request per prefix and replica: cached tokens >= 90% of the prefix), which shows where each
    prefix's requests went."""
    run = PolicyRun(policy)
    before = [scrape(u) for u in replica_urls]
    start = time.perf_counter()

    def one(item: tuple[int, str]) -> Result:
        return Result(item[0], *stream_completion(router.base_url, item[1], max_tokens, router.headers))

    with ThreadPoolExecutor(concurrency) as pool:
        run.results = list(pool.map(one, workload))
    run.wall_s = time.perf_counter() - start
    after = [scrape(u) for u in replica_urls]
    run.replica_delta = [{k: a[k] - b.get(k, 0.0) for k in a} for a, b in zip(after, before)]
    prefixes = {}
    for prefix, prompt in workload:  # the prompt up to its question is the prefix
        prefixes[prefix] = prompt[:prompt.index("\nQuestion")]
    for prefix, text in sorted(prefixes.items()):
        run.holders[prefix] = []
        for i, url in enumerate(replica_urls):
            _, prompt_tokens, cached = stream_completion(url, text + "\nProbe:", 1, router.headers)
            if cached >= 0.9 * prompt_tokens - 8:
                run.holders[prefix].append(i)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", default="smollm2")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--prefixes", type=int, default=4)
    p.add_argument("--per-prefix", type=int, default=6)
    p.add_argument("--prefix-words", type=int, default=580, help="about a token a word on SmolLM2's tokenizer")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", nargs="+", default=list(POLICIES))
    p.add_argument("--server-args", default="--max_total_token_num 20000", help="extra flags for each replica")
    p.add_argument("--threads-per-replica", type=int, default=None,
                   help="LIGHTLLM_ENGINE_THREADS of each replica (default: this machine's cores / replicas)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    if not router_installed():
        sys.exit("sglang-router is not installed: pip install sglang-router")

    threads = args.threads_per_replica or max(1, (os.cpu_count() or 1) // args.replicas)
    log_dir = Path(tempfile.mkdtemp(prefix="router-prefix-"))
    replicas = []
    try:
        for i in range(args.replicas):
            replicas.append(ServerProcess(["--model_dir", args.model_dir, *args.server_args.split()],
                                          log_dir / f"replica{i}.log", timeout=600,
                                          env={"LIGHTLLM_ENGINE_THREADS": str(threads)}))
        urls = [r.base_url for r in replicas]
        for url in urls:  # one-off start-up costs (first forward) outside the measurement
            stream_completion(url, "Warm-up: " + " ".join(WORDS[:40]), 2, {})
        runs = []
        for k, policy in enumerate(args.policies):
            router = Router(urls, policy, log_dir / f"router-{policy}.log")
            try:
                work = make_workload(args.prefixes, args.per_prefix, args.prefix_words, args.seed + 1000 * (k + 1))
                runs.append(run_policy(router, policy, urls, work, args.max_tokens, args.concurrency))
            finally:
                router.stop()
        mean_prompt = statistics.fmean(r.prompt_tokens for r in runs[0].results)
        print(f"{args.replicas} replicas of {args.model_dir} ({threads} threads each); {args.prefixes} prefixes x {args.per_prefix} requests "
              f"(prompt ~{mean_prompt:.0f} tokens), {args.max_tokens} output tokens, concurrency {args.concurrency}")
        print(f"{'policy':<12} {'hit rate':>8} {'hit/prompt tokens':>18} {'requests/replica':>17} "
              f"{'TTFT p50':>9} {'mean':>7} {'p90':>7}  prefix -> replicas caching it")
        for run in runs:
            s = run.summary()
            print(f"{s['policy']:<12} {s['hit_rate']:>8.1%} {s['hit_tokens']:>8}/{s['prompt_tokens']:<9} "
                  f"{str(s['requests_per_replica']):>17} {s['ttft_p50_ms']:>7.0f}ms {s['ttft_mean_ms']:>5.0f}ms "
                  f"{s['ttft_p90_ms']:>5.0f}ms  {s['prefix_on_replicas']}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps([r.summary() for r in runs], indent=1))
    finally:
        for r in replicas:
            r.stop()


if __name__ == "__main__":
    main()
