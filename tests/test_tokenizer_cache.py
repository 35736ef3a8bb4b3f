"""The tokenizer converted from a GGUF file is cached on disk; the cached copy must behave identically."""

from __future__ import annotations

from pathlib import Path

from lightllm.tokenizer import _gguf_tokenizer_cache, load_tokenizer
from tests.conftest import embedded_model_path

TEXTS = ["Hello world", " leading space", "Héllo 北京 😀\n\n  x", "<|im_start|>user\nhi<|im_end|>", "a\tb  \n"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 北京 <tool_call> 😀"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}]


def test_cached_gguf_tokenizer_matches_fresh_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTLLM_CACHE_DIR", str(tmp_path))
    gguf = Path(embedded_model_path())
    fresh = load_tokenizer(gguf)
    cache = _gguf_tokenizer_cache(gguf)
    assert (cache / "tokenizer_config.json").exists() and str(cache).startswith(str(tmp_path))
    cached = load_tokenizer(gguf)
    for text in TEXTS:
        assert cached.encode(text) == fresh.encode(text)
    ids = fresh.encode(TEXTS[2])
    assert cached.decode(ids) == fresh.decode(ids)
    assert (cached.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
            == fresh.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True))
    assert (cached.eos_token_id, cached.bos_token_id, len(cached)) == (fresh.eos_token_id, fresh.bos_token_id, len(fresh))
    assert cached.get_vocab() == fresh.get_vocab()
    assert not [p for p in cache.parent.iterdir() if p != cache]  # no staging directories left behind
