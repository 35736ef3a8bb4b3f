"""Tokenizer and chat template loading (HF files or GGUF metadata), plus incremental detokenization."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightllm.models.paths import find_gguf_file

logger = logging.getLogger(__name__)

# End-of-generation tokens many chat models use besides their declared EOS (llama.cpp's EOG set).
_END_OF_GENERATION_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "</s>")


def load_tokenizer(model_path: str | Path, chat_template_file: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    gguf = find_gguf_file(model_path)
    if gguf is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
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
