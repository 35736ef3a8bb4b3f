"""Data-parallel replicas behind an existing router, sglang-router (the SGLang Model Gateway, PyPI
`sglang-router`): two replicas of the embedded model and the router on loopback. The router registers the
replicas from what they serve (/health, /server_info, /model_info), the OpenAI SDK and the four documented
client programs work through it, and with `cache_aware` every shared prefix stays in one replica's prefix
cache, for a higher hit rate than `round_robin` (benchmarks/router_prefix.py is the same workload, timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests

pytest.importorskip("sglang_router", reason="sglang-router is not installed (it is in the test extras)")

from benchmarks.router_prefix import Router, make_workload, run_policy  # noqa: E402
from scripts.check_documented_programs import PROGRAMS, _judge  # noqa: E402
from tests.conftest import REPO, ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow  # two servers and two routers: about two minutes on 2 cores


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("router")


@pytest.fixture(scope="module")
def replicas(logs):
    # each replica gets its share of the cores (two engines each using every core slow each other down)
    env = {"LIGHTLLM_ENGINE_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}
    servers = []
    try:
        for i in range(2):
            # dense weights: greedy text is the same whichever replica answers, whatever its batch
            # --max_req_total_len bounds a sampled answer that rambles on (the documented tool programs sample
            # at temperature 0.7 without max_tokens; at one core per replica 4,096 tokens take minutes; the chat
            # programs ask for up to 1,000)
            servers.append(ServerProcess(["--model_dir", "smollm2", "--max_total_token_num", "20000",
                                          "--quant_type", "none", "--max_req_total_len", "2048"],
                                         logs / f"replica{i}.log", env=env))
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def router(replicas, logs):
    r = Router([s.base_url for s in replicas], "cache_aware", logs / "router-cache_aware.log")
    yield r
    r.stop()


@pytest.fixture(scope="module")
def served_name(replicas):
    return requests.get(replicas[0].base_url + "/v1/models", timeout=10).json()["data"][0]["id"]


def test_worker_info_routes(replicas, served_name):
    """What the router reads from a worker, in SGLang's shapes."""
    base = replicas[0].base_url
    info = requests.get(base + "/server_info", timeout=10).json()
    assert info["served_model_name"] == served_name and info["dp_size"] == 1
    assert os.path.exists(info["model_path"]) and info["max_total_tokens"] == 20000
    model = requests.get(base + "/model_info", timeout=10).json()
    assert model == requests.get(base + "/get_model_info", timeout=10).json()
    assert model["model_path"] == info["model_path"] and model["is_generation"] is True
    assert model["architectures"] and all(isinstance(a, str) for a in model["architectures"])
    replicas[0].wait_idle()
    load = requests.get(base + "/get_load", timeout=10).json()
    assert load == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]


def test_router_registers_replicas(router, replicas, served_name):
    workers = requests.get(router.base_url + "/workers", timeout=10).json()["workers"]
    assert sorted(w["url"] for w in workers) == sorted(s.base_url for s in replicas)
    assert all(w["is_healthy"] and w["model_id"] == served_name and w["connection_mode"] == "HTTP" for w in workers)
    # the router answers these itself, from what the replicas told it or answer now
    assert [m["id"] for m in requests.get(router.base_url + "/v1/models", timeout=10).json()["data"]] == [served_name]
    assert requests.get(router.base_url + "/get_model_info", timeout=10).json() == \
        requests.get(replicas[0].base_url + "/get_model_info", timeout=10).json()
    loads = requests.get(router.base_url + "/get_loads", timeout=10).json()["workers"]
    assert len(loads) == 2 and all(w["load"] >= 0 for w in loads)  # -1: the router could not read /get_load


