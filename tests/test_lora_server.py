"""LoRA adapters through a real server: selection by `model` on every route (and `lora` on /generate), the
/v1/models listing, dynamic load/unload behind the API key, eviction with --max_loras 1 and two adapters
alternating, the prefix cache kept per adapter, and every bad input (unknown names, bad adapters)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import openai
import pytest
import requests
import torch

from tests.conftest import API_KEY, ServerProcess, build_tiny_model, embedded_model_path, free_port
from tests.lora_helpers import build_adapter, merged_model
from tests.test_reliability_e2e import engine_pid, wait_health

PROMPT = [504, 3458, 314, 260, 1345, 30, 19, 5678]
NEW_TOKENS = 8
BASE = "tiny-base"


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A tiny Llama (SmolLM2's tokenizer) with adapters a0, a1 served from the start (--max_loras 1), a2 for
    dynamic loading, and two bad adapters; the greedy reference tokens of each model."""
    from lightllm.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("lora_server")
    tokenizer = load_tokenizer(embedded_model_path())
    base = build_tiny_model(root / "base", "llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    tokenizer.save_pretrained(base)
    adapters = {"a0": build_adapter(base, root / "a0", seed=1, r=8, alpha=16),
                "a1": build_adapter(base, root / "a1", seed=2, r=4, alpha=8, target_modules=["q_proj", "down_proj"]),
                "a2": build_adapter(base, root / "a2", seed=3, r=16, alpha=16, use_rslora=True)}
    bad = {"rank": build_adapter(base, root / "big", seed=4, r=32),
           "base": build_adapter(build_tiny_model(root / "other", "llama", hidden_size=96, vocab_size=len(tokenizer)),
                                 root / "other_lora", seed=5)}
    expected = {}
    for name, path in [(BASE, None), *adapters.items()]:
        out = merged_model(base, path).generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS,
                                                min_new_tokens=NEW_TOKENS, do_sample=False)
        expected[name] = out[0, len(PROMPT):].tolist()
    assert len({tuple(v) for v in expected.values()}) == 4  # every adapter changes the greedy output
    server = ServerProcess(["--model_dir", str(base), "--model_name", BASE, "--quant_type", "none",
                            "--max_total_token_num", "4000", "--api_key", API_KEY, "--max_loras", "1",
                            "--max_lora_rank", "16", "--lora_modules", f"a0={adapters['a0']}", f"a1={adapters['a1']}"],
                           root / "server.log")
    yield server, adapters, bad, expected, tokenizer
    server.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0)


def _completion_ids(server, model: str, prompt=PROMPT, max_tokens: int = NEW_TOKENS) -> list[int]:
    body = {"inputs": prompt, "parameters": {"do_sample": False, "max_new_tokens": max_tokens, "ignore_eos": True,
                                             "return_details": True}}
    if model != BASE:
        body["lora"] = model
    response = requests.post(server.base_url + "/generate", json=body, headers=server.headers, timeout=120)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["tokens"][0]]


def test_models_lists_adapters_with_their_parent(lora_setup):
    server, adapters, *_ = lora_setup
    cards = {m.id: m for m in _client(server).models.list().data}
    assert set(cards) == {BASE, "a0", "a1"}
    assert cards[BASE].parent is None
    assert cards["a0"].parent == BASE and cards["a0"].root == str(adapters["a0"])
    assert _client(server).models.retrieve("a1").parent == BASE


def test_model_selects_the_adapter_on_every_route(lora_setup):
    server, _, _, expected, tokenizer = lora_setup
    client = _client(server)
    for name in (BASE, "a0", "a1"):
        # completions with token ids: the text of the merged model's greedy tokens
        out = client.completions.create(model=name, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == tokenizer.decode(expected[name]), name
        assert out.model == name  # the response names the adapter (the base model's name for the base)
        assert _completion_ids(server, name) == expected[name]  # native /generate with its `lora` field
    # chat, Responses and Anthropic Messages reach the adapter too: the same rendered prompt gives the same
    # tokens through chat as through completions with the chat template applied
    messages = [{"role": "user", "content": "Say something"}]
    replies = {}
    for name in ("a0", "a1"):
        chat = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True})
        replies[name] = chat.choices[0].message.content
        assert chat.model == name
        resp = client.responses.create(model=name, input="Say something", max_output_tokens=6, temperature=0)
        assert resp.output_text == replies[name] and resp.model == name
        anth = requests.post(server.base_url + "/v1/messages", headers={"x-api-key": API_KEY},
                             json={"model": name, "max_tokens": 6, "temperature": 0, "messages": messages}, timeout=60)
        assert anth.status_code == 200, anth.text
        assert anth.json()["content"][0]["text"] == replies[name] and anth.json()["model"] == name
    assert replies["a0"] != replies["a1"]


