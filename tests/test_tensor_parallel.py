"""Tensor parallelism: tp=2 against tp=1, in the engine (tiny models of several families) and end to end
through HTTP (Qwen2.5-Coder-0.5B's GGUF, quantized as served; two nodes on loopback)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests
import torch

from tests.conftest import REPO, ServerProcess, build_tiny_model, embedded_model_path, free_port, \
    run_engine_recording_logits
from tests.model_fetch import model_unavailable
from tests.test_numerics import PROMPTS


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "qwen3moe", "phi3"])
def test_tp2_logits_equal_tp1(arch, tmp_path):
    model_dir = build_tiny_model(tmp_path / arch, arch)
    _, tokens_1, logits_1 = run_engine_recording_logits(model_dir, PROMPTS, chunked_prefill_size=4)
    engine, tokens_2, logits_2 = run_engine_recording_logits(model_dir, PROMPTS, chunked_prefill_size=4, tp=2,
                                                             nccl_port=free_port())
    try:
        assert engine.model.config.num_heads == 2 and engine.pool.k[0].shape[1] == 1  # half the heads, KV heads
        assert tokens_2 == tokens_1
        for rid in logits_1:  # only the order of the partial sums differs
            torch.testing.assert_close(torch.stack(logits_2[rid]), torch.stack(logits_1[rid]), atol=1e-5, rtol=1e-5)
    finally:
        engine.shutdown()
    assert all(proc.poll() is not None for proc in engine.workers)  # the worker rank exited


def test_model_that_cannot_split_fails_at_start_naming_why():
    out = subprocess.run([sys.executable, "-m", "lightllm.server.api_server", "--model_dir", "smollm2", "--tp", "2",
                          "--port", str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode != 0
    assert "num_attention_heads 9 is not divisible by 2" in out.stdout + out.stderr


def test_tp_flags_are_validated():
    for flags, message in ((["--tp", "3", "--nnodes", "2"], "multiple of --nnodes"),
                           (["--nnodes", "2", "--tp", "2", "--node_rank", "2"], "--node_rank 2")):
        out = subprocess.run([sys.executable, "-m", "lightllm.server.api_server", *flags], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and message in out.stderr


def _greedy(server: ServerProcess, prompts: list[str], n: int = 24) -> list[list[int]]:
    results = []
    for prompt in prompts:
        body = {"inputs": prompt, "parameters": {"do_sample": False, "max_new_tokens": n, "ignore_eos": True,
                                                 "return_details": True}}
        response = requests.post(server.base_url + "/generate", json=body, timeout=300)
        assert response.status_code == 200, response.text
        results.append([t["id"] for t in response.json()["tokens"][0]])
    return results


TEXT_PROMPTS = ["def fibonacci(n):", "The three primary colours are", "Q: What is the capital of Italy?\nA:"]


def _qwen_coder() -> str:
    from lightllm.models.loading.catalog import ModelUnavailable, resolve_model

    try:
        return resolve_model("qwen2.5-coder")
    except ModelUnavailable as exc:
        model_unavailable(f"Qwen2.5-Coder unavailable: {exc}")


@pytest.mark.slow
@pytest.mark.qwen
def test_tp2_server_matches_tp1_on_qwen_coder(tmp_path):
    """The served default model split over two ranks gives the same greedy tokens at the same precision:
    its GGUF weights read exactly, fp32 (the quantized kernels hand back bf16 partial sums, whose rounding
    differs once the row-parallel layers are split, so there near-ties may flip)."""
    model = _qwen_coder()
    common = ["--model_dir", model, "--max_total_token_num", "2048", "--quant_type", "none", "--kv_cache_dtype", "fp32"]
    single = ServerProcess(common, tmp_path / "tp1.log")
    try:
        expected = _greedy(single, TEXT_PROMPTS)
    finally:
        single.stop()
    split = ServerProcess([*common, "--tp", "2", "--nccl_port", str(free_port())], tmp_path / "tp2.log")
    try:
        assert requests.get(split.base_url + "/get_server_info", timeout=10).json()["tp"] == 2
        assert _greedy(split, TEXT_PROMPTS) == expected
    finally:
        split.stop()


def test_two_nodes_on_loopback_match_tp1(tmp_path):
    """`--nnodes 2`: node 0 serves HTTP with rank 0, a second process (node 1) runs rank 1 only."""
    from lightllm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(embedded_model_path())
    model_dir = build_tiny_model(tmp_path / "model", "llama", vocab_size=len(tokenizer),
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(model_dir)
    common = ["--model_dir", str(model_dir), "--max_total_token_num", "2000"]
    single = ServerProcess(common, tmp_path / "tp1.log")
    try:
        expected = _greedy(single, TEXT_PROMPTS)
    finally:
        single.stop()
    port = free_port()
    group = ["--tp", "2", "--nnodes", "2", "--nccl_host", "127.0.0.1", "--nccl_port", str(port)]
    with open(tmp_path / "node1.log", "w") as log:
        node1 = subprocess.Popen([sys.executable, "-m", "lightllm.server.api_server", *common, *group,
                                  "--node_rank", "1"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        node0 = ServerProcess([*common, *group, "--node_rank", "0"], tmp_path / "node0.log")
        try:
            assert _greedy(node0, TEXT_PROMPTS) == expected
        finally:
            node0.stop()
        assert node1.wait(timeout=60) == 0, (tmp_path / "node1.log").read_text()[-3000:]  # ends with node 0
    finally:
        if node1.poll() is None:
            node1.kill()
