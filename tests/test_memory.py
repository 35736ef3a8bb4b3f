"""The KV sizing rule and the start-up memory breakdown (engine/memory.py), without a server."""

from __future__ import annotations

import torch

from lightllm.engine.memory import (MIN_KV_TOKENS, MemoryBreakdown, activation_bytes, kv_budget, process_rss_bytes,
                                    tensor_bytes)
from lightllm.models.config import ModelConfig
from lightllm.models.decoder import LayerWeights, ModelWeights
from lightllm.models.quant.embedding import QuantizedEmbedding
from lightllm.models.quant.linear import DenseLinear
from lightllm.models.quant.weights import GgufBlocks

GIB = 1 << 30


def test_an_explicit_token_count_wins():
    budget = kv_budget(16384, 0.5, 4096, 8, 1000, 64 * GIB, "cpu")
    assert budget.tokens == 16384 and "--max_total_token_num 16384" in budget.rule


def test_a_context_per_running_request_when_memory_allows():
    # 4096 x 8 = 32768 tokens of 12 KiB: 384 MiB, under 0.2 x 16 GiB
    budget = kv_budget(None, None, 4096, 8, 12288, 16 * GIB, "cpu")
    assert budget.tokens == 4096 * 8
    assert "max_model_len 4096 x running_max_req_size 8 = 32768" in budget.rule and budget.rule.endswith("32768 tokens")


def test_the_memory_fraction_caps_it():
    # 16384 x 256 tokens wanted; 0.2 x 10 GiB / 12288 B = 174762 tokens allowed
    budget = kv_budget(None, None, 16384, 256, 12288, 10 * GIB, "cpu")
    assert budget.tokens == int(10 * GIB * 0.2) // 12288 == 174762
    assert "mem_fraction 0.2 x available 10240 MiB / 12288 B per token = 174762" in budget.rule
    assert kv_budget(None, 0.05, 16384, 256, 12288, 10 * GIB, "cpu").tokens == int(10 * GIB * 0.05) // 12288
    assert kv_budget(None, None, 16384, 256, 12288, 10 * GIB, "cuda").tokens == int(10 * GIB * 0.85) // 12288


def test_the_rule_is_monotonic_and_keeps_a_floor():
    sizes = [kv_budget(None, None, 2048, n, 4096, 4 * GIB, "cpu").tokens for n in (1, 2, 4, 64, 1024)]
    assert sizes == sorted(sizes) and sizes[0] == 2048 and sizes[-1] == int(4 * GIB * 0.2) // 4096
    assert kv_budget(None, None, 2048, 4, 1 << 20, 100 << 20, "cpu").tokens == MIN_KV_TOKENS


def _config() -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=16)


def test_weights_are_counted_once_per_storage_whatever_their_form():
    embed_raw = torch.zeros(1000, 34, dtype=torch.uint8)  # Q8_0 rows of 32 weights: 34 bytes
    embed = QuantizedEmbedding(GgufBlocks(embed_raw, "Q8_0", 32), torch.float32)
    qkv = DenseLinear(torch.zeros(128, 64), torch.zeros(128))
    shared = DenseLinear(qkv.weight[:64])  # a view of qkv's weight: no new bytes
    layer = LayerWeights(input_norm=torch.zeros(64), qkv=qkv, o=shared, post_norm=torch.zeros(64),
                         gate_up=DenseLinear(torch.zeros(256, 64, dtype=torch.bfloat16)), down=None)
    weights = ModelWeights(embed=embed, layers=[layer], final_norm=torch.zeros(64), lm_head=qkv)
    expected = 1000 * 34 + 128 * 64 * 4 + 128 * 4 + 64 * 4 * 3 + 256 * 64 * 2
    assert tensor_bytes(weights) == expected


def test_activations_grow_with_the_step_and_the_breakdown_adds_up():
    cfg = _config()
    one, many = activation_bytes(cfg, 1, 1), activation_bytes(cfg, 2048, 256)
    per_row = 2 * 64 + (64 + 2 * 32) + 2 * 64 + 3 * 128
    assert one == (per_row + 2 * 1000) * 4
    assert many == (2048 * per_row + 2 * 256 * 1000) * 4
    breakdown = MemoryBreakdown(weights=100, kv_cache=20, activations=3, runtime=4)
    assert breakdown.as_dict() == {"weights": 100, "kv_cache": 20, "activations": 3, "runtime": 4, "total": 127}
    assert "weights 0 MiB, KV cache 0 MiB" in breakdown.describe()
    assert 10 << 20 < process_rss_bytes() < 64 * GIB


def test_free_heap_goes_back_to_the_os_once_it_has_grown():
    import lightllm.engine.memory as memory

    if memory._trim is None:
        import pytest

        pytest.skip("not glibc")
    memory.release_free_heap()  # the baseline
    blocks = [bytearray(64 << 10) for _ in range(4096)]  # 256 MiB of heap blocks (under the mmap threshold)
    grown = process_rss_bytes()
    del blocks[:-1]  # the last one keeps the heap's top in place: plain free() cannot shrink it
    memory.release_free_heap()
    assert process_rss_bytes() < grown - (128 << 20)
    before = process_rss_bytes()
    memory.release_free_heap()  # nothing grew since: no trim needed
    assert abs(process_rss_bytes() - before) < (16 << 20)
