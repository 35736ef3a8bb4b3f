"""Exact readers for GGUF tensor encodings (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K).

`dequantize` decodes a tensor's raw blocks to float32 with vectorized torch ops. Each decoder performs the
same float32 operations, in the same order, as the `gguf` package's numpy reference (itself the layout of
llama.cpp's ggml-quants.c `dequantize_row_*`), so results are bit-identical to `gguf.quants.dequantize`:
the only float work is an fp16 -> fp32 widening (exact) followed by one or two rounded products/differences.

How matrices are kept in their blocks instead of decoded is quant/gguf_blocks.py's job.

Block layouts (little-endian, `QK_K` = 256 weights per K-quant super-block):
  Q4_0  [d:f16][qs:16]                      w = d * (q - 8); weights 0..15 are the low nibbles, 16..31 the high
  Q4_1  [d:f16][m:f16][qs:16]               w = d * q + m
  Q5_0  [d:f16][qh:4][qs:16]                w = d * (q - 16);       bit i of qh is bit 4 of weight i
  Q5_1  [d:f16][m:f16][qh:4][qs:16]         w = d * q + m
  Q8_0  [d:f16][qs:32 int8]                 w = q * d
  Q2_K  [scales:16][qs:64][d:f16][dmin:f16] 16 groups of 16: w = (d * (sc & 15)) * q - dmin * (sc >> 4)
  Q3_K  [hmask:32][qs:64][scales:12][d:f16] 16 groups of 16, 6-bit signed scales: w = (d * (sc - 32)) * q
  Q4_K  [d:f16][dmin:f16][scales:12][qs:128] 8 groups of 32, 6-bit scales/mins: w = (d * sc) * q - dmin * m
  Q5_K  [d:f16][dmin:f16][scales:12][qh:32][qs:128] as Q4_K, q gains bit 4 from qh
  Q6_K  [ql:128][qh:64][scales:16 int8][d:f16] 16 groups of 16: w = (d * sc) * (q - 32)
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# type name -> (weights per block, bytes per block), the gguf package's table for the types read here
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    name: GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    for name in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
}

# Bit fields are unpacked eight bytes at a time: a uint8 tensor viewed as int64 lanes, shifted and masked with a
# per-byte mask, so no bits cross bytes (vectorized contiguous ops; per-byte broadcasts are several times slower).
_LOW4 = 0x0F0F0F0F0F0F0F0F
_LOW2 = 0x0303030303030303
_LOW1 = 0x0101010101010101
# byte value -> its 8 bits as 8 bytes (bit j in byte j of the little-endian int64)
_BYTE_BITS = sum(((torch.arange(256, dtype=torch.int64) >> j) & 1) << (8 * j) for j in range(8))


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 little-endian fp16 fields -> [..., 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _lanes(b: torch.Tensor, width: int) -> torch.Tensor:
    """[nb, n] bytes -> [nb, n // width, width // 8] int64 lanes of consecutive `width`-byte runs."""
    return b.contiguous().view(torch.int64).reshape(b.shape[0], -1, width // 8)


def _fields(lanes: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 lanes [nb, G, L/8] -> bytes [nb, G, 8 // bits, L]: each run's `bits`-wide fields, lowest first."""
    mask = {4: _LOW4, 2: _LOW2, 1: _LOW1}[bits]
    parts = [lanes & mask] + [(lanes >> s) & mask for s in range(bits, 8, bits)]
    return torch.stack(parts, dim=-2).view(torch.uint8)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[nb, 16] -> [nb, 32]: the 16 low nibbles, then the 16 high nibbles (ggml's order for 32-weight blocks)."""
    return _fields(_lanes(qs, 16), 4).reshape(qs.shape[0], 32)


def _bytes32(qh: torch.Tensor) -> torch.Tensor:
    """[nb, 4] bytes of a little-endian uint32 -> [nb, 32] bits, bit i (byte i // 8, bit i % 8) for weight i."""
    return _BYTE_BITS.index_select(0, qh.reshape(-1).to(torch.int32)).view(torch.uint8).reshape(qh.shape[0], 32)


# ------------------------------------------------------------------------------------------- float types
# Every decoder writes its [n_blocks, block_weights] float32 result into `out` (a slice of the tensor being
# built): the integer codes are widened into it (exact), then scaled and offset in place. Those are the same
# single IEEE float32 ops, in the same order, as gguf's (a * b == b * a exactly; no fused multiply-add).


def _dq_f32(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.view(torch.float32).view(out.shape))


def _dq_f16(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.view(torch.float16).view(out.shape))


def _dq_bf16(b: torch.Tensor, out: torch.Tensor) -> None:
    out.view(torch.int32).copy_(b.view(torch.int16).view(out.shape)).bitwise_left_shift_(16)


# ------------------------------------------------------------------------------------------- 32-weight blocks


def _dq_q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(b[:, 2:18]).view(torch.int8) - 8
    out.copy_(q).mul_(_f16(b[:, 0:2]))


def _dq_q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_nibbles(b[:, 4:20])).mul_(_f16(b[:, 0:2])).add_(_f16(b[:, 2:4]))


def _dq_q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    q = (_nibbles(b[:, 6:22]) | (_bytes32(b[:, 2:6]) << 4)).view(torch.int8) - 16
    out.copy_(q).mul_(_f16(b[:, 0:2]))


def _dq_q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(b[:, 8:24]) | (_bytes32(b[:, 4:8]) << 4)
    out.copy_(q).mul_(_f16(b[:, 0:2])).add_(_f16(b[:, 2:4]))


def _dq_q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b[:, 2:34].view(torch.int8)).mul_(_f16(b[:, 0:2]))


# ------------------------------------------------------------------------------------------- K-quants


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k4_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[nb, 128] -> [nb, 8, 32]: sub-block 2c is the low nibbles of bytes 32c..32c+31, 2c+1 their high ones."""
    return _fields(_lanes(qs, 32), 4).reshape(-1, 8, 32)


def _dq_q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    scales = b[:, 0:16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F)).reshape(nb, 16, 1)
    ml = (dmin * (scales >> 4)).reshape(nb, 16, 1)
    q = _fields(_lanes(b[:, 16:80], 32), 2).reshape(nb, 16, 16)  # per 128-weight half: 2-bit fields of 32 bytes
    out.view(nb, 16, 16).copy_(q).mul_(dl).sub_(ml)


def _dq_q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    hmask, qs, scales = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    low = _fields(_lanes(scales[:, 0:8], 8), 4).reshape(nb, 16)
    high = torch.stack([(scales[:, 8:12] >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(nb, 16)
    sc = (low | (high << 4)).view(torch.int8) - 32
    dl = (d * sc).reshape(nb, 16, 1)
    ql = _fields(_lanes(qs, 32), 2).reshape(nb, 16, 16)
    qh = _fields(_lanes(hmask, 32), 1).reshape(nb, 16, 16) ^ 1  # a set hmask bit means no -4
    q = ql.view(torch.int8) - (qh << 2).view(torch.int8)
    out.view(nb, 16, 16).copy_(q).mul_(dl)


def _dq_q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _k4_nibbles(b[:, 16:144])
    out.view(nb, 8, 32).copy_(q).mul_((d * sc).reshape(nb, 8, 1)).sub_((dmin * mn).reshape(nb, 8, 1))


def _dq_q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    qh = _fields(_lanes(b[:, 16:48], 32), 1).reshape(nb, 8, 32)  # bit c of qh[j] -> sub-block c, weight j
    q = _k4_nibbles(b[:, 48:176]) | (qh << 4)
    out.view(nb, 8, 32).copy_(q).mul_((d * sc).reshape(nb, 8, 1)).sub_((dmin * mn).reshape(nb, 8, 1))


def _dq_q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    sc = b[:, 192:208].view(torch.int8)
    d = _f16(b[:, 208:210])
    dl = (d * sc).reshape(nb, 16, 1)
    # each 128-weight half: low nibbles of its 64 ql bytes, then their high nibbles; 2-bit fields of its 32 qh
    low = _fields(_lanes(b[:, 0:128], 64), 4).reshape(nb, 8, 32)
    high = _fields(_lanes(b[:, 128:192], 32), 2).reshape(nb, 8, 32)
    q = (low | (high << 4)).view(torch.int8) - 32
    out.view(nb, 16, 16).copy_(q.reshape(nb, 16, 16)).mul_(dl)


_DECODERS: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
    "F32": _dq_f32, "F16": _dq_f16, "BF16": _dq_bf16,
    "Q4_0": _dq_q4_0, "Q4_1": _dq_q4_1, "Q5_0": _dq_q5_0, "Q5_1": _dq_q5_1, "Q8_0": _dq_q8_0,
    "Q2_K": _dq_q2_k, "Q3_K": _dq_q3_k, "Q4_K": _dq_q4_k, "Q5_K": _dq_q5_k, "Q6_K": _dq_q6_k,
}
SUPPORTED_TYPES = tuple(_DECODERS)

# Rows decoded per step: bounds the decoders' uint8/float temporaries to a few MB whatever the tensor size.
_CHUNK_WEIGHTS = 1 << 20


def _as_blocks(raw: np.ndarray, type_name: str) -> torch.Tensor:
    """The raw bytes as a [n_blocks, block_bytes] uint8 tensor (a private copy: GGUF data is a read-only memmap)."""
    _, block_bytes = BLOCK_SIZES[type_name]
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if data.size % block_bytes:
        raise ValueError(f"{type_name}: {data.size} bytes is not a whole number of {block_bytes}-byte blocks")
    return torch.from_numpy(data.copy()).reshape(-1, block_bytes)


def _logical_shape(raw: np.ndarray, type_name: str, shape: Sequence[int] | None) -> tuple[int, ...]:
    if shape is not None:
        return tuple(int(s) for s in shape)
    block_weights, block_bytes = BLOCK_SIZES[type_name]
    byte_shape = raw.shape if raw.dtype == np.uint8 else (*raw.shape[:-1], raw.shape[-1] * raw.dtype.itemsize)
    return (*byte_shape[:-1], byte_shape[-1] // block_bytes * block_weights)


def dequantize(raw: np.ndarray, type_name: str, shape: Sequence[int] | None = None,
               name: str = "tensor") -> torch.Tensor:
    """Decode a GGUF tensor's raw data to a float32 tensor of `shape` (numpy order, i.e. GGUF dims reversed;
    by default derived from `raw`'s shape as `gguf.quants.dequantize` does). Bit-identical to gguf's reader.

    Types without a decoder here fall back to `gguf.quants.dequantize` when gguf implements them."""
    decoder = _DECODERS.get(type_name)
    if decoder is None:
        return _gguf_fallback(raw, type_name, shape, name)
    out_shape = _logical_shape(raw, type_name, shape)
    blocks = _as_blocks(raw, type_name)
    block_weights, _ = BLOCK_SIZES[type_name]
    if blocks.shape[0] * block_weights != int(np.prod(out_shape, dtype=np.int64)):
        raise ValueError(f"{name}: {blocks.shape[0]} {type_name} blocks do not hold shape {tuple(out_shape)}")
    out = torch.empty(blocks.shape[0], block_weights, dtype=torch.float32)
    step = max(1, _CHUNK_WEIGHTS // block_weights)
    for start in range(0, blocks.shape[0], step):
        decoder(blocks[start:start + step], out[start:start + step])
    return out.reshape(out_shape)


def _gguf_fallback(raw: np.ndarray, type_name: str, shape: Sequence[int] | None, name: str) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    try:
        qtype = GGMLQuantizationType[type_name]
        array = gguf_dequantize(raw, qtype)
    except (KeyError, NotImplementedError) as e:
        raise ValueError(f"{name}: GGUF tensor type {type_name} is not supported "
                         f"(readable types: {', '.join(SUPPORTED_TYPES)})") from e
    tensor = torch.from_numpy(np.array(array, dtype=np.float32))  # copy: GGUF data is a read-only memmap
    return tensor if shape is None else tensor.reshape(tuple(int(s) for s in shape))
