"""The tiled int8 kernel (kernels/tiled_matmul.c), the one form GGUF and int4/int8 layers run on AVX512-VNNI.

As for the GGUF kernel, the weights must be exact (gguf's dequantization, the int4 groups, the int8 rows) and
the only approximation the int8 activations: results are compared with float64 math on the exact weights and
the same int8 activations; with two activation levels, with float64 math on the float activations within the
second level's rounding."""

from __future__ import annotations

import pytest
import torch

from lightllm.models.quant.gguf_blocks import gguf_blocks
from lightllm.models.quant.gguf_decode import BLOCK_SIZES
from lightllm.models.quant.factory import make_linear
from lightllm.models.quant.linear import GgufLinear, Int4Linear, Int8Linear, RowCountDispatch
from lightllm.models.quant.policy import LinearPolicy
from lightllm.models.quant.weights import GGUF_NATIVE_TYPES, cat_rows, quantize_int4
from lightllm.models.quant.tiled import TiledLinear, TiledWeights
from tests.test_gguf_matmul import KERNEL_BUILDS, int8_activations, kernels
from tests.test_gguf_quants import random_blocks, reference


def check_exact(got: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> None:
    weights = weights.double()
    exact = int8_activations(x) @ weights.T
    bound = (int8_activations(x).abs() @ weights.abs().T).max()
    assert (got.double() - exact).abs().max() <= 2e-6 * bound, "the tiles hold different weights"


def check_two_levels(got: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> None:
    """Two int8 levels represent each activation within half the second level's step: the first level's
    residual is at most half its step, max|group| / 254, and the second level's step 1/127 of that."""
    weights, xd = weights.double(), x.double()
    exact = xd @ weights.T
    group_max = xd.reshape(x.shape[0], -1, 32).abs().amax(-1, keepdim=True)
    error = (group_max / (2 * 254 * 127)).expand(-1, -1, 32).reshape(x.shape)
    bound = error @ weights.abs().T + 2e-6 * (xd.abs() @ weights.abs().T).max()
    assert ((got.double() - exact).abs() <= bound).all(), "the second activation level is off"
    # one level could not meet that bound: it is the part that makes the results closer to float math
    assert not ((int8_activations(x) @ weights.T - exact).abs() <= bound).all()


@pytest.mark.parametrize("build", KERNEL_BUILDS)
@pytest.mark.parametrize("type_name", GGUF_NATIVE_TYPES)
def test_tiles_hold_gguf_weights_exactly(build, type_name):
    k = 96 if BLOCK_SIZES[type_name][0] == 32 else 512
    raw = random_blocks(type_name, 40, k, seed=3, full_range=False)  # 40 rows: a partly filled last tile
    tiled = TiledWeights.from_gguf(gguf_blocks(raw, type_name, (40, k)), kernels(build))
    weights = reference(raw, type_name)
    assert torch.equal(tiled.dequantize(), weights)
    # types whose offset is a fixed multiple of the scale store only the scale
    symmetric = type_name in ("Q4_0", "Q5_0", "Q8_0", "Q6_K")
    assert (tiled.zero > 0, tiled.scales.shape[2]) == (symmetric, 1 if symmetric else 2)
    # the legacy types' scales are float16 values and stay so; the K-quants' (sub-scale x scale) are not
    legacy = not type_name.endswith("_K")
    assert tiled.scales.dtype == (torch.float16 if legacy else torch.float32)
    layer = TiledLinear([tiled], kernels(build), levels=1)
    two_levels = TiledLinear([tiled], kernels(build), levels=2)
    torch.manual_seed(0)
    for rows in (1, 5, 8, 13, 70):  # batches of 8 with remainders; 70 spans two row blocks
        x = torch.randn(rows, k)
        x[0, :32] = 0.0  # an all-zero activation group (scale 0)
        check_exact(layer.raw(x), x, weights)
        check_two_levels(two_levels.raw(x), x, weights)


@pytest.mark.parametrize("build", KERNEL_BUILDS)
@pytest.mark.parametrize("levels", [1, 2])
def test_an_output_row_depends_on_its_input_row_only(build, levels):
    """Row-local: a row's output is bit-identical whatever the other rows of the call and their count (the
    8-row batches, their remainders and the 64-row blocks of long inputs included), at either level count."""
    raw = random_blocks("Q4_K", 40, 512, seed=9, full_range=False)
    layer = TiledLinear([TiledWeights.from_gguf(gguf_blocks(raw, "Q4_K", (40, 512)), kernels(build))],
                        kernels(build), levels=levels)
    torch.manual_seed(2)
    probe = torch.randn(1, 512)
    alone = layer.raw(probe)
    for rows, at in ((2, 1), (7, 3), (8, 7), (13, 0), (70, 65)):
        x = torch.randn(rows, 512) * 3
        x[at] = probe[0]
        assert torch.equal(layer.raw(x)[at], alone[0]), (rows, at)


def test_levels_are_fixed_per_layer_not_per_row_count():
    raw = random_blocks("Q4_1", 24, 128, seed=7, full_range=False)
    tiled = TiledWeights.from_gguf(gguf_blocks(raw, "Q4_1", (24, 128)), kernels("native"))
    weights = reference(raw, "Q4_1")
    torch.manual_seed(1)
    x = torch.randn(2, 128)
    one, two = TiledLinear([tiled], kernels("native")), TiledLinear([tiled], kernels("native"), levels=2)
    assert one.levels == 1
    for rows in (1, 2):
        check_exact(one.raw(x[:rows]), x[:rows], weights)
        check_two_levels(two.raw(x[:rows]), x[:rows], weights)
    with pytest.raises(ValueError):
        TiledLinear([tiled], kernels("native"), levels=3)


def test_exact_rows_read_from_the_tiles():
    """The lm_head refinement's exact weights come from the tiles (no second stored form): every bit width,
    float16 and float32 scales, zero points, rows of the last partly filled tile, and mixed-type parts."""
    parts = [("Q5_0", 24), ("Q8_0", 8), ("Q6_K", 16), ("Q4_K", 20), ("Q5_K", 4), ("Q4_1", 12)]
    raws = [random_blocks(t, n, 256, seed=i, full_range=False) for i, (t, n) in enumerate(parts)]
    fused = cat_rows([gguf_blocks(raw, t, (n, 256)) for raw, (t, n) in zip(raws, parts)])
    layer = TiledLinear.from_layer(GgufLinear(fused, None, kernels("native")), fused, kernels("native"))
    weights = torch.cat([reference(raw, t) for raw, (t, _) in zip(raws, parts)])
    indices = torch.tensor([83, 0, 5, 31, 23, 24, 40, 47, 48, 67, 68, 71, 72, 83, 1])
    assert torch.equal(layer.exact_rows(indices), weights[indices])
    q4 = quantize_int4(torch.randn(40, 256), 32)
    tiled4 = TiledLinear([TiledWeights.from_group_quantized(q4)], kernels("native"))
    assert torch.equal(tiled4.exact_rows(torch.tensor([39, 3, 16])), tiled4.dequantized()[[39, 3, 16]])


@pytest.mark.parametrize("build", ["native", "portable"])
def test_int4_groups_and_int8_rows_map_onto_tiles(build):
    torch.manual_seed(4)
    weight = torch.randn(48, 256) * 0.05
    for group in (32, 128):  # groups wider than 32 repeat their scales per 32 activations
        q4 = quantize_int4(weight, group)
        tiled = TiledWeights.from_group_quantized(q4)
        assert tiled.bits == 4 and torch.allclose(tiled.dequantize(), q4.dequantize(), rtol=0, atol=1e-6)
        x = torch.randn(9, 256)
        check_exact(TiledLinear([tiled], kernels(build), levels=1).raw(x), x, q4.dequantize())
    int8 = Int8Linear(weight)
    tiled = TiledWeights.from_int8(int8.weight, int8.scales)
    assert torch.equal(tiled.dequantize(), int8.dequantized())
    x = torch.randn(6, 256)
    check_exact(TiledLinear([tiled], kernels(build), levels=1).raw(x), x, int8.dequantized())


def test_a_zero_point_must_match_the_offsets():
    u = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    ws = torch.rand(16, 2)
    assert TiledWeights.from_affine(u, ws, -8 * ws, 32, 4, zero=8).zero == 8
    with pytest.raises(ValueError):
        TiledWeights.from_affine(u, ws, -8 * ws + 1e-3, 32, 4, zero=8)


def test_mixed_type_parts_and_half_precision_input():
    parts = [("Q5_0", 24), ("Q8_0", 8), ("Q6_K", 16)]
    raws = [random_blocks(t, n, 256, seed=i, full_range=False) for i, (t, n) in enumerate(parts)]
    fused = cat_rows([gguf_blocks(raw, t, (n, 256)) for raw, (t, n) in zip(raws, parts)])
    layer = TiledLinear.from_layer(GgufLinear(fused, None, kernels("native")), fused, kernels("native"))
    weights = torch.cat([reference(raw, t) for raw, (t, _) in zip(raws, parts)])
    x = torch.randn(11, 256)
    check_exact(layer.raw(x), x, weights)
    for half in (torch.bfloat16, torch.float16):  # taken as their exact float32 values
        xh = x.to(half)
        assert torch.equal(layer.raw(xh), layer.raw(xh.float()))


def test_kernel_rejects_a_group_it_cannot_run():
    from lightllm.kernels.cpu import KernelError

    tiled = TiledWeights.from_gguf(gguf_blocks(random_blocks("Q8_0", 16, 64, seed=1), "Q8_0", (16, 64)),
                                   kernels("native"))
    run = kernels("native").tiled_matmul_bound(tiled.q, tiled.scales, 16, 64, 64, 8, tiled.zero)
    with pytest.raises(KernelError):
        run(torch.randn(2, 64), torch.empty(2, 16), 0)


def test_one_stored_form_at_every_row_count():
    """On AVX512-VNNI builds a GGUF or int4 layer is its tiles alone (bias included), at every row count; the
    GEMV kernels run where the tiles do not (policy.tiles off, AVX2 hosts); the dense bf16 copy only when
    asked for, as a second form from its row bound."""
    if not kernels("native").tiled_fast:
        pytest.skip("the tiled kernel's vector path needs AVX512-VNNI")
    raw = random_blocks("Q4_K", 64, 512, seed=5, full_range=False)
    bias = torch.randn(64)
    blocks = gguf_blocks(raw, "Q4_K", (64, 512))
    layer = make_linear(blocks, bias, "gguf", torch.device("cpu"), torch.float32, LinearPolicy())
    assert isinstance(layer, TiledLinear) and layer.levels == 1
    weights = reference(raw, "Q4_K")
    for rows in (1, 2, 16):
        x = torch.randn(rows, 512)
        check_exact(layer.raw(x) - bias, x, weights)
    q4 = quantize_int4(torch.randn(64, 512), 32)
    assert isinstance(make_linear(q4, None, "gguf", torch.device("cpu"), torch.float32, LinearPolicy()), TiledLinear)
    two = make_linear(blocks, bias, "gguf", torch.device("cpu"), torch.float32, LinearPolicy(act_levels=2))
    assert two.levels == 2
    gemv = make_linear(blocks, bias, "gguf", torch.device("cpu"), torch.float32, LinearPolicy(tiles=False))
    assert isinstance(gemv, GgufLinear)
    dense = make_linear(blocks, bias, "gguf", torch.device("cpu"), torch.float32, LinearPolicy(dense_min_rows=16))
    assert isinstance(dense, RowCountDispatch) and isinstance(dense.quantized, TiledLinear)
    assert dense.min_rows == 16
    with pytest.raises(ValueError):
        LinearPolicy(act_levels=0)
