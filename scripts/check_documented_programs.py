#!/usr/bin/env python3
"""What a new user sees: start the server as `make serve` does (default model, no parser flags) with a
different --seed each time, run the four documented client programs unchanged (plain chat, streamed
chat, function calling plain and streamed, `tool_choice` auto, temperature 0.7), and count the starts
where all four succeed.

    .venv/bin/python scripts/check_documented_programs.py --starts 10 [--model_dir smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent

CHAT_PLAIN = '''
import sys, requests
data = {"model": "default", "messages": [{"role": "user", "content": "你好，请介绍一下你自己"}],
        "temperature": 0.7, "max_tokens": 1000}
response = requests.post(sys.argv[1] + "/v1/chat/completions", headers={"Content-Type": "application/json"}, json=data)
print(response.json()["choices"][0]["message"]["content"])
'''

CHAT_STREAM = '''
import sys, json, requests
data = {"model": "default", "messages": [{"role": "user", "content": "你好，请介绍一下你自己"}],
        "temperature": 0.7, "max_tokens": 200, "stream": True}
response = requests.post(sys.argv[1] + "/v1/chat/completions", headers={"Content-Type": "application/json"}, json=data,
                         stream=True)
for line in response.iter_lines():
    if line:
        line = line.decode("utf-8")
        if line.startswith("data: "):
            if line == "data: [DONE]":
                print("[DONE]")
                break
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                print(delta["content"], end="", flush=True)
'''

TOOLS_PLAIN = '''
import sys, requests
url = sys.argv[1] + "/v1/chat/completions"
tools = [{"type": "function", "function": {"name": "get_current_weather", "description": "获取指定城市的当前天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名称"},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}]
data = {"model": "qwen", "messages": [{"role": "user", "content": "北京今天天气怎么样？"}], "tools": tools,
        "tool_choice": "auto", "temperature": 0.7}
response = requests.post(url, headers={"Content-Type": "application/json"}, json=data)
message = response.json()["choices"][0]["message"]
if message.get("tool_calls"):
    for tool_call in message["tool_calls"]:
        print("NAME", tool_call["function"]["name"])
        print("ARGS", tool_call["function"]["arguments"])
'''

TOOLS_STREAM = '''
import sys, json, requests
url = sys.argv[1] + "/v1/chat/completions"
tools = [{"type": "function", "function": {"name": "calculate", "description": "计算数学表达式",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "数学表达式"}},
    "required": ["expression"]}}}]
data = {"model": "qwen", "messages": [{"role": "user", "content": "请计算 25 * 4 + 10 的结果"}], "tools": tools,
        "stream": True, "temperature": 0.7}
response = requests.post(url, headers={"Content-Type": "application/json"}, json=data, stream=True)
for line in response.iter_lines():
    if line:
        line = line.decode("utf-8")
        if line.startswith("data: "):
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["delta"]
            if "tool_calls" in delta:
                for tool_call in delta["tool_calls"]:
                    print("NAME", tool_call["function"]["name"])
                    print("ARGS", tool_call["function"].get("arguments"))
'''


def _args_of(out: str) -> dict | None:
    text = "".join(line[5:] for line in out.splitlines() if line.startswith("ARGS ") and line != "ARGS None")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _judge(name: str, out: str) -> bool:
    if name == "chat_plain":
        return bool(out.strip()) and out.strip() != "None"
    if name == "chat_stream":
        return out.rstrip().endswith("[DONE]") and len(out.strip()) > len("[DONE]")
    args = _args_of(out)
    if name == "tools_plain":
        return "NAME get_current_weather" in out and args is not None and ("北京" in str(args.get("city")) or
                                                                              "Beijing" in str(args.get("city")))
    return "NAME calculate" in out and args is not None and "25" in str(args.get("expression"))


PROGRAMS = {"chat_plain": CHAT_PLAIN, "chat_stream": CHAT_STREAM, "tools_plain": TOOLS_PLAIN, "tools_stream": TOOLS_STREAM}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_start(seed: int, extra: list[str], log_dir: Path) -> dict[str, bool]:
    port = free_port()
    log = open(log_dir / f"server-seed{seed}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lightllm.server.api_server", "--port", str(port), "--seed", str(seed),
                             *extra], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: see {log.name}")
            try:
                if requests.get(base + "/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        results = {}
        for name, program in PROGRAMS.items():
            out = subprocess.run([sys.executable, "-c", program, base], capture_output=True, text=True, timeout=600)
            results[name] = out.returncode == 0 and _judge(name, out.stdout)
            if not results[name]:
                (log_dir / f"seed{seed}-{name}.out").write_text(out.stdout + "\n--- stderr\n" + out.stderr)
        return results
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--starts", type=int, default=10)
    p.add_argument("--first_seed", type=int, default=1)
    p.add_argument("--model_dir", default=None, help="default: the server's default model")
    args = p.parse_args()
    extra = ["--model_dir", args.model_dir] if args.model_dir else []
    log_dir = Path(tempfile.mkdtemp(prefix="doc-programs-"))
    full = 0
    for seed in range(args.first_seed, args.first_seed + args.starts):
        start = time.perf_counter()
        results = one_start(seed, extra, log_dir)
        passed = sum(results.values())
        full += passed == len(results)
        print(f"seed {seed}: {passed}/{len(results)} " + " ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in results.items())
              + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"{full}/{args.starts} starts passed all four programs (logs of failures: {log_dir})")


if __name__ == "__main__":
    main()
