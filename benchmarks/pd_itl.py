"""Why PD exists, measured: decode streams running while long prompts arrive — single server vs pd_master +
1 prefill node + 1 decode node on the same cores (split between the nodes).

    python benchmarks/pd_itl.py --mode single --model_dir smollm2 --threads 2
    python benchmarks/pd_itl.py --mode pd --model_dir smollm2 --threads 2

`--streams` requests stream `--stream_tokens` tokens each (/generate_stream, greedy, ignore_eos); once they
flow, `--long_prompts` prompts of `--long_tokens` random token ids (distinct, so no prefix-cache hits) arrive
every `--interval` seconds. Reported: the streams' inter-token latency (p50/p99, from SSE arrival times) while
the long prompts are in the system, and the long prompts' time to first token. Prints one JSON line.
The script starts and stops every process it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lightllm.server.api_server", *args], cwd=REPO,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_ready(url: str, procs: list[subprocess.Popen], timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a process exited during start-up (see the logs)")
        try:
            if requests.get(url + "/readiness", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit("not ready in time")


def stream(url: str, ids: list[int], max_new: int, arrivals: list[float]) -> None:
    body = {"inputs": ids, "parameters": {"do_sample": False, "max_new_tokens": max_new, "ignore_eos": True}}
    with requests.post(url + "/generate_stream", json=body, stream=True, timeout=900) as r:
        for line in r.iter_lines():
            if line.startswith(b"data:") and b'"token"' in line:
                arrivals.append(time.perf_counter())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["single", "pd"], required=True)
    p.add_argument("--model_dir", default="smollm2")
    p.add_argument("--threads", type=int, default=2, help="cores in all: the single server's, split in PD")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--stream_tokens", type=int, default=160)
    p.add_argument("--long_prompts", type=int, default=3)
    p.add_argument("--long_tokens", type=int, default=3000)
    p.add_argument("--interval", type=float, default=4.0)
    p.add_argument("--logs", default="/tmp/pd_itl")
    args = p.parse_args()
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    common = ["--model_dir", args.model_dir, "--max_total_token_num", "20000", "--max_req_total_len", "4096"]
    procs: list[subprocess.Popen] = []
    try:
        if args.mode == "single":
            procs.append(start([*common, "--port", str(port), "--engine_threads", str(args.threads)],
                               logs / "single.log"))
        else:
            master_port = str(free_port())
            half = str(max(1, args.threads // 2))
            procs.append(start([*common, "--run_mode", "pd_master", "--port", str(port), "--pd_master_port",
                                master_port], logs / "master.log"))
            for role in ("prefill", "decode"):
                procs.append(start([*common, "--run_mode", role, "--pd_master_port", master_port,
                                    "--engine_threads", half], logs / f"{role}.log"))
        wait_ready(url, procs)
        rng = random.Random(0)
        stream_arrivals = [[] for _ in range(args.streams)]
        threads = [threading.Thread(target=stream, args=(url, [rng.randrange(100, 30000) for _ in range(16)],
                                                         args.stream_tokens, stream_arrivals[i]))
                   for i in range(args.streams)]
        for t in threads:
            t.start()
        while min(len(a) for a in stream_arrivals) < 3:  # every stream flows
            time.sleep(0.05)
        long_arrivals = [[] for _ in range(args.long_prompts)]
        sent: list[float] = []
        longs = []
        window_start = time.perf_counter()
        for i in range(args.long_prompts):
            ids = [rng.randrange(100, 30000) for _ in range(args.long_tokens)]
            sent.append(time.perf_counter())
            t = threading.Thread(target=stream, args=(url, ids, 4, long_arrivals[i]))
            t.start()
            longs.append(t)
            time.sleep(args.interval)
        for t in longs:
            t.join()
        window_end = time.perf_counter()
        for t in threads:
            t.join()
        gaps = [b - a for arr in stream_arrivals for a, b in zip(arr, arr[1:])
                if window_start <= b <= window_end]
        all_gaps = sorted(b - a for arr in stream_arrivals for a, b in zip(arr, arr[1:]))
        gaps.sort()
        ttft = [arr[0] - s for arr, s in zip(long_arrivals, sent) if arr]
        q = lambda xs, f: xs[min(len(xs) - 1, int(f * len(xs)))] * 1e3 if xs else None  # noqa: E731
        print(json.dumps({
            "mode": args.mode, "model": args.model_dir, "threads": args.threads, "streams": args.streams,
            "long_prompts": args.long_prompts, "long_tokens": args.long_tokens,
            "itl_window_ms": {"p50": q(gaps, 0.5), "p99": q(gaps, 0.99), "max": q(gaps, 1.0), "n": len(gaps)},
            "itl_all_ms": {"p50": q(all_gaps, 0.5), "p99": q(all_gaps, 0.99)},
            "ttft_long_s": [round(x, 2) for x in ttft],
            "ttft_long_mean_s": round(statistics.mean(ttft), 2) if ttft else None}))
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
