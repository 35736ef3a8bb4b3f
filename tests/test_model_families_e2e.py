"""Each model family served end to end: a tiny random checkpoint (built with transformers, the SmolLM2
tokenizer's vocabulary) behind a real server; greedy tokens from `/generate` equal transformers' `generate`."""

from __future__ import annotations

import pytest
import requests
import torch

from tests.conftest import ServerProcess, build_tiny_model, embedded_model_path
from tests.test_numerics import _GGUF_GEMMA3

PROMPTS = [[504, 3458, 314, 260, 1345, 30], [19, 5678, 902, 44, 1000, 2048, 7, 7, 31, 12000, 5, 87]]
NEW_TOKENS = 16
FAMILIES = {  # family -> config overrides
    "gemma2": dict(tie_word_embeddings=True),
    "gemma3": _GGUF_GEMMA3,
    "phi3": dict(tie_word_embeddings=False),
    "mixtral": dict(tie_word_embeddings=False),
    "qwen3moe": dict(tie_word_embeddings=False),
}


def _served_tokens(server: ServerProcess, prompt: list[int]) -> list[int]:
    body = {"inputs": prompt, "parameters": {"do_sample": False, "max_new_tokens": NEW_TOKENS, "ignore_eos": True,
                                             "return_details": True}}
    response = requests.post(server.base_url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["tokens"][0]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_equals_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from lightllm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(embedded_model_path())
    model_dir = build_tiny_model(tmp_path / "model", family, vocab_size=len(tokenizer),
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 **FAMILIES[family])
    tokenizer.save_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = []
    for prompt in PROMPTS:
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False)
        expected.append(out[0, len(prompt):].tolist())
    server = ServerProcess(["--model_dir", str(model_dir), "--max_total_token_num", "2000"], tmp_path / "server.log")
    try:
        info = requests.get(server.base_url + "/get_server_info", timeout=10).json()
        assert info["architecture"] == family  # read from the checkpoint
        assert [_served_tokens(server, p) for p in PROMPTS] == expected
    finally:
        server.stop()
