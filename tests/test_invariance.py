"""Same answer under any load: a request's greedy tokens, their logprobs to the last bit and its seeded sampled
tokens do not depend on the other requests of a step, the step's row count, chunked-prefill boundaries,
prefix-cache hits, speculative drafting, or preemption and recompute.

The default path of the embedded SmolLM2 GGUF (its quantized weights, fp16 KV cache): every linear runs one
stored form whose output rows depend on their input rows only, and prefill and decode attention reduce each
query row over the same 16-key blocks in the same order. Logprobs are compared as the floats the server
returns (a float32 value survives JSON exactly)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from lightllm.kernels import cpu as cpu_kernels
from tests.conftest import ServerProcess, embedded_model_path

_kernels = cpu_kernels.load()
pytestmark = pytest.mark.skipif(
    _kernels is None or not (_kernels.tiled_fast and _kernels.has_prefill_attention),
    reason="invariance is guaranteed on AVX512-VNNI CPUs (row-local tiles, fixed-block attention kernels)")

PROBE = "Write a Python function that tells whether a number is prime, and explain how it works."
# other lengths, so the probe shares steps with prefills and decodes of every size
CROWD = ["Hi", "List three colours.", "Tell me a long story about a dragon who learns to cook " * 3,
         "def add(a, b):", "Translate 'good morning' into French, Spanish and German, one per line.",
         "What is 17 * 23? Show the steps.", "Summarise the plot of Hamlet in two sentences. " * 4,
         "Write a haiku about the sea.", "Explain recursion to a child.", "1, 2, 3, 4,",
         "Name the planets of the solar system in order from the Sun.", "Why is the sky blue?"]
# a prompt whose answer copies from it, so prompt-lookup drafting proposes tokens the model accepts
COPY = ("Repeat this code exactly:\ndef area(width, height):\n    return width * height\n\n"
        "def perimeter(width, height):\n    return 2 * (width + height)\n")
GREEDY = {"do_sample": False, "max_new_tokens": 24, "ignore_eos": True}
SEEDED = {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "seed": 4321, "max_new_tokens": 24, "ignore_eos": True}


def ask(server: ServerProcess, prompt: str | list[int], params: dict) -> list[tuple[int, float]]:
    body = {"inputs": prompt, "parameters": {**params, "return_details": True}}
    response = requests.post(server.base_url + "/generate", json=body, timeout=600)
    assert response.status_code == 200, response.text
    return [(t["id"], t["logprob"]) for t in response.json()["tokens"][0]]


def accepted_drafts(server: ServerProcess) -> float:
    text = requests.get(server.base_url + "/metrics", timeout=10).text
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith("lightllm_spec_accepted_tokens_total")))


def ask_text(server: ServerProcess, prompt: str, params: dict) -> str:
    """Without details: a greedy request that asks for no logprobs may draft (prompt lookup)."""
    response = requests.post(server.base_url + "/generate", json={"inputs": prompt, "parameters": params}, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"][0]


def ask_in_crowd(server: ServerProcess, params: dict) -> list[tuple[int, float]]:
    """The probe sent in the middle of concurrent requests of other lengths (some prefilling with it, some
    decoding)."""
    crowd_params = {"do_sample": False, "max_new_tokens": 32, "ignore_eos": True}
    with ThreadPoolExecutor(len(CROWD) + 1) as pool:
        first = [pool.submit(ask, server, p, crowd_params) for p in CROWD[:6]]
        probe = pool.submit(ask, server, PROBE, params)
        rest = [pool.submit(ask, server, p, crowd_params) for p in CROWD[6:]]
        for f in first + rest:
            f.result()
        return probe.result()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The default server (prefix cache, 512-token chunks, prompt-lookup drafting for a lone decode) and one
    with 16-token prefill chunks, no drafting and no prefix cache."""
    logs = tmp_path_factory.mktemp("invariance")
    default = ServerProcess(["--model_dir", "smollm2", "--max_total_token_num", "8192", "--spec_ngram_tokens", "5"],
                            logs / "default.log")
    try:
        other = ServerProcess(["--model_dir", "smollm2", "--max_total_token_num", "8192", "--chunked_prefill_size",
                               "16", "--spec_ngram_tokens", "0", "--disable_dynamic_prompt_cache"], logs / "other.log")
    except Exception:
        default.stop()
        raise
    yield default, other
    other.stop()
    default.stop()


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_probe_is_identical_alone_in_a_crowd_after_a_cache_hit_in_small_chunks_and_without_drafting(servers, params):
    default, other = servers
    info = requests.get(default.base_url + "/get_server_info", timeout=10).json()
    assert (info["act_levels"], info["dense_bf16_min_rows"]) == (1, 0)  # the defaults: one form, one level
    alone = ask(default, PROBE, params)
    assert len(alone) == 24 and all(lp is not None for _, lp in alone)
    assert ask_in_crowd(default, params) == alone
    assert ask(default, PROBE, params) == alone  # the prompt is now in the prefix cache
    assert ask(other, PROBE, params) == alone  # 16-token chunks, no drafting, no cache
    assert ask_in_crowd(other, params) == alone
    if params is GREEDY:  # drafting (the default server, one stream, greedy without logprobs) against none
        before = accepted_drafts(default)
        assert ask_text(default, COPY, params) == ask_text(other, COPY, params)
        assert accepted_drafts(default) > before  # the drafts did take part


