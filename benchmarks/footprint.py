#!/usr/bin/env python3
"""Start-up time and resident memory, lightllm beside llama.cpp's llama-server on the same GGUF file.

For each server, in alternating rounds (the box may be shared: alternating spreads the noise over both):
- start: seconds from launch to the first completion answered (a one-token /v1/completions, retried until 200);
- RSS / PSS: resident memory of the whole server (the launched process and all its children, summed) after
  one long request (a prompt of --long-words words, --long-tokens generated), at a KV cache of --ctx tokens
  (ours: --max_total_token_num CTX; llama-server: -c CTX). PSS splits pages shared between processes.

    python benchmarks/footprint.py --model qwen2.5-coder --rounds 2
    python benchmarks/footprint.py --model qwen2.5-coder --old /tmp/old      # adds the commit checked out there
    LLAMA_BIN=~/.cache/lightllm/llamacpp/build/bin python benchmarks/footprint.py --servers ours llama

`--old DIR` runs DIR's lightllm (a `git worktree add DIR COMMIT`) with this repository's virtualenv. Prints one
line per run and the medians per server; `--json-out` writes them all.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
WORDS = "river mountain ocean city garden music science history language computer story question".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_memory(pid: int) -> tuple[float, float, list[int]]:
    """(RSS, PSS) in MiB summed over the process and its descendants, and each one's RSS in MiB."""
    rss = pss = 0
    each = []
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0, []
    for proc in procs:
        try:
            full = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += full.rss
        pss += getattr(full, "pss", full.rss)
        each.append(round(full.rss / 2**20))
    return rss / 2**20, pss / 2**20, each


def server_command(kind: str, model: str, port: int, ctx: int, args: argparse.Namespace) -> tuple[list[str], dict]:
    env = dict(os.environ)
    if kind == "llama":
        binary = Path(os.path.expanduser(args.llama_bin)) / "llama-server"
        return [str(binary), "-m", model, "--host", "127.0.0.1", "--port", str(port), "-c", str(ctx),
                "-t", str(os.cpu_count())], env
    root = ROOT if kind == "ours" else Path(args.old)
    env["PYTHONPATH"] = str(root)
    return [sys.executable, "-m", "lightllm.server.api_server", "--model_dir", model, "--host", "127.0.0.1",
            "--port", str(port), "--max_total_token_num", str(ctx), "--log_level", "WARNING",
            *args.ours_args.split()], env


def completion(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> httpx.Response:
    return client.post(url + "/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": max_tokens,
                                                      "temperature": 0, "ignore_eos": True}, timeout=600)


def measure(kind: str, model: str, args: argparse.Namespace) -> dict:
    port = free_port()
    cmd, env = server_command(kind, model, port, args.ctx, args)
    url = f"http://127.0.0.1:{port}"
    log = open(Path(args.log_dir) / f"footprint-{kind}-{port}.log", "w")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT if kind != "old" else args.old, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client() as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{kind} exited with {proc.returncode} (see {log.name})")
                if time.perf_counter() - start > args.start_timeout:
                    raise RuntimeError(f"{kind} gave no completion within {args.start_timeout}s")
                try:
                    if completion(client, url, "Hello", 1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            started = time.perf_counter() - start
            long_prompt = " ".join(WORDS[i % len(WORDS)] for i in range(args.long_words))
            response = completion(client, url, long_prompt, args.long_tokens)
            response.raise_for_status()
            rss, pss, each = tree_memory(proc.pid)
        return {"server": kind, "start_s": round(started, 2), "rss_mib": round(rss), "pss_mib": round(pss),
                "rss_each_mib": each,
                "prompt_tokens": response.json().get("usage", {}).get("prompt_tokens")}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder", help="a GGUF path or a catalog name")
    parser.add_argument("--servers", nargs="+", default=["ours", "llama"], choices=["ours", "old", "llama"])
    parser.add_argument("--old", help="a worktree of the old commit (adds 'old' to --servers)")
    parser.add_argument("--ctx", type=int, default=16384, help="KV cache tokens for every server")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--long-words", type=int, default=1500, help="words in the long request's prompt")
    parser.add_argument("--long-tokens", type=int, default=32, help="tokens the long request generates")
    parser.add_argument("--ours-args", default="", help="extra lightllm flags")
    parser.add_argument("--llama-bin", default=os.environ.get("LLAMA_BIN", "~/.cache/lightllm/llamacpp/build/bin"))
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--log-dir", default="/tmp")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    servers = list(dict.fromkeys(args.servers + (["old"] if args.old else [])))
    if "old" in servers and not args.old:
        parser.error("--servers old needs --old DIR")
    sys.path.insert(0, str(ROOT))
    from lightllm.models.loading.catalog import resolve_model

    model = resolve_model(args.model)  # fetched and checked once, outside the timed starts
    runs = []
    for round_ in range(args.rounds):
        for kind in servers if round_ % 2 == 0 else reversed(servers):
            run = measure(kind, model, args)
            runs.append(run)
            print(json.dumps(run), flush=True)
    print(f"\n{Path(model).name}, KV {args.ctx} tokens, medians of {args.rounds} rounds")
    print(f"{'server':>8} {'start s':>8} {'RSS MiB':>8} {'PSS MiB':>8}")
    for kind in servers:
        mine = [r for r in runs if r["server"] == kind]
        print(f"{kind:>8} {statistics.median(r['start_s'] for r in mine):>8.2f} "
              f"{statistics.median(r['rss_mib'] for r in mine):>8.0f} {statistics.median(r['pss_mib'] for r in mine):>8.0f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": model, "ctx": args.ctx, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
