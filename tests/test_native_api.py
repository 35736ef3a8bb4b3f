"""The native LightLLM API end to end on the embedded SmolLM2 model."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import API_KEY, ServerProcess, embedded_model_path

AUTH = {"Authorization": f"Bearer {API_KEY}"}  # smol_server runs with --api_key; a server without one ignores it

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def generate(base_url: str, inputs, **parameters) -> dict:
    parameters.setdefault("max_new_tokens", 16)
    r = requests.post(base_url + "/generate", json={"inputs": inputs, "parameters": parameters}, headers=AUTH,
                      timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def transformers_greedy() -> list[tuple[list[int], list[int]]]:
    """(prompt ids, 20 greedy tokens) for PROMPTS from transformers loading the embedded GGUF in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(embedded_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    cases = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
        cases.append((ids, ref))
    return cases


def assert_greedy_matches(base_url: str, cases: list[tuple[list[int], list[int]]]) -> None:
    for ids, ref in cases:
        body = generate(base_url, ids, max_new_tokens=20, ignore_eos=True, return_details=True)
        ours = [t["id"] for t in body["tokens"][0]]
        assert ours == ref, (ids, ours, ref)
        assert body["count_output_tokens"] == 20 and body["finish_reason"] == "length"


def test_greedy_matches_transformers_generate(smol_server, transformers_greedy):
    assert_greedy_matches(smol_server.base_url, transformers_greedy)


def test_quantized_path_with_two_activation_levels_matches_transformers(tmp_path, transformers_greedy):
    """The default GGUF path keeps the file's exact weights (tiled kernel); with its activations in two int8
    levels on every call (--act_levels 2, prefill included) it decodes greedily as the fp32
    model does, where one level (llama.cpp's precision) leaves it at near-ties."""
    from lightllm.kernels import cpu as cpu_kernels

    kernels = cpu_kernels.load()
    if kernels is None or not kernels.tiled_fast:
        pytest.skip("the tiled kernel (and its activation levels) runs on AVX512-VNNI CPUs only")
    server = ServerProcess(["--model_dir", "smollm2", "--max_total_token_num", "4096", "--act_levels", "2"],
                           tmp_path / "server.log")
    try:
        assert_greedy_matches(server.base_url, transformers_greedy)
    finally:
        server.stop()


def test_generate_shape_and_stream(smol_server):
    body = generate(smol_server.base_url, "Hello, my name is", max_new_tokens=8)
    assert set(body) >= {"generated_text", "count_output_tokens", "finish_reason", "prompt_tokens"}
    assert isinstance(body["generated_text"], list) and isinstance(body["generated_text"][0], str)
    r = requests.post(smol_server.base_url + "/generate_stream",
                      json={"inputs": "Hello, my name is", "parameters": {"max_new_tokens": 8}}, stream=True, timeout=60,
                      headers=AUTH)
    events = [json.loads(line[5:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data:")]
    assert len(events) == body["count_output_tokens"]
    assert all(e["token"]["id"] is not None for e in events)
    assert events[-1]["finished"] and not any(e["finished"] for e in events[:-1])
    assert "".join(e["token"]["text"] for e in events) == body["generated_text"][0]
    assert events[-1]["generated_text"] == body["generated_text"][0]


def test_sampling_seed_reproducible_and_stop_sequences(smol_server):
    params = dict(do_sample=True, temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_new_tokens=24)
    first = generate(smol_server.base_url, "Write a short poem about the sea.", **params)
    second = generate(smol_server.base_url, "Write a short poem about the sea.", **params)
    assert first["generated_text"] == second["generated_text"]
    greedy = generate(smol_server.base_url, "The capital of France is", max_new_tokens=20)["generated_text"][0]
    stop = greedy.strip().split()[1]
    stopped = generate(smol_server.base_url, "The capital of France is", max_new_tokens=20, stop_sequences=[stop])
    assert stopped["finish_reason"] == "stop"
    assert stopped["generated_text"][0] == greedy[:greedy.index(stop)]


def test_concurrent_requests_match_solo_and_free_kv(smol_server):
    url = smol_server.base_url
    cases = [(f"Question {i}: tell me something about the number {i * 7}." + " Please" * (i % 5), 4 + (i * 3) % 20)
             for i in range(16)]
    solo = [generate(url, p, max_new_tokens=n)["generated_text"][0] for p, n in cases]

    def staggered(i):
        time.sleep(0.05 * i)  # arrive while earlier ones are running
        p, n = cases[i]
        return generate(url, p, max_new_tokens=n)["generated_text"][0]

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(staggered, range(16)))
    assert together == solo
    load = smol_server.wait_idle()
    assert load["kv_used_by_requests"] == 0 and load["running"] == 0


def test_client_disconnect_aborts_and_frees_kv(smol_server):
    url = smol_server.base_url
    r = requests.post(url + "/generate_stream", json={"inputs": "Count from one to a thousand:",
                                                      "parameters": {"max_new_tokens": 2000, "ignore_eos": True}},
                      stream=True, timeout=60, headers=AUTH)
    lines = r.iter_lines()
    got = 0
    for line in lines:
        if line.startswith(b"data:"):
            got += 1
            if got == 3:
                break
    assert smol_server.token_load()["running"] == 1
    r.close()
    load = smol_server.wait_idle(timeout=20)
    assert load["running"] == 0 and load["kv_used_by_requests"] == 0


def test_bad_requests_get_400_and_server_keeps_serving(smol_server):
    url = smol_server.base_url
    r = requests.post(url + "/generate", data=b"{not json", headers={"Content-Type": "application/json", **AUTH},
                      timeout=10)
    assert r.status_code == 400 and "error" in r.json()
    too_long = "hello " * 5000
    r = requests.post(url + "/generate", json={"inputs": too_long, "parameters": {"max_new_tokens": 4}}, headers=AUTH,
                      timeout=30)
    assert r.status_code == 400
    assert "4096" in r.json()["error"]["message"]
    r = requests.post(url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": -1}}, headers=AUTH,
                      timeout=10)
    assert r.status_code == 400
    assert requests.get(url + "/health", timeout=5).json() == {"message": "Ok"}
    assert generate(url, "Hello", max_new_tokens=4)["count_output_tokens"] == 4



def test_stop_sequence_limit_is_the_one_the_other_apis_use(smol_server):
    """16 stop sequences (server/limits.py, as OpenAI's and Anthropic's routes allow) are served; 17 are refused."""
    from lightllm.server.limits import MAX_STOP_SEQUENCES

    stops = [f"@@{i}@@" for i in range(MAX_STOP_SEQUENCES)]
    assert MAX_STOP_SEQUENCES == 16
    assert generate(smol_server.base_url, "Hello", max_new_tokens=2, stop_sequences=stops)["count_output_tokens"] == 2
    r = requests.post(smol_server.base_url + "/generate", headers=AUTH, timeout=30,
                      json={"inputs": "Hello", "parameters": {"max_new_tokens": 2, "stop_sequences": stops + ["@@x@@"]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "parameters.stop_sequences"
    assert "at most 16" in r.json()["error"]["message"]

def test_info_routes(smol_server):
    url = smol_server.base_url
    assert requests.post(url + "/tokens", json={"text": "hello world"}, headers=AUTH, timeout=5).json()["ntokens"] == 2
    assert "SmolLM2" in requests.get(url + "/get_model_name", headers=AUTH, timeout=5).json()["model_name"]
    metrics = requests.get(url + "/metrics", timeout=5).text
    assert "lightllm_kv_cache_total_tokens 30000.0" in metrics


@pytest.mark.slow
def test_chinese_streams_without_broken_characters(smol_server):
    r = requests.post(smol_server.base_url + "/generate_stream",
                      json={"inputs": "<|im_start|>user\n用中文写一句话<|im_end|>\n<|im_start|>assistant\n",
                            "parameters": {"max_new_tokens": 40}}, stream=True, timeout=60, headers=AUTH)
    texts = [json.loads(l[5:])["token"]["text"] for l in r.iter_lines(decode_unicode=True) if l.startswith("data:")]
    assert all("\ufffd" not in t for t in texts)
