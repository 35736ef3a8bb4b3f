"""Weight-only quantized linears against the dense reference path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightllm.models.quant.gguf_blocks import group_quantized
from lightllm.models.quant.factory import one_form
from lightllm.models.quant.linear import DenseLinear, Int4Linear, Int8Linear, RowCountDispatch
from lightllm.models.quant.policy import LinearPolicy
from lightllm.models.quant.weights import quantize_int4
from tests.conftest import embedded_model_path, run_engine_recording_logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_gguf_q4_1_blocks_repack_exactly():
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(embedded_model_path())
    tensor = next(t for t in reader.tensors if t.tensor_type.name == "Q4_1")
    blocks = group_quantized(tensor.data, "Q4_1", (tensor.data.shape[0], int(tensor.shape[0])))
    reference = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
    torch.testing.assert_close(blocks.dequantize(), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(960, 576), (1536, 576), (576, 1536)])
def test_quantized_linears_track_dense(shape):
    torch.manual_seed(0)
    weight = torch.randn(*shape) * 0.05
    bias = torch.randn(shape[0]) * 0.1
    x = torch.randn(5, shape[1])
    dense = DenseLinear(weight, bias)(x)
    assert rel_err(Int8Linear(weight, bias)(x), dense) < 0.01
    q4 = quantize_int4(weight, 32)
    exact = DenseLinear(q4.dequantize(), bias)(x)
    assert rel_err(Int4Linear(q4, bias)(x), exact) < 0.01  # the kernel computes what the int4 weights say
    assert rel_err(Int4Linear(q4, bias)(x), dense) < 0.15  # and int4 itself stays close to the original


@pytest.mark.parametrize("kind", ["int4", "int4-g64", "int8"])
def test_one_form_computes_the_quantized_weights(kind):
    """An int4/int8 layer's one form (its tiles on AVX512-VNNI, else its own kernel) computes the quantized
    weights at every row count; the opt-in dense bf16 copy, from its row bound, the same function."""
    from lightllm.kernels import cpu as cpu_kernels
    from lightllm.models.quant.tiled import TiledLinear

    torch.manual_seed(1)
    weight, bias = torch.randn(960, 576) * 0.05, torch.randn(960) * 0.1
    stored = None
    if kind.startswith("int4"):
        stored = quantize_int4(weight, 64 if kind == "int4-g64" else 32)
        layer, dequantize = Int4Linear(stored, bias), lambda: Int4Linear.dequantized(stored)
    else:
        layer = Int8Linear(weight, bias)
        dequantize = layer.dequantized
    form = one_form(layer, stored, dequantize, LinearPolicy())
    tiles = bool(cpu_kernels.load() and cpu_kernels.load().tiled_fast)
    assert isinstance(form, TiledLinear) if tiles else form is layer
    assert one_form(layer, stored, dequantize, LinearPolicy(tiles=False)) is layer
    for rows in (1, 3, 12):
        x = torch.randn(rows, 576)
        exact = DenseLinear(dequantize(), bias)(x)
        assert rel_err(form(x), exact) < 0.01
    dispatch = one_form(layer, stored, dequantize, LinearPolicy(dense_min_rows=8))
    assert isinstance(dispatch, RowCountDispatch) and dispatch.min_rows == 8
    assert isinstance(dispatch.batched, DenseLinear)
    calls = []
    dispatch.batched.raw = lambda x, f=dispatch.batched.raw: calls.append(len(x)) or f(x)
    small, large = torch.randn(3, 576), torch.randn(12, 576)
    assert torch.equal(dispatch(small), form(small)) and calls == []  # below the bound: the one form
    exact = DenseLinear(dequantize(), bias)(large)
    assert rel_err(dispatch(large), exact) < 0.01 and calls == [12]  # the copy, same weights


def _first_logits_and_greedy(quant_type: str, prompts: list[list[int]], steps: int):
    _, tokens, logits = run_engine_recording_logits(embedded_model_path(), prompts, steps=steps, quant_type=quant_type,
                                                    max_total_token_num=2000, grammar_backend="none",
                                                    disable_dynamic_prompt_cache=True)
    return {rid: rows[0] for rid, rows in logits.items()}, tokens


@pytest.mark.parametrize("quant_type", ["gguf", "int8wo"])
def test_quantized_smollm_quality(quant_type):
    """Same top-1 first token and small logit error against the float32-dequantized reference; greedy text
    stays identical for the first tokens (bf16 activations make later divergence possible)."""
    prompts = [[1, 4093, 198, 504, 3575, 282, 4649, 314, 2, 198, 1, 520, 9531, 198], [504, 3575, 282, 4649, 314]]
    ref_logits, ref_tokens = _first_logits_and_greedy("none", prompts, 8)
    logits, tokens = _first_logits_and_greedy(quant_type, prompts, 8)
    for rid in ref_logits:
        assert logits[rid].argmax() == ref_logits[rid].argmax()
        assert (logits[rid] - ref_logits[rid]).abs().max() < 1.5
        assert tokens[rid][:4] == ref_tokens[rid][:4]


def test_fp16_kv_cache_quality(model_path_kind):
    """The fp16 KV cache (the CPU default with the fused kernels) against fp32 KV on SmolLM2, prefill + decode."""
    prompts = [[1, 4093, 198, 504, 3575, 282, 4649, 314, 2, 198, 1, 520, 9531, 198], [504, 3575, 282, 4649, 314]]
    runs = {}
    for kv in ("fp32", "fp16"):
        _, tokens, logits = run_engine_recording_logits(embedded_model_path(), prompts, steps=8, kv_cache_dtype=kv,
                                                        max_total_token_num=2000, grammar_backend="none",
                                                        disable_dynamic_prompt_cache=True)
        runs[kv] = tokens, logits
    for rid, ref_rows in runs["fp32"][1].items():
        assert runs["fp16"][0][rid] == runs["fp32"][0][rid]
        for ours, ref in zip(runs["fp16"][1][rid], ref_rows):
            assert (ours - ref).abs().max() < 0.05


@pytest.mark.parametrize("quant_type", ["int8wo", "int4wo-32"])
def test_quantized_tied_lm_head_refines_its_top_logits_in_fp32(quant_type, tmp_path):
    """A quantized lm_head's bf16 logits can flip near-ties; with tied embeddings the exact weights are at
    hand, so each row's top candidates are recomputed in fp32 from them (the rest keep the kernel's values)."""
    from lightllm.engine.engine import Engine
    from lightllm.engine.protocol import EngineConfig
    from lightllm.models.layers import rms_norm
    from lightllm.models.decoder import REFINED_LOGITS
    from tests.conftest import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tied", "llama", tie_word_embeddings=True, vocab_size=512)
    model = Engine(EngineConfig(model_path=str(model_dir), max_total_token_num=256, grammar_backend="none",
                                quant_type=quant_type)).model
    hidden = torch.randn(3, model.config.hidden_size)
    logits = model._logits(hidden)
    last = rms_norm(hidden, model.weights.final_norm, model.config.rms_norm_eps)
    exact = last @ model.weights.embed.float().T
    quantized = model.weights.lm_head(last).float()
    top = quantized.topk(REFINED_LOGITS, dim=-1).indices  # the candidates the kernel's logits ranked first
    torch.testing.assert_close(logits.gather(1, top), exact.gather(1, top), rtol=1e-6, atol=1e-6)
    rest = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top, False)
    assert torch.equal(logits[rest], quantized[rest])
    assert not torch.equal(quantized.gather(1, top), exact.gather(1, top))  # the kernel's values did differ


def test_refinement_handles_a_step_that_samples_no_row(tmp_path):
    """A step made only of prefill chunks asks for logits of no row; the refinement must pass it through."""
    from lightllm.engine.engine import Engine
    from lightllm.engine.protocol import EngineConfig
    from tests.conftest import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tied", "llama", tie_word_embeddings=True)
    model = Engine(EngineConfig(model_path=str(model_dir), max_total_token_num=256, grammar_backend="none",
                                quant_type="int8wo")).model
    assert model._logits(torch.randn(0, model.config.hidden_size)).shape == (0, model.config.vocab_size)
