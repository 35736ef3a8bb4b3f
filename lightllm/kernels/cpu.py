"""Builds and loads the fused CPU kernels (`cpu_kernels.c`, `gguf_matmul.c`, `tiled_matmul.c`, `lora_bgmv.c`) and
wraps them for torch tensors.

The C file is compiled on first use with the system C compiler for this host's instruction set
(`-march=native`) and cached under ~/.cache/lightllm/kernels, keyed by the source, the flags and the CPU's
feature flags, so it builds once per machine (~1 s). Without a compiler, or turned off (the server's
--no-cpu_kernels; LIGHTLLM_CPU_KERNELS=0 in the environment), `load()` returns None and the model runs its
pure-PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from lightllm.host import cache_dir, cpu_flags

logger = logging.getLogger("lightllm.kernels")

_SOURCES = [Path(__file__).with_name(name)
            for name in ("cpu_kernels.c", "gguf_matmul.c", "tiled_matmul.c", "lora_bgmv.c")]
_HEADERS = [Path(__file__).with_name("cpu_common.h")]
# -fno-trapping-math / -fno-math-errno let floorf and the exp polynomial vectorise; no -ffast-math, so
# float semantics (ordering, NaN) are otherwise kept.
_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fno-strict-aliasing", "-fopenmp",
          "-fPIC", "-shared"]
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_i64, _int, _flt, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p


class TiledWeightDesc(ctypes.Structure):
    """tiled_matmul.c's TiledWeight: one weight's fixed arguments, built once per bound weight."""
    _fields_ = [("q", _ptr), ("scales", _ptr), ("n_rows", _i64), ("k", _i64), ("group", ctypes.c_int32),
                ("bits", ctypes.c_int32), ("zero", ctypes.c_int32), ("half_scales", ctypes.c_int32)]

_SIGNATURES = {
    "lk_add_rms_norm": [_ptr, _ptr, _int, _ptr, _ptr, _int, _i64, _i64, _flt],
    "lk_silu_mul": [_ptr, _int, _ptr, _int, _i64, _i64],
    "lk_rope_store": [_ptr, _int, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _int, _ptr],
    "lk_decode_attention": [_ptr, _ptr, _ptr, _int, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64,
                            _flt, _ptr, _int],
    "lk_prefill_attention": [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _flt, _ptr, _i64],
    "lk_prefill_attention_available": [],
    "lk_topk_rows": [_ptr, _i64, _i64, _i64, _int, _ptr],
    "lk_row_dots": [_ptr, _ptr, _i64, _i64, _i64, _ptr],
    "lk_gguf_matmul": [_int, _ptr, _i64, _i64, _ptr, _int, _i64, _ptr, _i64],
    "lk_gguf_decode": [_int, _ptr, _i64, _i64, _ptr, _ptr, _ptr],
    "lk_tiled_matmul": [_ptr, _ptr, _int, _i64, _ptr, _i64, _int],
    "lk_tiled_fast": [],
    "lk_tiled_rows": [_ptr, _ptr, _i64, _ptr],
    "lk_lora_bgmv": [_ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64],
}


class KernelError(RuntimeError):
    pass


def _cpu_fingerprint() -> str:
    """What -march=native compiles for: the machine and its feature flags."""
    return " ".join([os.uname().machine, *sorted(cpu_flags())])


def _build(compiler: str, extra_flags: tuple[str, ...] = ()) -> Path:
    flags = [*_FLAGS, *extra_flags]
    source = b"".join(p.read_bytes() for p in [*_SOURCES, *_HEADERS])
    key = hashlib.sha256(source + " ".join([compiler, *flags]).encode() + _cpu_fingerprint().encode()).hexdigest()[:16]
    target = cache_dir("kernels") / f"lightllm_cpu_kernels_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *flags, "-o", str(out), *map(str, _SOURCES)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelError(f"{compiler} failed: {proc.stderr.strip()[:2000]}")
        os.replace(out, target)  # atomic: concurrent builders (several servers starting) agree
    logger.info("built CPU kernels %s", target)
    return target


# Builds of the same sources: "native" is what the engine runs; the others let tests check the code paths
# this CPU would not take (plain C, AVX2 with and without AVX-VNNI on an AVX-512 machine).
BUILDS: dict[str, tuple[str, ...]] = {
    "native": (),
    "portable": ("-DLK_PORTABLE",),
    "avx2-vnni": ("-mno-avx512f",),
    "avx2": ("-mno-avx512f", "-mno-avxvnni"),
}


# The server's --cpu_kernels / --no-cpu_kernels (EngineConfig.cpu_kernels, applied by the engine process with
# configure()); processes that run the model directly keep LIGHTLLM_CPU_KERNELS=0 as their switch.
_enabled = os.environ.get("LIGHTLLM_CPU_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def configure(enabled: bool) -> None:
    """Turn the kernels on or off for this process (before the model loads them)."""
    global _enabled
    _enabled = enabled
    load.cache_clear()


@lru_cache(maxsize=len(BUILDS))
def load(build: str = "native") -> "CpuKernels | None":
    """The kernels for this process, or None when they are disabled or cannot be built (for `build`, see
    BUILDS; a build this compiler or CPU cannot make is None as well)."""
    if not _enabled:
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        logger.warning("no C compiler found: fused CPU kernels disabled, using the PyTorch path")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler, BUILDS[build])))
    except (KernelError, OSError) as exc:
        logger.warning("fused CPU kernels unavailable (%s): using the PyTorch path", exc)
        return None
    return CpuKernels(lib)


def _code(t: torch.Tensor) -> int:
    return _DTYPE_CODES[t.dtype]


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_contiguous() or not t.is_cpu:
            raise KernelError("CPU kernels need contiguous CPU tensors")


def _check_index(*tensors: torch.Tensor) -> None:
    _check(*tensors)
    for t in tensors:
        if t.dtype != torch.int64:
            raise KernelError("CPU kernels take int64 index tensors")


class CpuKernels:
    """Thin typed wrappers; each returns nothing and writes into the `out` tensors it is given."""

    def __init__(self, lib: ctypes.CDLL):
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        self._lib = lib
        # what this build's optional vector paths are, asked once (has_prefill_attention is read per layer)
        self.tiled_fast = bool(lib.lk_tiled_fast())  # tiled_matmul's AVX512-VNNI path, not the plain C one
        self.has_prefill_attention = bool(lib.lk_prefill_attention_available())  # its AVX-512 path; else SDPA

    @staticmethod
    def _ok(rc: int, name: str) -> None:
        if rc != 0:
            raise KernelError(f"{name} rejected its arguments (code {rc})")

    def add_rms_norm(self, hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     out: torch.Tensor) -> None:
        """hidden += delta (if given), in place; out = rms_norm(hidden) * weight."""
        _check(hidden, weight, out)
        rows, dim = hidden.shape
        if delta is not None:
            _check(delta)
        rc = self._lib.lk_add_rms_norm(hidden.data_ptr(), None if delta is None else delta.data_ptr(),
                                       0 if delta is None else _code(delta), weight.data_ptr(), out.data_ptr(),
                                       _code(out), rows, dim, eps)
        self._ok(rc, "add_rms_norm")

    def silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor) -> None:
        """out = silu(gate_up[:, :I]) * gate_up[:, I:]."""
        _check(gate_up, out)
        rows, inter = out.shape
        self._ok(self._lib.lk_silu_mul(gate_up.data_ptr(), _code(gate_up), out.data_ptr(), _code(out), rows, inter),
                 "silu_mul")

    def rope_store(self, qkv: torch.Tensor, heads: int, kv_heads: int, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, slots: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                   q_out: torch.Tensor) -> None:
        """Rotate q (into q_out) and k, and write k and v into the pools at `slots`."""
        _check(qkv, cos, sin, k_pool, v_pool, q_out)
        _check_index(positions, slots)
        head_dim = k_pool.shape[-1]
        rc = self._lib.lk_rope_store(qkv.data_ptr(), _code(qkv), qkv.shape[0], heads, kv_heads, head_dim,
                                     positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
                                     k_pool.data_ptr(), v_pool.data_ptr(), _code(k_pool), q_out.data_ptr())
        self._ok(rc, "rope_store")

    def decode_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                         req_slots: torch.Tensor, lens: torch.Tensor, rows: torch.Tensor | None, window: int | None,
                         scale: float, out: torch.Tensor) -> None:
        """One query per sequence over its paged context; q/out [*, H, D], rows picks their rows (or 0..B-1).
        Head size 64 with an fp16 pool on AVX-512 builds (has_prefill_attention): each query reduced as the
        prefill kernel reduces its rows, whatever the batch; other shapes split long contexts by the batch."""
        _check(q, k_pool, v_pool, out)
        _check_index(table, req_slots, lens, *([] if rows is None else [rows]))
        heads, head_dim = q.shape[1], q.shape[2]
        rc = self._lib.lk_decode_attention(
            q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), _code(k_pool), table.data_ptr(), table.shape[1],
            req_slots.data_ptr(), lens.data_ptr(), None if rows is None else rows.data_ptr(), window or 0,
            req_slots.shape[0], heads, k_pool.shape[1], head_dim, scale, out.data_ptr(), _code(out))
        self._ok(rc, "decode_attention")

    def prefill_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, kv: torch.Tensor,
                          n: int, scale: float, out: torch.Tensor, window: int | None = None) -> None:
        """Causal attention of one sequence's n new tokens (the last n of its len(kv) context slots), each over
        its last `window` positions when given: q and out float32 [n, heads, 64] (rows may be strided), pools
        fp16 [slots, kv_heads, 64]. Each row is reduced exactly as decode_attention reduces a lone query at
        that position (bit-identical)."""
        if (q.dtype != torch.float32 or out.dtype != torch.float32 or k_pool.dtype != torch.float16
                or v_pool.dtype != torch.float16 or q.shape[-1] != 64 or q.stride(2) != 1 or q.stride(1) != 64
                or out.stride(2) != 1 or out.stride(1) != 64 or kv.dtype != torch.long or not kv.is_contiguous()):
            raise KernelError("prefill_attention takes float32 q/out [n, heads, 64], fp16 pools, int64 slots")
        _check(k_pool, v_pool)
        self._ok(self._lib.lk_prefill_attention(q.data_ptr(), q.stride(0), k_pool.data_ptr(), v_pool.data_ptr(),
                                                kv.data_ptr(), kv.shape[0], n, q.shape[1], k_pool.shape[1],
                                                window or 0, scale, out.data_ptr(), out.stride(0)),
                 "prefill_attention")

    def topk_rows(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Indices [rows, k] of each row's k largest values (unordered; equal values: the lower index wins, so
        k = 1 is argmax). x: float32 [rows, n], unit column stride; k <= 64."""
        if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1 or not x.is_cpu:
            raise KernelError("topk_rows takes float32 [rows, n] rows with unit column stride")
        out = torch.empty(x.shape[0], k, dtype=torch.long)
        self._ok(self._lib.lk_topk_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), k, out.data_ptr()),
                 "topk_rows")
        return out

    def row_dots(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """float32 [T, k]: rows[t, j] . x[t] for rows [T, k, D] and x [T, D] (float32, contiguous), each dot
        product in one fixed order whatever T is (row-local, unlike a batched matmul)."""
        _check(rows, x)
        if rows.dtype != torch.float32 or x.dtype != torch.float32 or rows.dim() != 3 or x.shape != (rows.shape[0], rows.shape[2]):
            raise KernelError("row_dots takes float32 rows [T, k, D] and x [T, D]")
        out = torch.empty(rows.shape[0], rows.shape[1])
        self._ok(self._lib.lk_row_dots(rows.data_ptr(), x.data_ptr(), rows.shape[0], rows.shape[1], rows.shape[2],
                                       out.data_ptr()), "row_dots")
        return out

    def lora_bgmv(self, x: torch.Tensor, y: torch.Tensor, a_ptrs: torch.Tensor, bt_ptrs: torch.Tensor,
                  meta_ptrs: torch.Tensor, ranks: torch.Tensor, row_index: torch.Tensor,
                  offsets: torch.Tensor, weight_dtype: torch.dtype = torch.float32) -> None:
        """y[t] += each part's (A_g @ x[t]) @ Bt_part for the rows t of each adapter g, row_index[offsets[g]:
        offsets[g + 1]] (lora_bgmv.c): x [T, in] and y [T, out] float32; per adapter the addresses of its
        contiguous A [R_g, in], its parts' Bt (flat), both `weight_dtype` (float32 or bfloat16), and its int64
        part table (models/lora/adapter.py's LowRankPair; the caller keeps those tensors alive) and R_g (0: no
        pair); int64 tensors."""
        codes = {torch.float32: 0, torch.bfloat16: 1}  # lora_bgmv.c's LK_F32, LK_BF16
        if weight_dtype not in codes:
            raise KernelError(f"lora_bgmv takes float32 or bfloat16 adapter weights, not {weight_dtype}")
        _check(x, y)
        _check_index(a_ptrs, bt_ptrs, meta_ptrs, ranks, row_index, offsets)
        n = ranks.shape[0]
        if (x.dtype != torch.float32 or y.dtype != torch.float32 or x.shape[0] != y.shape[0]
                or offsets.shape[0] != n + 1):
            raise KernelError("lora_bgmv takes float32 x [T, in], y [T, out] and offsets [adapters + 1]")
        self._ok(self._lib.lk_lora_bgmv(x.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], y.shape[1],
                                        a_ptrs.data_ptr(), bt_ptrs.data_ptr(), meta_ptrs.data_ptr(), ranks.data_ptr(),
                                        n, row_index.data_ptr(), offsets.data_ptr(), codes[weight_dtype]),
                 "lora_bgmv")

    def gguf_matmul_bound(self, type_code: int, blocks: torch.Tensor,
                          k: int) -> "Callable[[torch.Tensor, torch.Tensor, int], None]":
        """gguf_matmul for one fixed weight, checked once here: the per-call wrapper costs ~7 us otherwise,
        several percent of a small model's decode step. The returned function takes x (contiguous [M, k],
        float32/bf16/f16), out (float32 rows with unit column stride) and the first of the
        `blocks.shape[0]` columns of out it writes (the caller guarantees they fit)."""
        _check(blocks)
        if blocks.dtype != torch.uint8 or blocks.dim() != 2:
            raise KernelError("gguf_matmul takes uint8 [rows, row bytes] blocks")
        fn, ptr, n = self._lib.lk_gguf_matmul, blocks.data_ptr(), blocks.shape[0]

        def run(x: torch.Tensor, out: torch.Tensor, column: int) -> None:
            rc = fn(type_code, ptr, n, k, x.data_ptr(), _DTYPE_CODES[x.dtype], x.shape[0], out.data_ptr() + 4 * column,
                    out.stride(0))
            if rc != 0:
                raise KernelError(f"gguf_matmul rejected its arguments (code {rc})")

        run.holds = (blocks,)  # the memory behind `ptr` lives as long as the bound call does
        return run

    def gguf_matmul(self, type_code: int, blocks: torch.Tensor, k: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """out = x @ W.T for W given as GGUF blocks (uint8 [N, row bytes], ggml type number `type_code`);
        x [M, k] float32/bf16/f16; out float32 [M, N] or a column slice of a wider row-major matrix."""
        _check(x)
        if out.dtype != torch.float32 or out.stride(1) != 1 or out.shape != (x.shape[0], blocks.shape[0]):
            raise KernelError("gguf_matmul writes float32 rows of the weight's output width")
        self.gguf_matmul_bound(type_code, blocks, k)(x, out, 0)

    def gguf_decode(self, type_code: int, blocks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """GGUF blocks (uint8 [N, row bytes]) as w = ws * u + wc exactly: u uint8 [N, k] (Q8_0 as q + 128),
        ws and wc float32 [N, k / 16]."""
        _check(blocks)
        n = blocks.shape[0]
        u = torch.empty(n, k, dtype=torch.uint8)
        ws, wc = torch.empty(n, k // 16), torch.empty(n, k // 16)
        self._ok(self._lib.lk_gguf_decode(type_code, blocks.data_ptr(), n, k, u.data_ptr(), ws.data_ptr(),
                                          wc.data_ptr()), "gguf_decode")
        return u, ws, wc

    def tiled_rows(self, q: torch.Tensor, scales: torch.Tensor, n: int, k: int, group: int, bits: int, zero: int,
                   indices: torch.Tensor) -> torch.Tensor:
        """float32 rows `indices` of a weight in the tiled layout (as tiled_matmul_bound takes it), exactly as
        TiledWeights.dequantize computes them."""
        _check(q, scales)
        _check_index(indices)
        desc = TiledWeightDesc(q.data_ptr(), scales.data_ptr(), n, k, group, bits, zero,
                               int(scales.dtype == torch.float16))
        out = torch.empty(indices.shape[0], k)
        self._ok(self._lib.lk_tiled_rows(ctypes.addressof(desc), indices.data_ptr(), indices.shape[0], out.data_ptr()),
                 "tiled_rows")
        return out

    def tiled_matmul_bound(self, q: torch.Tensor, scales: torch.Tensor, n: int, k: int, group: int,
                           bits: int, zero: int, levels: int = 1) -> "Callable[[torch.Tensor, torch.Tensor, int], None]":
        """tiled_matmul for one fixed weight in the layout of tiled_matmul.c (built by
        lightllm.models.quant.tiled.TiledWeights); the returned function is called as gguf_matmul_bound's. levels:
        int8 activation levels (2 adds the first rounding's residual, see the kernel)."""
        _check(q, scales)
        if q.dtype != torch.uint8 or scales.dtype not in (torch.float32, torch.float16):
            raise KernelError("tiled_matmul takes uint8 tiles and float32 or float16 scales")
        desc = TiledWeightDesc(q.data_ptr(), scales.data_ptr(), n, k, group, bits, zero,
                               int(scales.dtype == torch.float16))
        fn, desc_ptr = self._lib.lk_tiled_matmul, ctypes.addressof(desc)

        def run(x: torch.Tensor, out: torch.Tensor, column: int) -> None:
            rc = fn(desc_ptr, x.data_ptr(), _DTYPE_CODES[x.dtype], x.shape[0], out.data_ptr() + 4 * column,
                    out.stride(0), levels)
            if rc != 0:
                raise KernelError(f"tiled_matmul rejected its arguments (code {rc}; group {desc.group}, bits "
                                  f"{desc.bits}, zero {desc.zero}, k {desc.k})")

        run.holds = (q, scales, desc)  # the memory behind desc_ptr and the pointers in desc, kept with the call
        return run


def _row_kernel_input(x: torch.Tensor) -> bool:
    return x.is_cpu and x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1 and x.shape[1] > 0


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for [rows, n] logits (first maximum; NaN counts as the maximum, as torch's): the
    one-pass kernel where it runs, ~10x faster than torch's argmax over a 150k vocabulary."""
    kernels = load() if _row_kernel_input(x) else None
    return x.argmax(dim=-1) if kernels is None else kernels.topk_rows(x, 1)[:, 0]


def row_dots(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[T, k] dot products rows[t, j] . x[t] in float32, row-local (the kernel where it runs; else one
    matrix-vector product per row, the same shapes for every row)."""
    rows, x = rows.float().contiguous(), x.float().contiguous()
    kernels = load() if rows.is_cpu else None
    if kernels is not None:
        return kernels.row_dots(rows, x)
    return torch.stack([r @ v for r, v in zip(rows, x)]) if rows.shape[0] else rows.new_empty(0, rows.shape[1])


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [rows, k] of each row's k largest values, in no particular order (the one-pass kernel where it
    runs and k <= 64, else torch.topk)."""
    kernels = load() if _row_kernel_input(x) and k <= min(64, x.shape[1]) else None
    return x.topk(k, dim=-1).indices if kernels is None else kernels.topk_rows(x, k)
