"""Embeddings stay in the GGUF file's quantization: a lookup decodes exactly the rows the decoded table holds."""

from __future__ import annotations

import pytest
import torch

from lightllm.kernels import cpu as cpu_kernels
from lightllm.models.loading.catalog import smollm2_path
from lightllm.models.loading.gguf import open_gguf
from lightllm.models.loading.loader import embedding_table
from lightllm.models.quant.embedding import QuantizedEmbedding, decode_rows
from lightllm.models.quant.gguf_blocks import gguf_blocks
from lightllm.models.quant.gguf_decode import dequantize
from lightllm.models.quant.weights import GGUF_NATIVE_TYPES, GgufBlocks
from tests.test_gguf_quants import random_blocks


def _shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def test_smollm2_embedding_lookup_equals_the_decoded_table():
    reader = open_gguf(smollm2_path())
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    table = dequantize(tensor.data, tensor.tensor_type.name, _shape(tensor))
    blocks = gguf_blocks(tensor.data, tensor.tensor_type.name, _shape(tensor))
    assert blocks is not None
    assert blocks.raw.data_ptr() == tensor.data.ctypes.data  # a view of the mapped file, not a copy
    embed = embedding_table(blocks, torch.device("cpu"), torch.float32)
    assert isinstance(embed, QuantizedEmbedding) and embed.shape == table.shape
    assert embed.nbytes * 3 < table.numel() * 4  # the file's bytes, not float32
    ids = torch.tensor([0, 1, 2, 17, 1000, table.shape[0] - 1, 17])
    assert torch.equal(embed.index_select(0, ids), table.index_select(0, ids))
    every = torch.arange(table.shape[0])
    assert torch.equal(embed.index_select(0, every), table)
    assert embed.index_select(0, ids[:0]).shape == (0, table.shape[1])
    bf16 = embedding_table(blocks, torch.device("cpu"), torch.bfloat16).index_select(0, ids)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, table.index_select(0, ids).bfloat16())


@pytest.mark.parametrize("type_name", GGUF_NATIVE_TYPES)
def test_rows_decoded_from_blocks_equal_the_decoded_table_for_every_native_type(type_name):
    n, k = 48, 512
    raw = random_blocks(type_name, n, k)
    table = dequantize(raw, type_name, (n, k))
    blocks = GgufBlocks(torch.from_numpy(raw.copy()), type_name, k)
    ids = torch.tensor([5, 0, 47, 5, 33])
    for kernels in (cpu_kernels.load(), None):  # the C decoder and the PyTorch fallback
        assert torch.equal(decode_rows(blocks.rows_at(ids), kernels), table.index_select(0, ids))
