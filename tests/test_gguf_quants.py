"""GGUF tensor readers against the `gguf` package's own dequantization (the reference llama.cpp mirrors)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from lightllm.models.quant.gguf_blocks import group_quantized
from lightllm.models.quant.gguf_decode import BLOCK_SIZES, SUPPORTED_TYPES, dequantize
from lightllm.models.quant.weights import GGUF_NATIVE_TYPES, GgufBlocks, GroupQuantized
from lightllm.models.loading.gguf import gguf_tensors, unpermute_qk

# Byte offsets of each block's fp16 fields (scales, mins), which random bytes could make inf/NaN.
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0]}


def finite_f16_bits(rng: np.random.Generator, n: int, full_range: bool) -> np.ndarray:
    """n finite fp16 values as uint16: any finite bit pattern (subnormals included), or N(0, 0.02) ones."""
    if not full_range:
        return (rng.standard_normal(n) * 0.02).astype(np.float16).view(np.uint16)
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF  # all-ones exponent (inf/NaN) -> a finite exponent
    return bits


def random_blocks(type_name: str, n: int, k: int, seed: int = 0, full_range: bool = True) -> np.ndarray:
    """Random raw data for an [n, k] tensor of `type_name`, shaped as GGUFReader exposes it ([n, row bytes])."""
    rng = np.random.default_rng(seed)
    if type_name == "F32":
        return rng.standard_normal((n, k)).astype(np.float32).view(np.uint8)
    if type_name in ("F16", "BF16"):
        return finite_f16_bits(rng, n * k, full_range=True).view(np.uint8).reshape(n, 2 * k)
    block_weights, block_bytes = BLOCK_SIZES.get(type_name, (32, 18))
    n_blocks = n * k // block_weights
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in F16_FIELDS[type_name]:
        raw[:, offset:offset + 2] = finite_f16_bits(rng, n_blocks, full_range).view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def reference(raw: np.ndarray, type_name: str) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf_dequantize(raw, GGMLQuantizationType[type_name]), dtype=np.float32))


def assert_bit_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert torch.equal(actual, expected)
    assert torch.equal(actual.view(torch.int32), expected.view(torch.int32))  # signed zeros too


def assert_groups_close(weight, expected: torch.Tensor) -> None:
    """Q4_1/Q4_K fold their offset into `zero` (m + 8*d, 8*d*sc - dmin*m): rounding `zero` and the final sum
    in float32 (gguf rounds only its one difference) costs at most an ulp of |zero| and of the result."""
    zero = weight.zero.repeat_interleave(weight.group, dim=1)
    bound = 2.0 ** -23 * (zero.abs() + expected.abs())
    assert ((weight.dequantize() - expected).abs() <= bound).all()


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_dequantize_is_bit_identical_to_gguf(type_name):
    block_weights = BLOCK_SIZES[type_name][0]
    n, k = 24, 8 * max(block_weights, 32)
    raw = random_blocks(type_name, n, k)
    assert_bit_identical(dequantize(raw, type_name, (n, k)), reference(raw, type_name))
    assert dequantize(raw, type_name).shape == (n, k)  # shape derived from the raw bytes as gguf does


def test_dequantize_decodes_large_tensors_in_chunks():
    raw = random_blocks("Q4_K", 600, 2048, seed=3)  # 1.2M weights: more than one decode chunk
    assert_bit_identical(dequantize(raw, "Q4_K", (600, 2048)), reference(raw, "Q4_K"))


def test_unknown_types_fall_back_to_gguf_or_fail_clearly():
    raw = random_blocks("IQ4_NL", 4, 64)
    assert_bit_identical(dequantize(raw, "IQ4_NL", (4, 64)), reference(raw, "IQ4_NL"))
    with pytest.raises(ValueError, match=r"blk\.3\.ffn_up\.weight.*Q8_1"):
        dequantize(np.zeros((4, 36), np.uint8), "Q8_1", (4, 32), name="blk.3.ffn_up.weight")  # no reader anywhere
    with pytest.raises(ValueError, match="Q9_9"):
        dequantize(np.zeros((4, 36), np.uint8), "Q9_9", (4, 32), name="x")


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("full_range", [False, True])
def test_group_quantized_matches_gguf(type_name, full_range):
    n, k = 16, 512
    raw = random_blocks(type_name, n, k, seed=1, full_range=full_range)
    weight = group_quantized(raw, type_name, (n, k))
    expected = reference(raw, type_name)
    assert weight.group == 32 and weight.q.shape == (n, k) and weight.scale.shape == (n, k // 32)
    assert int(weight.q.min()) >= 0 and int(weight.q.max()) <= 15
    if type_name == "Q4_0":
        assert torch.equal(weight.dequantize(), expected)  # zero = 0 and (q - 8) * d is exact
    else:
        assert_groups_close(weight, expected)


@pytest.mark.parametrize("type_name", [t for t in SUPPORTED_TYPES if t not in ("Q4_0", "Q4_1", "Q4_K")])
def test_group_quantized_declines_other_formats(type_name):
    k = 8 * max(BLOCK_SIZES[type_name][0], 32)
    assert group_quantized(random_blocks(type_name, 4, k), type_name, (4, k)) is None


# ------------------------------------------------------------------------------------------- whole files

# name -> (type, [rows, cols]); llama arch, so attn_q/attn_k rows (and biases) are un-permuted on load.
FILE_TENSORS = {
    "token_embd.weight": ("Q4_0", (64, 64)),  # the embedding is never kept quantized
    "output_norm.weight": ("F32", (256,)),
    "output.weight": ("Q6_K", (64, 256)),
    "blk.0.attn_norm.weight": ("F16", (256,)),
    "blk.0.ffn_norm.weight": ("BF16", (256,)),
    "blk.0.attn_q.weight": ("Q4_K", (64, 256)),
    "blk.0.attn_q.bias": ("F32", (64,)),
    "blk.0.attn_k.weight": ("Q4_0", (32, 256)),
    "blk.0.attn_k.bias": ("Q8_0", (32,)),
    "blk.0.attn_v.weight": ("Q5_0", (32, 256)),
    "blk.0.attn_output.weight": ("Q4_1", (256, 64)),
    "blk.0.ffn_gate.weight": ("Q2_K", (48, 256)),
    "blk.0.ffn_up.weight": ("Q3_K", (48, 256)),
    "blk.0.ffn_down.weight": ("Q5_K", (256, 256)),
    "blk.1.attn_q.weight": ("Q5_1", (64, 64)),
    "blk.1.attn_k.weight": ("Q8_0", (32, 64)),
    "blk.1.attn_v.weight": ("Q4_K", (32, 256)),
}
CONFIG = SimpleNamespace(architecture="llama", num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    writer = GGUFWriter(str(path), arch="llama")
    rng = np.random.default_rng(7)
    for i, (name, (type_name, shape)) in enumerate(FILE_TENSORS.items()):
        qtype = GGMLQuantizationType[type_name]
        if type_name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):  # gguf cannot quantize these: raw blocks
            raw = random_blocks(type_name, shape[0], shape[1], seed=100 + i, full_range=False)
            writer.add_tensor(name, raw, raw_dtype=qtype)
        else:
            data = gguf_quantize((rng.standard_normal(shape) * 0.05).astype(np.float32), qtype)
            writer.add_tensor(name, data, raw_dtype=None if type_name in ("F32", "F16") else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def file_references(path) -> dict[str, tuple[str, torch.Tensor]]:
    """canonical name -> (type, gguf's dequantization with the loader's q/k row un-permutation)."""
    from gguf import GGUFReader

    from lightllm.models.loading.gguf import canonical_gguf_name

    refs = {}
    for t in GGUFReader(str(path)).tensors:
        name = canonical_gguf_name(t.name)
        array = np.array(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32)
        if name.endswith((".q", ".q_bias")):
            array = unpermute_qk(array, CONFIG.num_heads)
        elif name.endswith((".k", ".k_bias")):
            array = unpermute_qk(array, CONFIG.num_kv_heads)
        refs[name] = (t.tensor_type.name, torch.from_numpy(np.ascontiguousarray(array)))
    return refs


@pytest.mark.parametrize("keep_blocks", [False, True])
def test_gguf_file_loads_like_gguf(gguf_file, keep_blocks):
    refs = file_references(gguf_file)
    loaded = {name: load() for name, load in gguf_tensors(gguf_file, CONFIG, keep_blocks=keep_blocks)}
    assert loaded.keys() == refs.keys() and len(refs) == len(FILE_TENSORS)
    assert {t for t, _ in refs.values()} >= {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K",
                                             "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    for name, (type_name, expected) in refs.items():
        weight = loaded[name]
        if keep_blocks and name != "embed" and isinstance(weight, GroupQuantized):  # the int4 kernel's groups
            assert type_name in ("Q4_0", "Q4_1", "Q4_K"), name
            if type_name == "Q4_0":
                assert torch.equal(weight.dequantize(), expected), name
            else:
                assert_groups_close(weight, expected)
        elif keep_blocks and type_name in GGUF_NATIVE_TYPES and expected.dim() == 2:
            # the embedding table too: kept in the file's quantization, rows decoded on lookup
            assert isinstance(weight, GgufBlocks) and weight.type_name == type_name, name
            assert_bit_identical(weight.dequantize(), expected)
        else:
            assert isinstance(weight, torch.Tensor) and weight.is_contiguous(), name
            assert_bit_identical(weight, expected)
