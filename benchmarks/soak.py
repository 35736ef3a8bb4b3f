#!/usr/bin/env python3
"""Soak test: mixed traffic against a real server for a fixed time, then the invariants a long-running
server must keep.

Traffic (32 workers by default, each picking a scenario at random): plain and streamed chat, tools with
`tool_choice` auto and required, `response_format` json_schema, n=2, streams dropped by the client after a
few chunks, and over-long prompts (which must get 400). At the end:
- no 5xx answers and no error events in streams;
- no KV tokens held by requests once the traffic stops (`/token_load`);
- the API and engine processes' RSS after warm-up stays within 10% of its value at the end of warm-up.

    .venv/bin/python benchmarks/soak.py --duration 900            # starts its own SmolLM2 server
    .venv/bin/python benchmarks/soak.py --base-url http://127.0.0.1:8088 --server-pid PID
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["What's the weather in Paris?", "Compute 17 * 23.", "Tell me about lighthouses.", "北京今天天气怎么样？",
             "Write a haiku about the sea.", "Find a flight from Berlin to Rome.", "What is 2 to the power of 10?"]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                          "required": ["city"], "additionalProperties": False}}}
CALC = {"type": "function", "function": {"name": "calculate", "description": "Evaluate an expression",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 40}},
                       "required": ["expression"], "additionalProperties": False}}}
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
               "additionalProperties": False}


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def engine_pid_of(server_pid: int) -> int | None:
    out = subprocess.run(["pgrep", "-P", str(server_pid)], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
        except OSError:
            continue
    return None


class Soak:
    def __init__(self, base_url: str, max_model_len: int, seed: int):
        self.base = base_url
        self.max_model_len = max_model_len
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []

    def body(self, kind: str) -> dict:
        q = self.rng.choice(QUESTIONS)
        body: dict = {"messages": [{"role": "user", "content": q}], "max_tokens": self.rng.randint(8, 64),
                      "temperature": self.rng.choice([0, 0.7, 1.0])}
        if kind in ("tools_auto", "tools_required"):
            body.update(tools=[WEATHER, CALC], tool_choice="auto" if kind == "tools_auto" else "required",
                        max_tokens=120)
        elif kind == "json_schema":
            body.update(response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": CITY_SCHEMA}},
                        max_tokens=60)
        elif kind == "n2":
            body["n"] = 2
        elif kind == "too_long":
            body["messages"][0]["content"] = "word " * (self.max_model_len + 10)
        return body

    async def one(self, client: httpx.AsyncClient, kind: str) -> None:
        url = self.base + "/v1/chat/completions"
        stream = kind in ("stream", "disconnect") or (kind.startswith("tools") and self.rng.random() < 0.5)
        body = self.body(kind)
        if not stream:
            r = await client.post(url, json=body)
            self.counts[f"{kind} {r.status_code}"] += 1
            if kind == "too_long":
                if r.status_code != 400:
                    self.failures.append(f"over-long prompt answered {r.status_code}")
            elif r.status_code != 200:
                self.failures.append(f"{kind}: {r.status_code} {r.text[:200]}")
            return
        body["stream"] = True
        async with client.stream("POST", url, json=body) as r:
            self.counts[f"{kind}-stream {r.status_code}"] += 1
            if r.status_code != 200:
                self.failures.append(f"{kind} stream: {r.status_code}")
                return
            seen = 0
            cut = self.rng.randint(1, 6) if kind == "disconnect" else None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    self.failures.append(f"{kind} stream error event: {event['error']}")
                    return
                seen += 1
                if cut is not None and seen >= cut:
                    return  # leaving the context manager closes the connection mid-stream

    async def worker(self, client: httpx.AsyncClient, deadline: float) -> None:
        kinds = ["plain", "stream", "tools_auto", "tools_required", "json_schema", "n2", "disconnect", "too_long"]
        weights = [3, 3, 2, 2, 1, 1, 2, 1]
        while time.monotonic() < deadline:
            kind = self.rng.choices(kinds, weights)[0]
            try:
                await self.one(client, kind)
            except httpx.HTTPError as exc:
                self.failures.append(f"{kind}: transport error {type(exc).__name__}: {exc}")


async def run(args: argparse.Namespace, server_pid: int | None) -> int:
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=args.concurrency + 4)) as client:
        info = (await client.get(args.base_url + "/get_server_info")).json()
        soak = Soak(args.base_url, info["max_model_len"], args.seed)
        engine_pid = engine_pid_of(server_pid) if server_pid else None
        samples: list[tuple[float, int | None, int | None]] = []
        start = time.monotonic()
        deadline = start + args.duration

        async def sample_memory() -> None:
            while time.monotonic() < deadline:
                samples.append((time.monotonic() - start, rss_kib(server_pid) if server_pid else None,
                                rss_kib(engine_pid) if engine_pid else None))
                await asyncio.sleep(5)

        await asyncio.gather(sample_memory(), *(soak.worker(client, deadline) for _ in range(args.concurrency)))
        idle_deadline = time.monotonic() + 60
        load = (await client.get(args.base_url + "/token_load")).json()
        while time.monotonic() < idle_deadline and (load["running"] or load["waiting"] or load["kv_used_by_requests"]):
            await asyncio.sleep(0.5)
            load = (await client.get(args.base_url + "/token_load")).json()
    total = sum(soak.counts.values())
    print(f"soak: {total} requests in {args.duration:.0f} s at concurrency {args.concurrency}")
    for key, n in sorted(soak.counts.items()):
        print(f"  {key:28s} {n}")
    five_xx = sum(n for key, n in soak.counts.items() if key.split()[-1].startswith("5"))
    print(f"5xx answers: {five_xx}; stream error events and other failures: {len(soak.failures)}")
    for failure in soak.failures[:10]:
        print("  ", failure)
    print(f"KV tokens held by requests after the traffic: {load['kv_used_by_requests']} "
          f"(prefix cache keeps {load['kv_cached']})")
    ok = five_xx == 0 and not soak.failures and load["kv_used_by_requests"] == 0
    warm = [s for s in samples if s[0] >= args.warmup]
    for name, col in (("API", 1), ("engine", 2)):
        values = [s[col] for s in warm if s[col] is not None]
        if len(values) < 2:
            print(f"{name} RSS: not measured")
            continue
        base, peak, last = values[0], max(values), values[-1]
        growth = (peak - base) / base
        print(f"{name} RSS after warm-up: start {base / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB, "
              f"end {last / 1024:.0f} MiB ({growth * 100:+.1f}% peak vs start)")
        ok &= growth <= 0.10
    print("SOAK PASSED" if ok else "SOAK FAILED")
    return 0 if ok else 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=900.0, help="seconds of traffic")
    p.add_argument("--warmup", type=float, default=None, help="seconds before memory is baselined (default 20%%)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-url", default=None, help="an already running server (else one is started)")
    p.add_argument("--server-pid", type=int, default=None, help="its API process id, for the memory figures")
    p.add_argument("--model_dir", default="smollm2")
    args = p.parse_args()
    args.warmup = args.duration * 0.2 if args.warmup is None else args.warmup
    proc = None
    if args.base_url is None:
        port = free_port()
        log = open(Path(tempfile.gettempdir()) / f"soak-server-{port}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "lightllm.server.api_server", "--port", str(port),
                                 "--model_dir", args.model_dir, "--max_total_token_num", "20000",
                                 "--max_req_total_len", "2048"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        args.base_url = f"http://127.0.0.1:{port}"
        args.server_pid = proc.pid
        for _ in range(600):
            try:
                if httpx.get(args.base_url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                sys.exit(f"server exited during start-up; see {log.name}")
            time.sleep(0.5)
    try:
        code = asyncio.run(run(args, args.server_pid))
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    sys.exit(code)


if __name__ == "__main__":
    main()
