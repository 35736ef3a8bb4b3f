"""gguf_file.GgufFile reads what gguf's GGUFReader reads (metadata values, tensor types, shapes, bytes), from one
mapping of the file; its pages can be released and read again."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from lightllm.models.loading.catalog import smollm2_path
from lightllm.models.loading.gguf_file import GgufFile, GgufFormatError
from tests.test_gguf_quants import gguf_file  # noqa: F401  (the fixture: a file holding every tensor type)


def assert_same(path) -> None:
    ours, theirs = GgufFile(path), GGUFReader(str(path))
    assert list(ours.fields) == [k for k in theirs.fields if not k.startswith("GGUF.")]
    for key, field in ours.fields.items():
        expected = theirs.fields[key].contents()
        assert field.contents() == pytest.approx(expected) if isinstance(expected, float) else \
            field.contents() == expected, key
        if isinstance(expected, list):
            assert len(field.data) == len(theirs.fields[key].data) == len(expected), key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.tensor_type, a.shape.tolist(), a.n_bytes) == (b.name, b.tensor_type, b.shape.tolist(),
                                                                         b.n_bytes)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert a.data.tobytes() == np.asarray(b.data).tobytes(), a.name
        assert a.data.flags.writeable  # torch takes it without a copy


def test_every_tensor_type_reads_like_gguf(gguf_file):  # noqa: F811
    assert_same(gguf_file)


def test_a_real_model_reads_like_gguf_and_its_pages_come_back_after_release():
    path = smollm2_path()
    assert_same(path)
    ours = GgufFile(path)
    embed = next(t for t in ours.tensors if t.name == "token_embd.weight")
    before = embed.data[:4].copy()
    ours.release_pages()
    assert np.array_equal(embed.data[:4], before)
    tokens = ours.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == tokens.count == len(tokens.contents()) > 40000


def test_a_string_is_found_in_a_vocabulary_without_decoding_it_unless_it_is_there():
    tokens = GgufFile(smollm2_path()).fields["tokenizer.ggml.tokens"]
    vocab = tokens.contents()
    for index in (0, 1, 17, 20000, len(vocab) - 1):
        assert tokens.index_of(vocab[index]) == vocab.index(vocab[index])
    assert tokens.index_of("<image>") is None and "<image>" not in vocab
    # bytes that match across two neighbouring strings are not a token
    assert tokens.index_of(vocab[20000] + vocab[20001]) == (vocab.index(vocab[20000] + vocab[20001])
                                                            if vocab[20000] + vocab[20001] in vocab else None)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(GgufFormatError, match="not a GGUF"):
        GgufFile(bad)
