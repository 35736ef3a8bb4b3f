"""Routes and fields clients of vLLM / LightLLM call besides chat: tokenize / detokenize, model lookup,
cached-token usage from the prefix cache (plain and streamed), continuous usage stats, probes."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from tests.conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(smol_server):
    return openai.OpenAI(base_url=smol_server.base_url + "/v1", api_key=API_KEY)


def test_tokenize_and_detokenize_round_trip(smol_server):
    base = smol_server.base_url
    out = requests.post(base + "/tokenize", json={"prompt": "Hello world, 你好"}, headers=HEADERS, timeout=10).json()
    assert out["count"] == len(out["tokens"]) > 0 and out["max_model_len"] == 4096 and out["token_strs"] is None
    back = requests.post(base + "/detokenize", json={"tokens": out["tokens"]}, headers=HEADERS, timeout=10).json()
    assert back["prompt"] == "Hello world, 你好"
    chat = requests.post(base + "/tokenize", json={"messages": [{"role": "user", "content": "Hello world"}],
                                                   "return_token_strs": True}, headers=HEADERS, timeout=10).json()
    assert chat["count"] > out["count"] and len(chat["token_strs"]) == chat["count"]  # the template adds turns
    usage = requests.post(base + "/v1/chat/completions", headers=HEADERS, timeout=60, json={
        "messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == chat["count"]  # the same prompt the chat route runs
    bad = requests.post(base + "/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
                        headers=HEADERS, timeout=10)
    assert bad.status_code == 400
    bad = requests.post(base + "/detokenize", json={"tokens": [10 ** 9]}, headers=HEADERS, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_tokenize_counts_a_continued_final_message_as_chat_runs_it(smol_server):
    base = smol_server.base_url
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    body = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    counted = requests.post(base + "/tokenize", json=body, headers=HEADERS, timeout=10).json()
    usage = requests.post(base + "/v1/chat/completions", headers=HEADERS, timeout=60,
                          json={**body, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == counted["count"]
    closed = requests.post(base + "/tokenize", json={"messages": messages, "add_generation_prompt": False},
                           headers=HEADERS, timeout=10).json()
    assert closed["count"] > counted["count"]  # without it the template closes the assistant turn
    both = requests.post(base + "/tokenize", json={"messages": messages, "continue_final_message": True},
                         headers=HEADERS, timeout=10)
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"


def test_model_lookup(client):
    model = client.models.list().data[0].id
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found"


def test_cached_tokens_plain_and_streamed(client):
    system = "You are a terse assistant. " + " ".join(f"Rule {i}: be brief." for i in range(60))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Say hi."}]
    first = client.chat.completions.create(model="m", messages=messages, max_tokens=2, temperature=0)
    second = client.chat.completions.create(model="m", messages=messages, max_tokens=2, temperature=0)
    details = second.usage.prompt_tokens_details
    assert details is not None and second.usage.prompt_tokens - 8 <= details.cached_tokens < second.usage.prompt_tokens
    assert first.usage.prompt_tokens_details is None or \
        first.usage.prompt_tokens_details.cached_tokens < details.cached_tokens
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=2, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    final = [c for c in stream if c.usage is not None][-1]
    assert final.usage.prompt_tokens_details.cached_tokens == details.cached_tokens
    metrics = requests.get(client.base_url.scheme + "://" + client.base_url.host + ":" + str(client.base_url.port)
                           + "/metrics", timeout=10).text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("lightllm_prefix")}
    assert values["lightllm_prefix_cache_hit_tokens_total"] >= details.cached_tokens
    assert 0 < values["lightllm_prefix_cache_hit_rate"] <= 1
    done = client.completions.create(model="m", prompt=system, max_tokens=2, temperature=0)
    again = client.completions.create(model="m", prompt=system, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= done.usage.prompt_tokens - 1


def test_continuous_usage_stats(smol_server):
    body = {"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 6, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    response = requests.post(smol_server.base_url + "/v1/chat/completions", headers=HEADERS, json=body, stream=True,
                             timeout=60)
    chunks = [json.loads(l[6:]) for l in response.iter_lines() if l.startswith(b"data: {")]
    counts = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert all(c["usage"] is not None for c in chunks)
    assert counts == sorted(counts) and counts[-1] == 6 and chunks[-1]["usage"]["completion_tokens"] == 6


def test_probes(smol_server):
    for path in ("/health", "/healthz"):
        assert requests.get(smol_server.base_url + path, timeout=5).json() == {"message": "Ok"}, path
    for path in ("/readiness", "/liveness"):  # LightLLM's shape for the Kubernetes-style probes
        assert requests.get(smol_server.base_url + path, timeout=5).json() == {"status": "ok"}, path
    head = requests.head(smol_server.base_url + "/health", timeout=5)
    assert head.status_code == 200 and head.content == b""
    info = requests.get(smol_server.base_url + "/get_server_info", headers=HEADERS, timeout=5).json()
    assert info["max_total_token_num"] == 30000 and info["tool_call_parser"] == "qwen25"


def test_flush_cache_empties_the_prefix_cache(client, smol_server):
    system = "You answer in one word. " + " ".join(f"Fact {i}: the sky is blue." for i in range(40))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Colour?"}]
    client.chat.completions.create(model="m", messages=messages, max_tokens=2, temperature=0)
    flushed = requests.post(smol_server.base_url + "/flush_cache", headers=HEADERS, timeout=30)
    assert flushed.status_code == 200 and flushed.json()["freed_tokens"] > 0
    again = client.chat.completions.create(model="m", messages=messages, max_tokens=2, temperature=0)
    details = again.usage.prompt_tokens_details
    assert details is None or details.cached_tokens == 0  # nothing left to reuse
    warm = client.chat.completions.create(model="m", messages=messages, max_tokens=2, temperature=0)
    assert warm.usage.prompt_tokens_details.cached_tokens > 0  # and the cache fills again


def test_speculative_drafts_on_copying_answers_without_changing_them(client, smol_server):
    """Prompt lookup is on by default for a single stream: an answer that repeats the prompt drafts from it,
    and streamed text (drafted the same way) equals the plain answer."""
    def counters() -> tuple[float, float]:
        text = requests.get(smol_server.base_url + "/metrics", timeout=10).text
        values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("lightllm_spec_"))
        return float(values["lightllm_spec_draft_tokens_total"]), float(values["lightllm_spec_accepted_tokens_total"])

    code = "def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n    " \
           "return 2 * (width + height)\n"
    messages = [{"role": "user", "content": f"Repeat this code exactly:\n{code}"}]
    before = counters()
    plain = client.chat.completions.create(model="m", messages=messages, max_tokens=60, temperature=0)
    after = counters()
    assert after[0] > before[0] and after[1] > before[1]  # drafted from the prompt, some accepted
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=60, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == plain.choices[0].message.content