def test_unknown_model_is_404_model_not_found_on_every_route(lora_setup):
    server = lora_setup[0]
    client = _client(server)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    anth = requests.post(server.base_url + "/v1/messages", headers={"x-api-key": API_KEY},
                         json={"model": "nope", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert anth.status_code == 404 and anth.json()["error"]["type"] == "not_found_error"
    native = requests.post(server.base_url + "/generate", headers=server.headers,
                           json={"inputs": "hi", "lora": "nope", "parameters": {"max_new_tokens": 2}})
    assert native.status_code == 404 and native.json()["error"]["code"] == "model_not_found"


def test_two_adapters_alternating_with_one_resident(lora_setup):
    """--max_loras 1: requests for a0 and a1 at once; each waits for its adapter and equals its merged model."""
    server, _, _, expected, _ = lora_setup
    order = ["a0", "a1", "a0", "a1", BASE, "a1"]
    with concurrent.futures.ThreadPoolExecutor(len(order)) as pool:
        results = list(pool.map(lambda name: _completion_ids(server, name), order))
    for name, ids in zip(order, results):
        assert ids == expected[name], name
    assert server.wait_idle()["running"] == 0
    metrics = requests.get(server.base_url + "/metrics", headers=server.headers, timeout=10).text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("lightllm_lora_")}
    assert values["lightllm_lora_resident_adapters"] == 1 and values["lightllm_lora_resident_bytes"] > 0
    assert values["lightllm_lora_evictions_total"] >= 1 and values["lightllm_lora_loads_total"] >= 3


def test_prefix_cache_is_not_shared_between_adapters(lora_setup):
    server = lora_setup[0]
    client = _client(server)
    prompt = list(range(700, 740))  # a prompt no other test sends
    first = client.completions.create(model=BASE, prompt=prompt, max_tokens=1, temperature=0)
    other = client.completions.create(model="a0", prompt=prompt, max_tokens=1, temperature=0)
    again = client.completions.create(model="a0", prompt=prompt, max_tokens=1, temperature=0)

    def cached(out):
        details = out.usage.prompt_tokens_details
        return details.cached_tokens if details is not None else 0

    assert cached(other) == 0  # the base model's KV of the same prompt is not the adapter's
    assert cached(again) > 0  # the adapter's own is reused
    assert first.choices[0].text is not None


def test_dynamic_load_and_unload(lora_setup):
    server, adapters, _, expected, _ = lora_setup
    url = server.base_url + "/v1/load_lora_adapter"
    body = {"lora_name": "a2", "lora_path": str(adapters["a2"])}
    assert requests.post(url, json=body, timeout=30).status_code == 401  # admin route: the key is needed
    loaded = requests.post(url, json=body, headers=server.headers, timeout=60)
    assert loaded.status_code == 200, loaded.text
    assert "a2" in {m.id for m in _client(server).models.list().data}
    assert _completion_ids(server, "a2") == expected["a2"]
    again = requests.post(url, json=body, headers=server.headers, timeout=60)
    assert again.status_code == 400 and again.json()["error"]["code"] == "lora_name_in_use"
    unload = server.base_url + "/v1/unload_lora_adapter"
    assert requests.post(unload, json={"lora_name": "a2"}, headers=server.headers, timeout=60).status_code == 200
    assert "a2" not in {m.id for m in _client(server).models.list().data}
    with pytest.raises(openai.NotFoundError):
        _client(server).completions.create(model="a2", prompt="hi", max_tokens=2)
    gone = requests.post(unload, json={"lora_name": "a2"}, headers=server.headers, timeout=60)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_bad_adapters_are_refused_with_400_and_the_server_keeps_serving(lora_setup, tmp_path):
    server, _, bad, expected, _ = lora_setup
    url = server.base_url + "/v1/load_lora_adapter"
    cases = [({"lora_name": "big", "lora_path": str(bad["rank"])}, "exceeds --max_lora_rank 16"),
             ({"lora_name": "other", "lora_path": str(bad["base"])}, "another base model"),
             ({"lora_name": "empty", "lora_path": str(tmp_path)}, "no adapter_config.json")]
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    cases.append(({"lora_name": "noweights", "lora_path": str(tmp_path / "config_only")},
                  "no adapter_model.safetensors"))
    for body, reason in cases:
        response = requests.post(url, json=body, headers=server.headers, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert reason in error["message"] and error["code"] == "invalid_lora_adapter"
    for body in ({"lora_name": "has space", "lora_path": "x"}, {"lora_name": "x"},
                 {"lora_name": BASE, "lora_path": "x"}):
        assert requests.post(url, json=body, headers=server.headers, timeout=30).status_code == 400
    assert {m.id for m in _client(server).models.list().data} == {BASE, "a0", "a1"}
    assert _completion_ids(server, BASE) == expected[BASE]


def test_unloading_lets_requests_in_flight_finish(lora_setup):
    server, adapters, _, _, _ = lora_setup
    loaded = requests.post(server.base_url + "/v1/load_lora_adapter", headers=server.headers, timeout=60,
                           json={"lora_name": "a2", "lora_path": str(adapters["a2"])})
    assert loaded.status_code == 200, loaded.text
    stream = _client(server).completions.create(model="a2", prompt=PROMPT, max_tokens=500, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    unloaded = requests.post(server.base_url + "/v1/unload_lora_adapter", json={"lora_name": "a2"},
                             headers=server.headers, timeout=60)
    assert unloaded.status_code == 200
    assert server.token_load()["running"] == 1  # still generating on the unloaded adapter
    rest = list(chunks)
    finish = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert len("".join(c.choices[0].text for c in [first, *rest] if c.choices)) > 0


def test_a_restarted_engine_serves_the_loaded_adapters(lora_setup):
    """The engine process dies: the one that replaces it registers the start adapters and the loaded ones."""
    server, adapters, _, expected, _ = lora_setup
    loaded = requests.post(server.base_url + "/v1/load_lora_adapter", headers=server.headers, timeout=60,
                           json={"lora_name": "a2", "lora_path": str(adapters["a2"])})
    assert loaded.status_code == 200, loaded.text
    old = engine_pid(server)
    os.kill(old, signal.SIGKILL)
    deadline = time.time() + 120
    while True:  # a new engine process, then ready again
        assert time.time() < deadline, "the engine was not restarted"
        try:
            if engine_pid(server) != old:
                break
        except AssertionError:  # none between the old one's death and the new one's start
            pass
        time.sleep(0.2)
    wait_health(server, 200, timeout=120)
    for name in ("a2", "a1", BASE):
        assert _completion_ids(server, name) == expected[name], name


def test_tp2_server_gives_the_tp1_servers_tokens_with_adapters(lora_setup, tmp_path):
    """--tp 2 with --lora_modules (each rank holds its shard of each adapter): the greedy tokens of the base and
    each adapter equal the --tp 1 server's, through the openai SDK and /generate; with --max_loras 1 and
    requests for two adapters at once (evicted and read again on both ranks in step), and after a dynamic load."""
    tp1, adapters, _, expected, _ = lora_setup
    base = adapters["a0"].parent / "base"
    tp2 = ServerProcess(["--model_dir", str(base), "--model_name", BASE, "--quant_type", "none",
                         "--max_total_token_num", "4000", "--api_key", API_KEY, "--max_loras", "1",
                         "--max_lora_rank", "16", "--lora_modules", f"a0={adapters['a0']}", f"a1={adapters['a1']}",
                         "--tp", "2", "--nccl_port", str(free_port())], tmp_path / "tp2.log")
    try:
        assert requests.get(tp2.base_url + "/get_server_info", headers=tp2.headers, timeout=10).json()["tp"] == 2
        for name in (BASE, "a0", "a1"):
            texts = [_client(server).completions.create(model=name, prompt=PROMPT, max_tokens=NEW_TOKENS,
                                                        temperature=0, extra_body={"ignore_eos": True}).choices[0].text
                     for server in (tp1, tp2)]
            assert texts[0] == texts[1], name
        order = ["a0", "a1", BASE, "a1", "a0"]
        with concurrent.futures.ThreadPoolExecutor(len(order)) as pool:
            results = list(pool.map(lambda name: _completion_ids(tp2, name), order))
        assert results == [expected[name] for name in order]  # what the tp 1 server gives (its tests check)
        for server in (tp1, tp2):  # a2 loaded on both (the tp 1 server may hold it from an earlier test)
            loaded = requests.post(server.base_url + "/v1/load_lora_adapter", headers=server.headers, timeout=60,
                                   json={"lora_name": "a2", "lora_path": str(adapters["a2"])})
            assert loaded.status_code == 200 or loaded.json()["error"]["code"] == "lora_name_in_use", loaded.text
        assert _completion_ids(tp2, "a2") == _completion_ids(tp1, "a2") == expected["a2"]
    finally:
        tp2.stop()


@pytest.mark.slow
def test_a_bad_adapter_at_start_fails_the_start_naming_it(lora_setup, tmp_path):
    _, _, bad, _, _ = lora_setup
    base = bad["rank"].parent / "base"
    with pytest.raises(RuntimeError, match="exceeds --max_lora_rank 16"):
        ServerProcess(["--model_dir", str(base), "--max_total_token_num", "1000", "--max_lora_rank", "16",
                       "--lora_modules", f"big={bad['rank']}"], tmp_path / "bad.log", timeout=180)
