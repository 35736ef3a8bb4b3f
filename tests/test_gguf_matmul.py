"""The GGUF kernel (kernels/gguf_matmul.c): matrices multiplied straight from their blocks.

The kernel's only approximation is the int8 activations (per 32 values, as llama.cpp's); the weights must be
exactly gguf's dequantization. So each result is compared with float64 math on gguf's dequantized weights
and the same int8 activations: agreement to float32 rounding proves the block decoding exact, and the
comparison with the float activations bounds what the activation rounding costs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightllm.kernels import cpu as cpu_kernels
from lightllm.models.quant.gguf_blocks import gguf_blocks, kept_quantized
from lightllm.models.quant.gguf_decode import BLOCK_SIZES
from lightllm.models.quant.factory import make_linear
from lightllm.models.quant.linear import GgufLinear
from lightllm.models.quant.policy import LinearPolicy
from lightllm.models.quant.weights import GGUF_NATIVE_TYPES, GgufRowGroups, GroupQuantized, cat_rows
from tests.test_gguf_quants import random_blocks, reference

KERNEL_BUILDS = list(cpu_kernels.BUILDS)


def kernels(build: str):
    k = cpu_kernels.load(build)
    if k is None:
        pytest.skip(f"the {build} build of the CPU kernels is unavailable here")
    return k


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """What the kernel multiplies by: per 32 values d = max|x| / 127, q = round-half-even(x * 127 / max|x|)."""
    groups = x.float().reshape(x.shape[0], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(groups * inv).double() * (amax / 127.0).double()).reshape(x.shape)


def run_kernel(build: str, type_name: str, raw: np.ndarray, k: int, x: torch.Tensor) -> torch.Tensor:
    blocks = gguf_blocks(raw, type_name, (raw.shape[0], k))
    out = torch.empty(x.shape[0], raw.shape[0])
    kernels(build).gguf_matmul(blocks.type_code, blocks.raw, k, x, out)
    return out


@pytest.mark.parametrize("build", KERNEL_BUILDS)
@pytest.mark.parametrize("type_name", GGUF_NATIVE_TYPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 6])
def test_kernel_computes_gguf_weights_exactly(build, type_name, rows):
    block_weights = BLOCK_SIZES[type_name][0]
    # an odd number of 32-groups for the small blocks (the fused path pairs them), two super-blocks else
    k = 96 if block_weights == 32 else 512
    raw = random_blocks(type_name, 40, k, seed=rows, full_range=False)
    torch.manual_seed(rows)
    x = torch.randn(rows, k)
    x[:, 5] = 0.0
    x[-1, :32] = 0.0  # an all-zero activation group (scale 0)
    weights = reference(raw, type_name).double()
    got = run_kernel(build, type_name, raw, k, x).double()
    exact_weights = int8_activations(x) @ weights.T
    bound = (int8_activations(x).abs() @ weights.abs().T).max()
    assert (got - exact_weights).abs().max() <= 2e-6 * bound, "weights decoded differently from gguf"
    float_activations = x.double() @ weights.T
    assert (got - float_activations).abs().max() <= 0.02 * bound


@pytest.mark.parametrize("build", [b for b in KERNEL_BUILDS if b != "portable"])
@pytest.mark.parametrize("type_name", GGUF_NATIVE_TYPES)
def test_simd_and_portable_builds_agree(type_name, build):
    k = 768 if BLOCK_SIZES[type_name][0] == 256 else 800
    raw = random_blocks(type_name, 64, k, seed=7, full_range=False)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(7))
    simd, portable = run_kernel(build, type_name, raw, k, x), run_kernel("portable", type_name, raw, k, x)
    torch.testing.assert_close(simd, portable, rtol=1e-5, atol=1e-5 * portable.abs().max().item())


def test_kernel_reads_bf16_inputs_and_writes_into_a_column_slice():
    raw = random_blocks("Q8_0", 24, 64, seed=3, full_range=False)
    x = torch.randn(2, 64).bfloat16()
    wide = torch.full((2, 40), 7.0)
    blocks = gguf_blocks(raw, "Q8_0", (24, 64))
    kernels("native").gguf_matmul(blocks.type_code, blocks.raw, 64, x, wide[:, 10:34])
    expected = run_kernel("native", "Q8_0", raw, 64, x.float())
    torch.testing.assert_close(wide[:, 10:34], expected, rtol=0, atol=0)
    assert torch.equal(wide[:, :10], torch.full((2, 10), 7.0)) and torch.equal(wide[:, 34:], torch.full((2, 6), 7.0))


def test_kernel_rejects_a_row_that_is_not_whole_blocks():
    raw = random_blocks("Q8_0", 4, 64, seed=1)
    blocks = gguf_blocks(raw, "Q8_0", (4, 64))
    with pytest.raises(cpu_kernels.KernelError):
        kernels("native").gguf_matmul(blocks.type_code, blocks.raw, 48, torch.randn(1, 48),
                                      torch.empty(1, 4))


def test_fused_parts_of_different_types_run_as_one_layer():
    """q/k/v stored as Q5_0, Q5_0, Q8_0 (as llama.cpp's Q4_K_M mixes them): one layer, each run from its blocks."""
    parts = [("Q5_0", 32), ("Q5_0", 16), ("Q8_0", 16)]
    raws = [random_blocks(t, n, 128, seed=i, full_range=False) for i, (t, n) in enumerate(parts)]
    fused = cat_rows([gguf_blocks(raw, t, (n, 128)) for raw, (t, n) in zip(raws, parts)])
    assert isinstance(fused, GgufRowGroups) and [p.type_name for p in fused.parts] == ["Q5_0", "Q8_0"]
    bias = torch.randn(64)
    layer = GgufLinear(fused, bias, kernels("native"))
    x = torch.randn(3, 128)
    expected = torch.cat([run_kernel("native", t, raw, 128, x) for raw, (t, _) in zip(raws, parts)], dim=1) + bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(layer.dequantized(), torch.cat([reference(r, t) for r, (t, _) in zip(raws, parts)]))


def test_gguf_quant_type_keeps_blocks_and_other_quant_types_decode_them():
    raw = random_blocks("Q6_K", 32, 256, seed=2, full_range=False)
    blocks = gguf_blocks(raw, "Q6_K", (32, 256))
    cpu = torch.device("cpu")
    assert isinstance(make_linear(blocks, None, "gguf", cpu, torch.float32, LinearPolicy(tiles=False)), GgufLinear)
    dense = make_linear(blocks, None, "none", cpu, torch.float32)
    assert torch.equal(dense.weight, reference(raw, "Q6_K"))


def test_q4_0_and_q4_1_stay_on_the_int4_kernel_where_it_fits():
    raw = random_blocks("Q4_1", 32, 256, seed=4, full_range=False)
    assert isinstance(kept_quantized(raw, "Q4_1", (32, 256)), GroupQuantized)
    odd_rows = random_blocks("Q4_1", 8, 256, seed=4, full_range=False)  # the int4 kernel needs rows % 16 == 0
    assert kept_quantized(odd_rows, "Q4_1", (8, 256)).type_name == "Q4_1"
    assert kept_quantized(random_blocks("Q4_K", 32, 256), "Q4_K", (32, 256)).type_name == "Q4_K"  # exact scales
    assert kept_quantized(random_blocks("Q3_K", 16, 256), "Q3_K", (16, 256)) is None  # decoded, then int8


def test_a_gguf_lm_head_gives_its_exact_rows_for_the_logit_refinement():
    """The top candidates of a GGUF lm_head's logits are recomputed in fp32 from its own blocks."""
    from types import SimpleNamespace

    from lightllm.models.decoder import LlamaModel

    parts = [("Q8_0", 48), ("Q6_K", 16), ("Q4_K", 8), ("Q5_0", 8), ("Q4_1", 8), ("Q5_K", 8)]
    raws = [random_blocks(t, n, 256, seed=i, full_range=False) for i, (t, n) in enumerate(parts)]
    weight = cat_rows([gguf_blocks(raw, t, (n, 256)) for raw, (t, n) in zip(raws, parts)])
    indices = torch.tensor([63, 0, 47, 48, 5, 64, 75, 83, 95, 90])
    expected = torch.cat([reference(r, t) for r, (t, _) in zip(raws, parts)]).index_select(0, indices)
    # the one form (tiles or blocks), and wrapped with the opt-in dense copy
    for policy in (LinearPolicy(), LinearPolicy(tiles=False), LinearPolicy(dense_min_rows=4)):
        head = make_linear(weight, None, "gguf", torch.device("cpu"), torch.float32, policy)
        rows_of = LlamaModel._exact_head_source(SimpleNamespace(lm_head=head),
                                                SimpleNamespace(tie_word_embeddings=False))
        assert torch.equal(rows_of(indices), expected)


@pytest.mark.parametrize("build", KERNEL_BUILDS)
@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q5_0", "Q8_0"])
def test_an_output_row_depends_on_its_input_row_only(build, type_name):
    """Row-local, as the one form of AVX2 hosts must be: a row's output is bit-identical whatever the other rows
    of the call and their count (the four-row groups and their remainders)."""
    k = 512
    raw = random_blocks(type_name, 24, k, seed=11, full_range=False)
    torch.manual_seed(3)
    probe = torch.randn(1, k)
    alone = run_kernel(build, type_name, raw, k, probe)
    for rows, at in ((2, 1), (4, 3), (5, 4), (7, 2), (9, 8)):
        x = torch.randn(rows, k) * 2
        x[at] = probe[0]
        assert torch.equal(run_kernel(build, type_name, raw, k, x)[at], alone[0]), (rows, at)