def test_tokens_computed_by_decode_steps_equal_the_same_tokens_prefilled(servers):
    """A prompt made of a probe and the first half of its own greedy answer: its continuation is the second
    half, bit for bit, whether the answer's KV comes from the prefix cache (written by decode steps) or is
    prefilled in 16-token chunks."""
    default, other = servers
    probe_ids = [504, 3120, 282, 253, 1820, 28, 2593, 1535, 30, 4064, 2443, 314, 253, 3446, 17, 216] * 3
    answer = ask(default, probe_ids, {**GREEDY, "max_new_tokens": 32})
    prompt = probe_ids + [token for token, _ in answer[:16]]
    for server in (default, other):
        assert ask(server, prompt, {**GREEDY, "max_new_tokens": 16}) == answer[16:]


def test_preemption_and_recompute_leave_the_answer_unchanged():
    """In the engine: a KV budget too small for the crowd preempts requests, which recompute their prompt and
    output as a prefill later; every request's tokens and logprobs equal its run alone."""
    from lightllm.engine.engine import Engine
    from lightllm.engine.protocol import AddRequest, EngineConfig, SamplingParams

    engine = Engine(EngineConfig(model_path=embedded_model_path(), max_total_token_num=256, grammar_backend="none",
                                 router_max_new_token_len=4, running_max_req_size=8))
    prompts = [list(range(300 + 7 * i, 330 + 9 * i)) for i in range(5)]

    def run(ids: list[int]) -> dict[str, list[tuple[int, float]]]:
        for i in ids:
            engine.add_request(AddRequest(f"r{i}-{len(ids)}", prompts[i],
                                          SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True,
                                                         logprobs=0)))
        out: dict[str, list[tuple[int, float]]] = {}
        finished = 0
        while finished < len(ids):
            for o in engine.step():
                assert o.error is None, o.error
                out.setdefault(o.rid.split("-")[0], []).append((o.token_id, o.logprob))
                finished += o.finished
        return out

    alone = {}
    for i in range(len(prompts)):
        alone.update(run([i]))
    assert engine.scheduler.num_preemptions == 0
    together = run(list(range(len(prompts))))
    assert engine.scheduler.num_preemptions > 0
    assert together == alone


@pytest.mark.qwen
def test_tensor_parallel_probe_is_identical_alone_and_in_a_crowd(tmp_path):
    """Two ranks (Qwen2.5-Coder-0.5B's heads split in two; SmolLM2's 9 heads do not split) against themselves:
    each rank's rows are row-local as above, and the all-reduce adds two partial sums (order-free)."""
    from lightllm.models.loading.catalog import ModelUnavailable, resolve_model
    from tests.conftest import free_port
    from tests.model_fetch import model_unavailable

    try:
        model = resolve_model("qwen2.5-coder")
    except ModelUnavailable as exc:
        model_unavailable(f"Qwen2.5-Coder unavailable: {exc}")
    server = ServerProcess(["--model_dir", model, "--max_total_token_num", "4096", "--tp", "2", "--nccl_port",
                            str(free_port())], tmp_path / "tp2.log")
    try:
        alone = ask(server, PROBE, GREEDY)
        assert ask_in_crowd(server, GREEDY) == alone
        assert ask(server, PROBE, GREEDY) == alone  # prefix-cache hit
    finally:
        server.stop()
