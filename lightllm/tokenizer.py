"""Tokenizer and chat template loading (HF files or GGUF metadata), plus incremental detokenization."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lightllm.host import cache_dir
from lightllm.models.loading.paths import find_gguf_file

logger = logging.getLogger(__name__)

# End-of-generation tokens many chat models use besides their declared EOS (llama.cpp's EOG set).
_END_OF_GENERATION_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "</s>")


def _gguf_tokenizer_cache(gguf: Path) -> Path:
    """Where the HF tokenizer converted from this GGUF file is kept (keyed by path, size and mtime)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir("tokenizers", f"{gguf.stem}-{key}")


def _load_gguf_tokenizer(gguf: Path):
    """Converting a GGUF vocabulary to a fast tokenizer takes seconds (6 s for SmolLM2's 49k), so the
    result is saved once and later starts (and the engine process) load the saved files. They load as the
    generic fast tokenizer: AutoTokenizer would resolve the same Rust tokenizer through transformers' model
    configuration modules, which import PyTorch (seconds and ~200 MB more in the API process)."""
    from transformers import PreTrainedTokenizerFast

    cache = _gguf_tokenizer_cache(gguf)
    if (cache / "tokenizer_config.json").exists():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(cache))
        except (OSError, ValueError) as exc:
            logger.warning("cached tokenizer %s unusable (%s); converting again", cache, exc)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=cache.name + "."))
        tokenizer.save_pretrained(str(staging))
        try:
            os.rename(staging, cache)  # atomic; loses harmlessly to a process that got there first
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:  # a read-only home only costs the conversion next time
        logger.warning("could not cache the converted tokenizer in %s: %s", cache, exc)
    return tokenizer


def load_tokenizer(model_path: str | Path, chat_template_file: str | None = None, trust_remote_code: bool = False,
                   mode: str = "fast"):
    """mode: `fast` / `auto` take the Rust tokenizer (auto falls back to a slow one where only that exists),
    `slow` the Python one; GGUF vocabularies convert to fast tokenizers only."""
    gguf = find_gguf_file(model_path)
    if gguf is not None:
        if mode == "slow":
            raise ValueError("--tokenizer_mode slow is not available for GGUF files (their vocabulary converts to a "
                             "fast tokenizer); use fast or auto")
        tokenizer = _load_gguf_tokenizer(gguf)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code,
                                                  use_fast=mode != "slow")
        if mode == "fast" and not tokenizer.is_fast:
            raise ValueError(f"{model_path} has no fast tokenizer; start with --tokenizer_mode auto or slow")
    if chat_template_file:
        tokenizer.chat_template = Path(chat_template_file).read_text()
    return tokenizer


def end_of_generation_ids(tokenizer: Any) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in _END_OF_GENERATION_TOKENS if t in vocab]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character.

    Decodes a short window (prefix_offset..end) and emits only what extends the previous window's text,
    holding back while the tail is an incomplete byte sequence (decoded as U+FFFD).
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-4:])
        self.ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(context)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end, minus a character cut off by the end of generation."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        tail = full_text[len(prefix_text):] if len(full_text) > len(prefix_text) else ""
        return tail.rstrip("\ufffd")
