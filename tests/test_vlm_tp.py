"""Images under tensor parallelism: the vision encoder runs on rank 0 and each step's image rows travel to the
other rank with the step's inputs, so a tiny LLaVA (and its GGUF + mmproj form) with --tp 2 (gloo on CPU) gives
the logits and greedy tokens of --tp 1 for prompts with one and two images, batched with a text-only one, with
7-token prefill chunks cutting through the images."""

from __future__ import annotations

import pytest
import torch

from lightllm.engine.engine import Engine
from lightllm.engine.protocol import EngineConfig
from tests.conftest import free_port
from tests.test_vlm_model import PROMPTS, _run
from tests.vlm_models import build_tiny_llava


def _engine(model_path, **kwargs) -> Engine:
    return Engine(EngineConfig(model_path=str(model_path), kv_cache_dtype="fp32", quant_type="none",
                               spec_ngram_tokens=0, max_total_token_num=2048, chunked_prefill_size=7,
                               batch_max_tokens=14, **kwargs))


def _tp2_equals_tp1(model_path, **kwargs) -> None:
    tokens_1, logits_1, _ = _run(_engine(model_path, **kwargs), PROMPTS)
    engine = _engine(model_path, tp=2, nccl_port=free_port(), **kwargs)
    try:
        assert engine.model.config.num_heads == 2  # rank 0 holds half the heads: the other half ran elsewhere
        tokens_2, logits_2, _ = _run(engine, PROMPTS)
        assert engine.images.stats["encoded"] == 2  # rank 0's encoder, once per image
    finally:
        engine.shutdown()
    assert all(proc.poll() is not None for proc in engine.workers)
    assert tokens_2 == tokens_1
    for rid in PROMPTS:  # only the order of the partial sums differs
        torch.testing.assert_close(torch.stack(logits_2[rid]), torch.stack(logits_1[rid]), atol=1e-5, rtol=1e-5)


def test_tp2_with_images_equals_tp1(tmp_path):
    _tp2_equals_tp1(build_tiny_llava(tmp_path / "llava"))


@pytest.mark.slow
def test_tp2_gguf_llava_with_mmproj_equals_tp1(tmp_path):
    from tests.test_vlm_mmproj import IMAGE, _vocab, write_lm_gguf, write_mmproj

    model_dir = build_tiny_llava(tmp_path / "llava")
    lm = write_lm_gguf(model_dir, tmp_path / "tiny-llava.gguf", _vocab(300, IMAGE))
    _tp2_equals_tp1(lm, mmproj=str(write_mmproj(model_dir, tmp_path / "mmproj.gguf")))


@pytest.mark.slow
def test_tp2_server_chat_with_images_equals_transformers(tmp_path):
    """End to end: a server with --tp 2 answers a chat with two images as transformers' generate does."""
    from lightllm.tokenizer import load_tokenizer
    from tests.conftest import ServerProcess, embedded_model_path
    from tests.test_vlm_api import _expected
    from tests.vlm_models import GREEDY, data_url, draw_png, openai_client as _client

    tokenizer = load_tokenizer(embedded_model_path())
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    model_dir = build_tiny_llava(tmp_path / "model", vocab_size=len(tokenizer) + 1,  # even: it splits two ways
                                 image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(model_dir)
    first, second = draw_png(4), draw_png(5, size=(100, 90))
    _, text = _expected(model_dir, tokenizer, [{"role": "user", "content": "<image>and<image>differ how?"}],
                        [first, second])
    server = ServerProcess(["--model_dir", str(model_dir), "--tp", "2", "--nccl_port", str(free_port()),
                            "--max_total_token_num", "4000", "--quant_type", "none", "--kv_cache_dtype", "fp32",
                            "--chunked_prefill_size", "7"], tmp_path / "server.log")
    try:
        reply = _client(server).chat.completions.create(model="m", **GREEDY, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(first)}}, {"type": "text", "text": "and"},
            {"type": "image_url", "image_url": {"url": data_url(second)}}, {"type": "text", "text": "differ how?"}]}])
        assert reply.choices[0].message.content == text and text
    finally:
        server.stop()
