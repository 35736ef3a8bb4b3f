#!/usr/bin/env python3
"""Per-token and per-step overheads that must not grow with the work (no model needed).

stream: the API process's CPU time per streamed token of one chat stream with tools on (qwen25 parser),
  at token 100 and at token 8,000. Synthetic token deltas run through what the chat route does per
  token: generate_text (incremental detokenization, stop strings) → ChatStreamParser → SSE encoding.
  Two shapes: a long answer in plain text, and a short answer followed by one tool call whose
  arguments are written over 8,000+ tokens (a file, say).
scheduler: the CPU time of one scheduler step (schedule + process_results, no model) with 32 running
  requests drawing on a prefix cache that holds 100 or 10,000 cached prefixes, with the pool full enough
  that admission checks the evictable size and eviction runs.

  python benchmarks/hot_paths.py                 # both, JSON lines on stdout
  PYTHONPATH=/tmp/old python benchmarks/hot_paths.py   # the same against another checkout
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import torch

import lightllm
from lightllm.engine.kv_cache import ReqToTokenTable, TokenKVPool
from lightllm.engine.prefix_cache import PrefixCache
from lightllm.engine.protocol import SamplingParams, TokenOutput
from lightllm.engine.scheduler import SampledToken, Scheduler
from lightllm.engine.sequence import Sequence
from lightllm.server.function_call.context import ToolContext
from lightllm.server.function_call.registry import detector_class
from lightllm.server.generation import generate_text
from lightllm.server.openai.chat_output import ChatOutputParser
from lightllm.server.openai.common import sse

# ---------------------------------------------------------------------------------------------- stream

PROSE = ["The", " answer", " depends", " on", " the", " input", ",", " so", " we", " check", " it", " first", ".", "\n"]
CODE = ["def", " f", "(x", "):", "\\n", "    ", "return", " x", " +", " 1", "\\n", "\\\"", "ok", "\\\"", " {", "}"]
CALL_HEAD = ['<tool_call>', '\n', '{"name": ', '"write_file"', ', "arguments": ', '{"path": ', '"a.py"',
             ', "content": "']
CALL_TAIL = ['"}}', '\n', '</tool_call>']


class FakeTokenizer:
    """Token id → its text; decoding joins them (what the incremental detokenizer needs)."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids)


@dataclass
class FakeEngine:
    token_ids: list[int]

    async def generate(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenOutput]:
        last = len(self.token_ids) - 1
        for i, token_id in enumerate(self.token_ids):
            yield TokenOutput(rid, token_id, finished=i == last, finish_reason="length" if i == last else None,
                              prompt_tokens=len(prompt_ids))


def stream_tokens(shape: str, n: int) -> tuple[FakeTokenizer, list[int]]:
    rng = random.Random(0)
    vocab = PROSE + CODE + CALL_HEAD + CALL_TAIL
    index = {piece: i for i, piece in enumerate(vocab)}
    if shape == "answer":
        body = [index[rng.choice(PROSE)] for _ in range(n)]
    else:  # a few words, then one call whose arguments keep growing
        body = [index[p] for p in PROSE[:8]] + [index[p] for p in CALL_HEAD]
        body += [index[rng.choice(CODE)] for _ in range(n - len(body) - len(CALL_TAIL))]
        body += [index[p] for p in CALL_TAIL]
    return FakeTokenizer(vocab), body


