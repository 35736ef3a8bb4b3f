"""Prefill/decode disaggregation end to end on loopback: a pd_master, a prefill node and a decode node (a tiny
random Llama with SmolLM2's tokenizer) against a single server on the same model, through HTTP; readiness;
a decode node killed mid-stream (503 error event, never a hang) and a new one registering."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, ServerProcess, build_tiny_model, embedded_model_path, free_port

PROMPTS = ["def fibonacci(n):", "The three primary colours are", "Q: What is the capital of Italy?\nA:"]
CHAT = [{"role": "user", "content": "Name three rivers of Europe."}]
RIVER = {"type": "object", "properties": {"river": {"type": "string"}}, "required": ["river"]}
COMMON = ["--max_total_token_num", "3000", "--max_req_total_len", "512", "--quant_type", "none"]


class Node:
    """A prefill or decode node (no HTTP): started, logged, killed or stopped with its process group."""

    def __init__(self, role: str, model_dir: Path | str, master_port: int, log: Path, flags: list[str] = COMMON):
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lightllm.server.api_server", "--run_mode", role,
                                      "--model_dir", str(model_dir), *flags, "--pd_master_port", str(master_port),
                                      "--engine_threads", "1"],
                                     cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()


class Master:
    def __init__(self, model_dir: Path | str, master_port: int, log: Path, flags: list[str] = ()):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lightllm.server.api_server", "--run_mode", "pd_master",
                                      "--model_dir", str(model_dir), "--port", str(self.port),
                                      "--pd_master_port", str(master_port), *flags],
                                     cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def status(self, path: str) -> int | None:
        try:
            return requests.get(self.base_url + path, timeout=2).status_code
        except requests.RequestException:
            return None

    def wait_status(self, path: str, want: set[int], timeout: float, nodes: list[Node] = ()) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"master exited:\n{self.log_path.read_text()[-3000:]}")
            for node in nodes:
                if node.proc.poll() is not None:
                    raise AssertionError(f"node exited:\n{node.log_path.read_text()[-3000:]}")
            status = self.status(path)
            if status in want:
                return status
            time.sleep(0.2)
        raise AssertionError(f"{path} not {want} in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def sse_lines(lines) -> list:
    return [("[DONE]" if line == b"data: [DONE]" else json.loads(line[6:])) for line in lines
            if line.startswith(b"data: ")]


def sse(response) -> list:
    return sse_lines(response.iter_lines())


def run_all(base_url: str) -> dict:
    """Outputs of every request shape: greedy token ids (/generate), completions and chat, plain and streamed, one
    sampled with a seed and one constrained to JSON."""
    results: dict = {}
    for i, prompt in enumerate(PROMPTS):
        body = {"inputs": prompt, "parameters": {"do_sample": False, "max_new_tokens": 20, "ignore_eos": True,
                                                 "return_details": True}}
        r = requests.post(base_url + "/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        results[f"ids{i}"] = [t["id"] for t in r.json()["tokens"][0]]
        r = requests.post(base_url + "/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0},
                          timeout=120)
        assert r.status_code == 200, r.text
        results[f"completion{i}"] = r.json()["choices"][0]["text"]
    # sampled with a seed: the decode node goes on with the generator state the prefill node left
    r = requests.post(base_url + "/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 1.0,
                                                          "seed": 7}, timeout=120)
    assert r.status_code == 200, r.text
    results["seeded"] = r.json()["choices"][0]["text"]
    # constrained: the decode node's grammar state starts after the prefill node's first token
    r = requests.post(base_url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 24, "temperature": 0,
                                                               "response_format": {"type": "json_schema", "json_schema": {
                                                                   "name": "river", "schema": RIVER}}},
                      timeout=120)
    assert r.status_code == 200, r.text
    results["json"] = r.json()["choices"][0]["message"]["content"]
    r = requests.post(base_url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0,
                                                          "stream": True}, stream=True, timeout=120)
    results["completion_stream"] = "".join(e["choices"][0]["text"] for e in sse(r)[:-1] if e["choices"])
    r = requests.post(base_url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 16, "temperature": 0},
                      timeout=120)
    assert r.status_code == 200, r.text
    results["chat"] = r.json()["choices"][0]["message"]["content"]
    r = requests.post(base_url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 16, "temperature": 0,
                                                               "stream": True}, stream=True, timeout=120)
    results["chat_stream"] = "".join(e["choices"][0]["delta"].get("content") or ""
                                     for e in sse(r)[:-1] if e["choices"])
    return results


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from lightllm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(embedded_model_path())
    path = build_tiny_model(tmp_path_factory.mktemp("pd") / "model", "llama", vocab_size=len(tokenizer),
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(path)
    return path


def test_master_prefill_decode_match_single_server_and_survive_a_dead_decode_node(model_dir, tmp_path):
    single = ServerProcess(["--model_dir", str(model_dir), *COMMON], tmp_path / "single.log")
    try:
        expected = run_all(single.base_url)
    finally:
        single.stop()
    assert expected["completion_stream"] == expected["completion0"] and expected["chat_stream"] == expected["chat"]
    assert expected["json"].startswith('{"river"')

    port = free_port()
    master = Master(model_dir, port, tmp_path / "master.log")
    nodes: list[Node] = []
    try:
        nodes.append(Node("prefill", model_dir, port, tmp_path / "prefill.log"))
        # HTTP answers once the first node registered; not ready until a node of each role is there
        master.wait_status("/liveness", {200}, 120, nodes)
        assert master.status("/readiness") == 503
        r = requests.post(master.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and "Retry-After" in r.headers, r.text
        nodes.append(Node("decode", model_dir, port, tmp_path / "decode.log"))
        master.wait_status("/readiness", {200}, 120, nodes)

        assert run_all(master.base_url) == expected
        # the prefill node's prefix cache: the same prompt again is served from it (usage says how much)
        body = {"prompt": PROMPTS[2] * 8, "max_tokens": 2, "temperature": 0}
        first, again = (requests.post(master.base_url + "/v1/completions", json=body, timeout=60) for _ in range(2))
        assert first.status_code == again.status_code == 200, again.text
        assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 32
        flushed = requests.post(master.base_url + "/flush_cache", timeout=30)  # every node's prefix cache
        assert flushed.status_code == 200 and flushed.json()["freed_tokens"] >= 32, flushed.text
        # the other routes run on the master as on a single server
        info = requests.get(master.base_url + "/get_server_info", timeout=10).json()
        assert info["run_mode"] == "pd_master" and info["max_model_len"] == 512
        assert requests.get(master.base_url + "/metrics", timeout=10).status_code == 200
        r = requests.post(master.base_url + "/v1/messages", json={"model": "m", "max_tokens": 8, "messages": CHAT,
                                                                  "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["content"], r.text

        # a client that leaves mid-stream: both nodes drop the request and hold no KV for it
        body = {"prompt": PROMPTS[1], "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
        with requests.post(master.base_url + "/v1/completions", json=body, stream=True, timeout=60) as r:
            next(line for line in r.iter_lines() if line.startswith(b"data: "))
        deadline = time.time() + 20
        while time.time() < deadline:
            load = requests.get(master.base_url + "/token_load", timeout=5).json()
            if load["running"] == load["waiting"] == load["kv_used_by_requests"] == 0:
                break
            time.sleep(0.2)
        assert load["running"] == load["waiting"] == load["kv_used_by_requests"] == 0, load

        # a decode node killed mid-stream: the stream ends with a 503 error event, not a hang
        body = {"messages": CHAT, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
        started = time.time()
        with requests.post(master.base_url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith(b"data: ") and b'"content"' in line:
                    break
            nodes[1].kill()
            events = sse_lines(lines)
        errors = [e for e in events if e != "[DONE]" and "error" in e]
        assert errors and errors[0]["error"]["status"] == 503, events[-3:]
        assert events[-1] == "[DONE]" and time.time() - started < 30
        master.wait_status("/readiness", {503}, 10)
        r = requests.post(master.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and "Retry-After" in r.headers, r.text

        # a new decode node registers and serves the same tokens
        nodes.append(Node("decode", model_dir, port, tmp_path / "decode2.log"))
        master.wait_status("/readiness", {200}, 120, [nodes[0], nodes[2]])
        r = requests.post(master.base_url + "/generate", json={
            "inputs": PROMPTS[0], "parameters": {"do_sample": False, "max_new_tokens": 20, "ignore_eos": True,
                                                 "return_details": True}}, timeout=60)
        assert r.status_code == 200 and [t["id"] for t in r.json()["tokens"][0]] == expected["ids0"]

        # a second decode node shares the load: concurrent requests go to both (the one with fewer in flight)
        nodes.append(Node("decode", model_dir, port, tmp_path / "decode3.log"))
        deadline = time.time() + 120
        while "registering with the master" not in nodes[3].log_path.read_text() and time.time() < deadline:
            assert nodes[3].proc.poll() is None, nodes[3].log_path.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # its registration reaches the master

        def generate(i: int) -> list[int]:
            r = requests.post(master.base_url + "/generate", json={
                "inputs": PROMPTS[i % 3], "parameters": {"do_sample": False, "max_new_tokens": 20, "ignore_eos": True,
                                                         "return_details": True}}, timeout=120)
            assert r.status_code == 200, r.text
            return [t["id"] for t in r.json()["tokens"][0]]

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(generate, range(4))) == [expected[f"ids{i % 3}"] for i in range(4)]
        assert "KV transfer group with prefill" in nodes[3].log_path.read_text()  # it received KV

        # a restarted master: the running nodes register with it by their heartbeats
        master.stop()
        master = Master(model_dir, port, tmp_path / "master2.log")
        master.wait_status("/readiness", {200}, 120, [nodes[0], nodes[2], nodes[3]])
        assert generate(0) == expected["ids0"]
    finally:
        master.stop()
        for node in nodes:
            node.kill()


@pytest.mark.parametrize("flags, message", [
    (["--run_mode", "decode", "--tp", "2", "--nnodes", "2"], "--nnodes must be 1"),
    (["--run_mode", "pd_master", "--tp", "2"], "--tp is a prefill/decode node's flag"),
    (["--run_mode", "pd_master", "--enable_lora"], "does not serve LoRA adapters"),
    (["--run_mode", "prefill", "--lora_modules", "a=/x"], "does not serve LoRA adapters"),
])
def test_run_modes_refuse_what_they_do_not_serve(flags, message, capsys):
    from lightllm.server.args import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(flags)
    assert message in str(exc.value)


def test_run_mode_flags_parse():
    from lightllm.server.args import parse_args

    args = parse_args(["--run_mode", "decode", "--pd_master_ip", "10.0.0.1", "--pd_master_port", "1300"])
    assert (args.run_mode, args.pd_master_ip, args.pd_master_port) == ("decode", "10.0.0.1", 1300)
    assert parse_args([]).run_mode == "normal"


@pytest.mark.slow
@pytest.mark.qwen
def test_documented_programs_through_the_master_on_qwen(tmp_path):
    """The four documented client programs, unchanged, through a pd_master with Qwen2.5-Coder-0.5B nodes."""
    from scripts.check_documented_programs import PROGRAMS, _judge

    fetched = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_qwen25_coder.py")], capture_output=True,
                             text=True)
    if fetched.returncode != 0:
        pytest.skip(f"Qwen2.5-Coder GGUF could not be fetched: {fetched.stderr[-500:]}")
    path = fetched.stdout.strip().splitlines()[-1]
    flags = ["--max_total_token_num", "8000", "--max_req_total_len", "4096"]
    port = free_port()
    master = Master(path, port, tmp_path / "master.log")
    nodes = [Node(role, path, port, tmp_path / f"{role}.log", flags) for role in ("prefill", "decode")]
    try:
        master.wait_status("/readiness", {200}, 600, nodes)
        for name, program in PROGRAMS.items():
            out = subprocess.run([sys.executable, "-c", program, master.base_url], capture_output=True, text=True,
                                 timeout=600)
            assert out.returncode == 0 and _judge(name, out.stdout), (name, out.stdout[-2000:], out.stderr[-2000:])
    finally:
        master.stop()
        for node in nodes:
            node.kill()
