"""OpenAI-compatible routes driven by the official SDK and by plain `requests` programs."""

from __future__ import annotations

import asyncio
import json
import threading

import openai
import pytest
import requests

from tests.conftest import API_KEY

HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(smol_server):
    return openai.OpenAI(base_url=smol_server.base_url + "/v1", api_key=API_KEY)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_models_list(client):
    models = client.models.list().data
    assert len(models) == 1 and models[0].object == "model" and "SmolLM2" in models[0].id


def test_documented_plain_chat_program(smol_server, model):
    data = {"model": model, "messages": [{"role": "user", "content": "你好，请介绍一下你自己"}],
            "temperature": 0.7, "max_tokens": 1000}
    response = requests.post(smol_server.base_url + "/v1/chat/completions", headers=HEADERS, json=data, timeout=300)
    body = response.json()
    assert response.status_code == 200, body
    assert isinstance(body["choices"][0]["message"]["content"], str) and body["choices"][0]["message"]["content"]
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_documented_streaming_program(smol_server, model):
    data = {"model": model, "messages": [{"role": "user", "content": "你好，请介绍一下你自己"}],
            "temperature": 0.7, "max_tokens": 200, "stream": True}
    response = requests.post(smol_server.base_url + "/v1/chat/completions", headers=HEADERS, json=data, stream=True,
                             timeout=300)
    pieces, done = [], False
    for line in response.iter_lines():
        if not line:
            continue
        line = line.decode("utf-8")
        if line.startswith("data: "):
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            content = chunk["choices"][0]["delta"].get("content")
            if content:
                pieces.append(content)
    assert done and pieces
    assert all("\ufffd" not in p for p in pieces)


def test_stream_equals_non_stream_greedy_chinese(client, model):
    messages = [{"role": "user", "content": "请用中文介绍一下北京。"}]
    plain = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=60)
    stream = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=60, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_n_logprobs_stop_seed(client, model):
    messages = [{"role": "user", "content": "Name three fruits."}]
    r = client.chat.completions.create(model=model, messages=messages, n=2, temperature=1.0, seed=7, max_tokens=30,
                                       logprobs=True, top_logprobs=3)
    assert [c.index for c in r.choices] == [0, 1]
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens // 2 or len(lp) > 0
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in lp)
    again = client.chat.completions.create(model=model, messages=messages, n=2, temperature=1.0, seed=7, max_tokens=30)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    greedy = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=30)
    word = greedy.choices[0].message.content.split()[2]
    stopped = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=30, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert word not in stopped.choices[0].message.content
    assert greedy.choices[0].message.content.startswith(stopped.choices[0].message.content)


def test_async_client_and_completions(smol_server, model):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=smol_server.base_url + "/v1", api_key=API_KEY)
        chat = await aclient.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi!"}],
                                                     max_tokens=10, temperature=0)
        texts = []
        async for chunk in await aclient.completions.create(model=model, prompt="The sky is", max_tokens=8,
                                                            temperature=0, stream=True):
            texts.append(chunk.choices[0].text)
        plain = await aclient.completions.create(model=model, prompt="The sky is", max_tokens=8, temperature=0,
                                                 logprobs=2)
        return chat, "".join(texts), plain

    chat, streamed, plain = asyncio.run(run())
    assert chat.choices[0].message.role == "assistant"
    assert streamed == plain.choices[0].text and plain.object == "text_completion"
    assert len(plain.choices[0].logprobs.tokens) == plain.usage.completion_tokens
    batch = openai.OpenAI(base_url=smol_server.base_url + "/v1", api_key=API_KEY).completions.create(
        model=model, prompt=["Hello", "Goodbye"], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]


BAD_REQUESTS = [
    ("wrong type", {"messages": "hello"}, 400),
    ("negative max_tokens", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400),
    ("n=0", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("empty messages", {"messages": []}, 400),
    ("temperature too high", {"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400),
    ("over-long prompt", {"messages": [{"role": "user", "content": "word " * 5000}]}, 400),
    ("too many tokens asked", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400),
]


def test_bad_input_table_while_a_request_runs(smol_server, model):
    url = smol_server.base_url + "/v1/chat/completions"
    result = {}

    def long_running():
        r = requests.post(url, headers=HEADERS, timeout=300, json={
            "model": model, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 120,
            "temperature": 0, "ignore_eos": True})
        result["status"], result["body"] = r.status_code, r.json()

    worker = threading.Thread(target=long_running)
    worker.start()
    for name, body, status in BAD_REQUESTS:
        r = requests.post(url, headers=HEADERS, json=body, timeout=30)
        assert r.status_code == status, (name, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], name
    r = requests.post(url, headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
                      data=b"{oops", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = requests.post(url, headers={"Authorization": "Bearer wrong"}, json={"messages": []}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = requests.get(smol_server.base_url + "/v1/nope", headers=HEADERS, timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    worker.join()
    assert result["status"] == 200 and result["body"]["usage"]["completion_tokens"] == 120


def test_sdk_raises_typed_errors(client, model):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    bad = openai.OpenAI(base_url=client.base_url, api_key="nope")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    """A second server that takes one request at a time and allows one CORS origin. It runs the default
    configuration (for the embedded GGUF: its int4 blocks, fp16 KV cache, fused CPU kernels)."""
    from tests.conftest import ServerProcess

    server = ServerProcess(["--model_dir", "smollm2", "--max_concurrent_requests", "1", "--cors_allow_origins", "http://app.example",
                            "--max_total_token_num", "4000"], tmp_path_factory.mktemp("logs") / "limited.log")
    yield server
    server.stop()


def test_overload_gets_503_and_cors_preflight(limited_server):
    url = limited_server.base_url + "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 150, "ignore_eos": True,
            "temperature": 0}
    first = requests.post(url, json=dict(body, stream=True), stream=True, timeout=120)
    lines = first.iter_lines()
    next(line for line in lines if b'"content"' in line and b'"role"' not in line)  # it is generating now
    assert limited_server.token_load()["inflight"] == 1
    busy = requests.post(url, json=body, timeout=30)
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert busy.json()["error"]["code"] == "server_overloaded"
    first.close()
    assert limited_server.wait_idle()["running"] == 0
    assert requests.post(url, json=dict(body, max_tokens=4), timeout=60).status_code == 200
    preflight = requests.options(url, headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"},
                                 timeout=10)
    assert preflight.headers.get("access-control-allow-origin") == "http://app.example"
    other = requests.options(url, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
                             timeout=10)
    assert other.headers.get("access-control-allow-origin") is None


def test_default_fast_path_answers_through_the_sdk(limited_server):
    """What `python -m lightllm.server.api_server` serves by default: quantized weights and kernels, plain and
    streamed, one request after another (the second reuses the first's prompt from the prefix cache)."""
    log = limited_server.log_path.read_text()
    from lightllm.kernels import cpu as cpu_kernels

    assert "quant_type=gguf" in log
    if cpu_kernels.load() is not None:
        assert "kv_cache_dtype=float16, fused CPU kernels on" in log
    client = openai.OpenAI(base_url=limited_server.base_url + "/v1", api_key="unused")
    # A question whose first greedy tokens win by a wide logit margin (>= 1.6) under every kernel/KV setting;
    # "What is the capital of France?" ties 'The' and 'L' within bf16 logit resolution on this model.
    messages = [{"role": "user", "content": "Name the capital city of Japan."}]
    plain = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=30)
    assert "Tokyo" in plain.choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="m", messages=messages, temperature=0, max_tokens=30, stream=True) if chunk.choices)
    assert "Tokyo" in streamed
    assert limited_server.wait_idle()["running"] == 0