async def time_stream(shape: str, n: int) -> list[float]:
    """CPU seconds spent between consecutive tokens of one stream, everything the API does per token."""
    tokenizer, token_ids = stream_tokens(shape, n)
    tools = [{"type": "function", "function": {"name": "write_file", "parameters": {"type": "object"}}}]
    context = ToolContext(mode="auto", tools=tools, fmt="qwen25", template_has_tools=True,
                          detector=detector_class("qwen25")({"write_file"}, {"write_file": {"type": "object"}}))
    parser = ChatOutputParser(None, context).stream()
    params = SamplingParams(max_new_tokens=n)
    costs: list[float] = []
    events = 0
    last = time.process_time()
    async for chunk in generate_text(FakeEngine(token_ids), tokenizer, [1, 2, 3], params, stop=["</answer>"]):
        for delta in parser.on_chunk(chunk):
            events += len(sse({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
        now = time.process_time()
        costs.append(now - last)
        last = now
    assert events > 0
    return costs


def bench_stream(shape: str, repeats: int, at: tuple[int, int], window: int) -> dict[str, Any]:
    per_run: dict[int, list[float]] = {k: [] for k in at}
    for _ in range(repeats):
        gc.collect()
        costs = asyncio.run(time_stream(shape, max(at) + window + 10))
        for k in at:
            per_run[k].append(sum(costs[k:k + window]) / window)
    us = {k: statistics.median(v) * 1e6 for k, v in per_run.items()}
    small, large = at
    return {"bench": "stream", "shape": shape, f"us_per_token_at_{small}": round(us[small], 2),
            f"us_per_token_at_{large}": round(us[large], 2), "ratio": round(us[large] / us[small], 3)}


# ---------------------------------------------------------------------------------------------- scheduler

PREFIX_LEN = 16


def build_scheduler(cached_prefixes: int, running: int, rng: random.Random) -> tuple[Scheduler, list[list[int]]]:
    pool_tokens = cached_prefixes * PREFIX_LEN + running * 64
    pool = TokenKVPool(pool_tokens, num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float32,
                       device=torch.device("cpu"))
    cache = PrefixCache(pool)
    prefixes = []
    for i in range(cached_prefixes):  # distinct first tokens: one leaf per prefix under the root
        ids = [1000 + i] + [rng.randrange(1, 1000) for _ in range(PREFIX_LEN - 1)]
        cache.acquire(f"warm{i}", ids)
        pool.free(cache.release(f"warm{i}", ids, pool.alloc(PREFIX_LEN), insert=True))
        prefixes.append(ids)
    table = ReqToTokenTable(running * 2, 256, torch.device("cpu"))
    scheduler = Scheduler(pool, table, batch_max_tokens=512, chunked_prefill_size=512, chunked_prefill=True,
                          running_max_req_size=running, max_model_len=256, eos_token_ids=[0],
                          new_token_estimate=8, prefix_cache=cache)
    return scheduler, prefixes


def bench_scheduler(cached_prefixes: int, steps: int, running: int = 32) -> dict[str, Any]:
    rng = random.Random(1)
    scheduler, prefixes = build_scheduler(cached_prefixes, running, rng)
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    count = 0

    def add_request() -> None:
        nonlocal count
        count += 1
        prompt = rng.choice(prefixes) + [rng.randrange(1, 1000) for _ in range(8)]
        scheduler.add(Sequence(f"r{count}", prompt, params))

    evicted = 0
    evict = scheduler.prefix_cache.evict

    def counting_evict(num_tokens: int) -> int:
        nonlocal evicted
        freed = evict(num_tokens)
        evicted += freed
        return freed

    scheduler.prefix_cache.evict = counting_evict
    for _ in range(running + 8):
        add_request()
    costs = []
    for step in range(steps):
        start = time.process_time()
        plan = scheduler.schedule()
        sampled = {c.seq.rid: SampledToken(rng.randrange(1, 1000)) for c in plan if c.samples}
        outputs = scheduler.process_results(plan, sampled)
        costs.append(time.process_time() - start)
        for out in outputs:
            if out.finished:
                add_request()  # keep the load steady: a new request for each one that ends
    warm = costs[steps // 5:]  # admission of the first wave is not the steady state
    return {"bench": "scheduler", "cached_prefixes": cached_prefixes, "running": running,
            "us_per_step_median": round(statistics.median(warm) * 1e6, 1),
            "us_per_step_mean": round(statistics.fmean(warm) * 1e6, 1),
            "requests_done": count - running - 8, "evicted_tokens": evicted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--only", choices=["stream", "scheduler"])
    args = ap.parse_args()
    print(json.dumps({"lightllm": lightllm.__file__}))
    if args.only in (None, "stream"):
        for shape in ("answer", "call"):
            print(json.dumps(bench_stream(shape, args.repeats, (100, 8000), 100)), flush=True)
    if args.only in (None, "scheduler"):
        small = bench_scheduler(100, args.steps)
        large = bench_scheduler(10_000, args.steps)
        print(json.dumps(small), flush=True)
        print(json.dumps(large | {"ratio_to_100": round(large["us_per_step_median"] / small["us_per_step_median"], 3)}),
              flush=True)


if __name__ == "__main__":
    main()