def test_openai_sdk_through_router(router, served_name):
    import openai

    client = openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [served_name]
    messages = [{"role": "user", "content": "Name three colours."}]
    plain = client.chat.completions.create(model=served_name, messages=messages, temperature=0, max_tokens=16)
    assert plain.choices[0].message.content and plain.model == served_name
    assert plain.usage.completion_tokens == 16 or plain.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=served_name, messages=messages, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content  # greedy: the same text whichever replica answered
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    text = client.completions.create(model=served_name, prompt="The capital of France is", temperature=0,
                                     max_tokens=8)
    assert text.choices[0].text and text.usage.prompt_tokens > 0
    text_stream = client.completions.create(model=served_name, prompt="The capital of France is", temperature=0,
                                            max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in text_stream if c.choices) == text.choices[0].text
    # a forced tool call (the grammar makes it): tools and tool_choice pass through the router intact
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = dict(model=served_name, messages=ask, tools=tools, tool_choice="required", parallel_tool_calls=False,
                  temperature=0, max_tokens=64)
    call = client.chat.completions.create(**forced)
    assert call.choices[0].finish_reason == "tool_calls" and len(call.choices[0].message.tool_calls) == 1
    tool_call = call.choices[0].message.tool_calls[0]
    assert tool_call.function.name == "get_weather" and "city" in json.loads(tool_call.function.arguments)
    deltas = [tc for c in client.chat.completions.create(**forced, stream=True)
              if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == json.loads(tool_call.function.arguments)


def test_documented_programs_through_router(router):
    """The four documented client programs, unchanged, at the router's address (run at once, so both replicas
    serve). SmolLM2 does not call tools of its own accord (`tool_choice` auto; the qwen tests check the
    calls), so the two function-calling programs must only run to the end on what the router returns."""
    procs = {name: subprocess.Popen([sys.executable, "-c", program, router.base_url], cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, program in PROGRAMS.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err[-2000:]}"
        if name.startswith("chat"):
            assert _judge(name, out), f"{name}: {out[-2000:]}"


def test_cache_aware_keeps_each_prefix_on_one_replica(router, replicas, logs):
    """4 distinct ~600-token prefixes x 6 requests, shuffled, 4 at a time. cache_aware: each prefix is cached by
    exactly one replica (1 miss, 5 hits each); round_robin spreads prefixes over both replicas (a miss on each).
    Hit rates come from the replicas' /metrics."""
    urls = [s.base_url for s in replicas]
    aware = run_policy(router, "cache_aware", urls, make_workload(4, 6, 580, seed=11), concurrency=4)
    rr_router = Router(urls, "round_robin", logs / "router-round_robin.log")
    try:
        rr = run_policy(rr_router, "round_robin", urls, make_workload(4, 6, 580, seed=22), concurrency=4)
    finally:
        rr_router.stop()
    print(json.dumps([aware.summary(), rr.summary()], indent=1))
    for run in (aware, rr):
        assert sum(d["lightllm_requests_total"] for d in run.replica_delta) == 24
        assert all(r.prompt_tokens > 550 for r in run.results)
    assert all(len(holders) == 1 for holders in aware.holders.values()), aware.holders
    assert any(len(holders) == 2 for holders in rr.holders.values()), rr.holders
    # 5 of 6 requests reuse a ~600-token prefix: ~0.81 (less when two requests of a new prefix start in the same
    # step and both compute it); round robin misses once on each replica: ~0.65
    assert aware.hit_rate() > 0.7
    assert aware.hit_rate() > rr.hit_rate()
    # the metrics agree with what each response reported as cached
    assert sum(d["lightllm_prefix_cache_hit_tokens_total"] for d in aware.replica_delta) == \
        sum(r.cached_tokens for r in aware.results)


def test_responses_api_and_flush_cache_through_router(router, replicas, served_name):
    import openai

    client = openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused")
    # the router forwards "stream": null; the Responses route takes it as false
    reply = client.responses.create(model=served_name, input="Say hello.", max_output_tokens=8, temperature=0)
    assert reply.status in ("completed", "incomplete") and reply.output_text
    flushed = requests.post(router.base_url + "/flush_cache", timeout=60)
    assert flushed.status_code == 200, flushed.text  # every worker answered
    for replica in replicas:
        assert requests.post(replica.base_url + "/flush_cache", timeout=30).json()["freed_tokens"] == 0  # emptied
