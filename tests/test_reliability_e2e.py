"""Failure modes through HTTP, as a client sees them: the engine process killed mid-stream (503 error
event, then the engine restarts and later requests succeed), the restart budget exhausted (the server
exits non-zero), SIGTERM (in-flight requests finish, new ones get 503), client disconnects during a
prefill and during a grammar-constrained stream (no KV left held), and the request limits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
import requests

from tests.conftest import ServerProcess

LONG = {"messages": [{"role": "user", "content": "Tell me a very long story about a lighthouse."}],
        "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}


def engine_pid(server: ServerProcess) -> int:
    children = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                return int(pid)
    raise AssertionError(f"no engine process among {children}")


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            events.append("[DONE]" if line == b"data: [DONE]" else json.loads(line[6:]))
    return events


def wait_health(server: ServerProcess, status: int, timeout: float) -> float:
    start = time.time()
    while time.time() - start < timeout:
        try:
            if requests.get(server.base_url + "/health", timeout=2).status_code == status:
                return time.time() - start
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise AssertionError(f"/health did not answer {status} within {timeout}s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(["--model_dir", "smollm2", "--max_total_token_num", "6000", "--chunked_prefill_size", "64",
                         "--max_engine_restarts", "2"], tmp_path_factory.mktemp("logs") / "reliability.log")
    yield srv
    srv.stop()


def test_engine_killed_mid_stream_then_restarted(server):
    url = server.base_url + "/v1/chat/completions"
    response = requests.post(url, json=LONG, stream=True, timeout=120)
    lines = response.iter_lines()
    next(line for line in lines if b'"content"' in line and b'"role"' not in line)  # generating now
    os.kill(engine_pid(server), signal.SIGKILL)
    rest = []
    for line in lines:
        if line.startswith(b"data: "):
            rest.append("[DONE]" if line == b"data: [DONE]" else json.loads(line[6:]))
    assert rest[-1] == "[DONE]"
    error = rest[-2]["error"]
    assert error["status"] == 503 and error["type"] == "service_unavailable_error"
    # While the engine is down: probes fail and requests answer 503 at once, with Retry-After.
    down = requests.get(server.base_url + "/readiness", timeout=5)
    assert down.status_code == 503
    assert requests.get(server.base_url + "/liveness", timeout=5).status_code == 200
    refused = requests.post(url, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, timeout=5)
    if refused.status_code == 503:  # unless the restart already finished
        assert refused.headers["Retry-After"] and refused.json()["error"]["code"] == "engine_unavailable"
    wait_health(server, 200, timeout=120)
    ok = requests.post(url, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
    assert server.wait_idle()["kv_used_by_requests"] == 0


def test_disconnect_during_prefill_and_during_constrained_stream_frees_kv(server):
    url = server.base_url + "/v1/chat/completions"
    long_prompt = " ".join(f"item{i}" for i in range(400))  # ~1,200 tokens: prefill takes many 64-token chunks
    body = {"messages": [{"role": "user", "content": long_prompt}], "max_tokens": 50, "stream": True}
    response = requests.post(url, json=body, stream=True, timeout=120)
    lines = response.iter_lines()  # (keep the iterator: dropping it closes the connection)
    next(lines)  # the role chunk is out (the API sends it at once); the prompt is still being computed
    deadline = time.monotonic() + 20  # the engine reports its load with its steps' outputs: wait for a step
    while (load := server.token_load())["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert load["running"] == 1 and load["kv_used_by_requests"] > 0 and load["inflight"] == 1
    response.close()
    assert server.wait_idle()["kv_used_by_requests"] == 0
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
    body = {"messages": [{"role": "user", "content": "Look up lighthouses."}], "tools": tools,
            "tool_choice": "required", "stream": True, "max_tokens": 300, "temperature": 1.0}
    response = requests.post(url, json=body, stream=True, timeout=120)
    lines = response.iter_lines()
    next(line for line in lines if b"tool_calls" in line)
    response.close()
    assert server.wait_idle()["kv_used_by_requests"] == 0


def test_request_limits(server):
    url = server.base_url + "/v1/chat/completions"
    too_big = requests.post(url, data=b'{"messages": [' + b" " * (17 << 20) + b"]}",
                            headers={"Content-Type": "application/json"}, timeout=60)
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "invalid_request_error"
    many = [{"role": "user", "content": "x"}] * 2049
    r = requests.post(url, json={"messages": many, "max_tokens": 1}, timeout=30)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    r = requests.post(url, json={"messages": many[:1], "tools": [tool] * 129, "max_tokens": 1}, timeout=30)
    assert r.status_code == 400 and "tools" in r.json()["error"]["message"]
    huge = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "description": "d" * 100} for i in range(800)}}}}
    r = requests.post(url, json={"messages": many[:1], "tools": [huge], "max_tokens": 1}, timeout=30)
    assert r.status_code == 400 and "schema" in r.json()["error"]["message"]
    r = requests.post(url, json={"messages": many[:1], "n": 17, "max_tokens": 1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_sigterm_drains_in_flight_requests(tmp_path):
    srv = ServerProcess(["--model_dir", "smollm2", "--max_total_token_num", "4000", "--shutdown_timeout", "60"],
                        tmp_path / "drain.log")
    try:
        url = srv.base_url + "/v1/chat/completions"
        body = dict(LONG, max_tokens=250)
        response = requests.post(url, json=body, stream=True, timeout=120)
        lines = response.iter_lines()
        next(line for line in lines if b'"content"' in line and b'"role"' not in line)
        collected: list = []
        reader = threading.Thread(target=lambda: collected.extend(lines))
        reader.start()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        late = requests.post(url, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=10)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        reader.join(120)
        events = [json.loads(l[6:]) for l in collected if l.startswith(b"data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length"  # the in-flight stream ran to its end
        assert [l for l in collected if l][-1] == b"data: [DONE]"
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()


def test_engine_that_keeps_dying_stops_the_server_non_zero(tmp_path):
    srv = ServerProcess(["--model_dir", "smollm2", "--max_total_token_num", "2000", "--max_engine_restarts", "0"],
                        tmp_path / "giveup.log")
    try:
        os.kill(engine_pid(srv), signal.SIGKILL)
        assert srv.proc.wait(60) == 1
        assert "not restarting" in (tmp_path / "giveup.log").read_text()
    finally:
        srv.stop()


def test_engine_dies_with_an_api_process_killed_outright(tmp_path):
    srv = ServerProcess(["--model_dir", "smollm2", "--max_total_token_num", "2000"], tmp_path / "orphan.log")
    try:
        engine = engine_pid(srv)
        os.kill(srv.proc.pid, signal.SIGKILL)  # no cleanup runs in the API process
        srv.proc.wait(10)
        deadline = time.time() + 15
        while os.path.exists(f"/proc/{engine}") and time.time() < deadline:
            with open(f"/proc/{engine}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":  # exited, waiting for its reaper
                    break
            time.sleep(0.1)
        else:
            assert not os.path.exists(f"/proc/{engine}"), "the engine outlived its API process"
    finally:
        try:
            os.killpg(srv.proc.pid, signal.SIGKILL)  # whatever is left of its session
        except ProcessLookupError:
            pass
        srv.stop()


@pytest.mark.slow
def test_short_soak():
    """benchmarks/soak.py for two minutes (the documented run is 15): no 5xx, no KV held, flat memory."""
    import sys

    from tests.conftest import REPO

    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak.py"), "--duration", "120", "--concurrency",
                          "16"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "SOAK PASSED" in out.stdout, out.stdout + out.stderr[-3000:]


def test_injected_step_faults_answer_500_and_the_server_serves_on(tmp_path):
    """Steps 3 and 12 of the engine raise (LIGHTLLM_FAULT_STEPS): the request of each answers 500 — plain as
    an OpenAI error object, streamed as one error event then [DONE] — and the requests after succeed."""
    srv = ServerProcess(["--model_dir", "smollm2", "--max_total_token_num", "2000"], tmp_path / "faults.log",
                        env={"LIGHTLLM_FAULT_STEPS": "3,12"})
    try:
        url = srv.base_url + "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "ignore_eos": True}
        plain = requests.post(url, json=body, timeout=60)  # steps 1-6: the fault hits it at step 3
        assert plain.status_code == 500, plain.text
        error = plain.json()["error"]
        assert error["type"] == "server_error" and "injected fault" in error["message"]
        assert srv.wait_idle()["kv_used_by_requests"] == 0
        ok = requests.post(url, json=body, timeout=60)  # steps 4-9
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
        streamed = requests.post(url, json=dict(body, stream=True), stream=True, timeout=60)  # hit at step 12
        events = sse_events(streamed)
        assert events[-1] == "[DONE]" and events[-2]["error"]["status"] == 500
        assert srv.wait_idle()["kv_used_by_requests"] == 0
        assert requests.post(url, json=body, timeout=60).status_code == 200
    finally:
        srv.stop()
