"""The fused C kernels against the PyTorch ops they replace (fp32 within 1e-5 relative; bf16/fp16 I/O
within their rounding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightllm.kernels import cpu as cpu_kernels
from lightllm.models.layers import RotaryEmbedding

kernels = cpu_kernels.load()
pytestmark = pytest.mark.skipif(kernels is None, reason="no C compiler: fused CPU kernels unavailable")


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("delta_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 300])
def test_add_rms_norm(delta_dtype, out_dtype, rows):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, 576, generator=g)
    delta = None if delta_dtype is None else torch.randn(rows, 576, generator=g).to(delta_dtype)
    weight = torch.rand(576, generator=g) + 0.5
    expected_hidden = hidden + (0 if delta is None else delta.float())
    expected = F.rms_norm(expected_hidden, (576,), weight, 1e-5).to(out_dtype)
    out = torch.empty(rows, 576, dtype=out_dtype)
    kernels.add_rms_norm(hidden, delta, weight, 1e-5, out)
    _close(hidden, expected_hidden, torch.float32)
    _close(out, expected, out_dtype)


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("rows", [1, 100])
def test_silu_mul(in_dtype, out_dtype, rows):
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(rows, 2 * 1536, generator=g) * 6).to(in_dtype)  # wide range exercises exp's clamp
    gate, up = gate_up.float().chunk(2, dim=-1)
    expected = (F.silu(gate) * up).to(out_dtype)
    out = torch.empty(rows, 1536, dtype=out_dtype)
    kernels.silu_mul(gate_up, out)
    _close(out, expected, out_dtype)


def test_exp_extremes():
    gate_up = torch.tensor([[-200.0, -50.0, 0.0, 30.0, 100.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    out = torch.empty(1, 5)
    kernels.silu_mul(gate_up, out)
    _close(out, F.silu(gate_up[:, :5]), torch.float32)


@pytest.mark.parametrize("qkv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_rope_store(qkv_dtype, kv_dtype):
    heads, kv_heads, head_dim, tokens, pool = 9, 3, 64, 7, 40
    g = torch.Generator().manual_seed(2)
    rotary = RotaryEmbedding(head_dim, 1024, 10000.0, None, torch.device("cpu"), torch.float32)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(qkv_dtype)
    positions = torch.tensor([0, 5, 17, 100, 101, 512, 1023])
    slots = torch.tensor([3, 39, 0, 12, 13, 20, 7])
    k_pool = torch.zeros(pool, kv_heads, head_dim, dtype=kv_dtype)
    v_pool = torch.zeros(pool, kv_heads, head_dim, dtype=kv_dtype)
    q_out = torch.empty(tokens, heads, head_dim)
    kernels.rope_store(qkv, heads, kv_heads, positions, rotary.cos, rotary.sin, slots, k_pool, v_pool, q_out)

    cos, sin = rotary.lookup(positions)
    q, k, v = qkv.float().split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    _close(q_out, RotaryEmbedding.apply(q.view(tokens, heads, head_dim), cos, sin), torch.float32)
    _close(k_pool[slots], RotaryEmbedding.apply(k.view(tokens, kv_heads, head_dim), cos, sin).to(kv_dtype), kv_dtype)
    _close(v_pool[slots], v.view(tokens, kv_heads, head_dim).to(kv_dtype), kv_dtype)
    untouched = torch.ones(pool, dtype=torch.bool)
    untouched[slots] = False
    assert k_pool[untouched].abs().sum() == 0 and v_pool[untouched].abs().sum() == 0


def _reference_decode(q, k_pool, v_pool, table, req_slots, lens, window, scale):
    outs = []
    for b in range(len(lens)):
        n = int(lens[b])
        idx = table[req_slots[b], :n]
        if window:
            idx = idx[max(0, n - window):]
        k = k_pool[idx].float().transpose(0, 1)
        v = v_pool[idx].float().transpose(0, 1)
        outs.append(F.scaled_dot_product_attention(q[b:b + 1].transpose(0, 1).unsqueeze(0), k.unsqueeze(0),
                                                   v.unsqueeze(0), scale=scale, enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("lens", [[1], [7, 1, 300, 64], [2048]])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (14, 2, 64), (4, 4, 64), (8, 1, 64), (6, 1, 64),
                                                     (8, 2, 128), (6, 2, 48)])
def test_decode_attention(kv_dtype, window, lens, heads, kv_heads, head_dim):
    """Every group size of the register-blocked hd-64 path, the other specialisations and a generic shape."""
    g = torch.Generator().manual_seed(3)
    pool = sum(lens) + 10
    k_pool = torch.randn(pool, kv_heads, head_dim, generator=g).to(kv_dtype)
    v_pool = torch.randn(pool, kv_heads, head_dim, generator=g).to(kv_dtype)
    perm = torch.randperm(pool, generator=g)  # scattered token slots, as in a long-running pool
    table = torch.zeros(6, max(lens) + 3, dtype=torch.long)
    req_slots = torch.tensor([5, 0, 2, 3][:len(lens)])
    used = 0
    for slot, n in zip(req_slots.tolist(), lens):
        table[slot, :n] = perm[used:used + n]
        used += n
    q = torch.randn(len(lens), heads, head_dim, generator=g) * 3
    lens_t = torch.tensor(lens)
    out = torch.empty_like(q)
    kernels.decode_attention(q, k_pool, v_pool, table, req_slots, lens_t, None, window, 0.125, out)
    expected = _reference_decode(q, k_pool, v_pool, table, req_slots, lens_t, window, 0.125)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_attention_rows_and_bf16_out():
    """Decode rows scattered inside a mixed batch: only the listed rows of `out` are written."""
    heads, kv_heads, head_dim = 4, 2, 32
    g = torch.Generator().manual_seed(4)
    k_pool = torch.randn(50, kv_heads, head_dim, generator=g)
    v_pool = torch.randn(50, kv_heads, head_dim, generator=g)
    table = torch.arange(100).view(2, 50) % 50
    q = torch.randn(6, heads, head_dim, generator=g)
    rows = torch.tensor([4, 1])
    out = torch.zeros(6, heads, head_dim, dtype=torch.bfloat16)
    kernels.decode_attention(q, k_pool, v_pool, table, torch.tensor([1, 0]), torch.tensor([9, 30]), rows, None,
                             head_dim ** -0.5, out)
    expected = _reference_decode(q[rows], k_pool, v_pool, table, torch.tensor([1, 0]), torch.tensor([9, 30]), None,
                                 head_dim ** -0.5)
    _close(out[rows], expected.to(torch.bfloat16), torch.bfloat16)
    assert out[[0, 2, 3, 5]].abs().sum() == 0


def test_rejects_non_contiguous():
    hidden = torch.randn(4, 8).t()
    with pytest.raises(cpu_kernels.KernelError):
        kernels.add_rms_norm(hidden, None, torch.ones(4), 1e-5, torch.empty(8, 4))


@pytest.mark.parametrize("k", [1, 3, 16, 64])
def test_topk_rows_matches_torch(k):
    """The one-pass top-k / argmax kernel: the same index set as torch.topk, and k = 1 the same index as
    torch.argmax, ties (first occurrence) and NaN (counts as the maximum) included."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(7, 1000, generator=g)
    x[1, 10] = x[1, 900] = 50.0  # a tie at the top: the earlier index
    x[2] = -float("inf")
    x[2, 300] = 0.0
    x[3, 17] = float("nan")
    x[4, :] = 1.0  # all equal: the first k indices
    got = kernels.topk_rows(x, k)
    assert got.shape == (7, k)
    for r in (0, 5, 6):
        assert torch.equal(got[r].sort().values, x[r].topk(k).indices.sort().values)
    assert torch.equal(got[4].sort().values, torch.arange(k))
    if k == 1:
        assert torch.equal(got[:, 0], x.argmax(dim=-1))
    wide = torch.randn(3, 151936, generator=g)[:, :150000]  # rows ld apart, a vocabulary-sized row
    assert torch.equal(kernels.topk_rows(wide, 1)[:, 0], wide.argmax(dim=-1))
    with pytest.raises(cpu_kernels.KernelError):
        kernels.topk_rows(x, 65)


def test_argmax_and_topk_helpers_fall_back_to_torch():
    x = torch.randn(4, 300, dtype=torch.float64)  # not a kernel input: torch's answer
    assert torch.equal(cpu_kernels.argmax_rows(x), x.argmax(-1))
    assert torch.equal(cpu_kernels.topk_indices(x, 70).sort().values, x.topk(70).indices.sort().values)
    y = x.float()
    assert torch.equal(cpu_kernels.argmax_rows(y), y.argmax(-1))


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("heads,kv_heads,ctx,new", [(9, 3, 300, 300), (9, 3, 300, 77), (14, 2, 33, 33),
                                                     (4, 4, 17, 5), (8, 1, 1, 1), (6, 2, 40, 1)])
def test_prefill_attention_matches_sdpa(heads, kv_heads, ctx, new, window):
    """The fused causal prefill kernel (head size 64, fp16 pool): whole prompts, prompts after a cached prefix
    (queries are the last `new` of `ctx` positions) and partial blocks, against SDPA on the same values."""
    if not kernels.has_prefill_attention:
        pytest.skip("the prefill attention kernel needs AVX-512")
    g = torch.Generator().manual_seed(ctx + new)
    pool = ctx + 20
    k_pool = torch.randn(pool, kv_heads, 64, generator=g).half()
    v_pool = torch.randn(pool, kv_heads, 64, generator=g).half()
    slots = torch.randperm(pool, generator=g)[:ctx]
    q = torch.randn(new, heads + 2, 64, generator=g)[:, :heads] * 2  # rows strided, as the fused forward's q
    out = torch.empty(new, heads, 64)
    kernels.prefill_attention(q, k_pool, v_pool, slots, new, 0.125, out, window)
    k = k_pool[slots].float().transpose(0, 1).unsqueeze(0)
    v = v_pool[slots].float().transpose(0, 1).unsqueeze(0)
    key, query = torch.arange(ctx).unsqueeze(0), torch.arange(ctx - new, ctx).unsqueeze(1)
    mask = (key <= query) & ((key > query - window) if window else True)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k, v, attn_mask=mask, scale=0.125,
                                              enable_gqa=True)[0].transpose(0, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _context(g: torch.Generator, ctx: int, kv_heads: int, heads: int):
    pool = ctx + 40
    k_pool = torch.randn(pool, kv_heads, 64, generator=g).half()
    v_pool = torch.randn(pool, kv_heads, 64, generator=g).half()
    slots = torch.randperm(pool, generator=g)[:ctx]
    q = torch.randn(ctx, heads, 64, generator=g) * 2
    return k_pool, v_pool, slots, q


@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (14, 2), (8, 1), (4, 4)])
def test_attention_rows_are_bit_identical_in_prefill_and_decode(heads, kv_heads, window):
    """Every query row is reduced over the same 16-key blocks in the same order by both kernels: a token's
    output is bit-identical whether it is a decode query (alone or in a batch of other sequences), a row of a
    whole-prompt prefill, or a row of a chunk of any size and start after cached positions."""
    if not kernels.has_prefill_attention:
        pytest.skip("the fixed-block attention kernels need AVX-512")
    g = torch.Generator().manual_seed(heads * 7 + (window or 0))
    ctx = 150
    k_pool, v_pool, slots, q = _context(g, ctx, kv_heads, heads)
    whole = torch.empty(ctx, heads, 64)
    kernels.prefill_attention(q, k_pool, v_pool, slots, ctx, 0.125, whole, window)
    for start, end in ((0, 1), (0, 17), (5, 40), (16, 32), (33, 34), (100, 150), (149, 150)):  # chunks
        part = torch.empty(end - start, heads, 64)
        kernels.prefill_attention(q[start:end], k_pool, v_pool, slots[:end], end - start, 0.125, part, window)
        assert torch.equal(part, whole[start:end]), (start, end)
    # decode: the token at position p of this sequence, alone and inside batches of other sequences
    table = torch.zeros(4, ctx, dtype=torch.long)
    table[2] = slots
    table[0, :90] = torch.randperm(ctx + 40, generator=g)[:90]
    table[3, :7] = torch.randperm(ctx + 40, generator=g)[:7]
    for pos in (0, 15, 16, 63, 64, 100, 149):
        alone = torch.empty(1, heads, 64)
        kernels.decode_attention(q[pos:pos + 1].contiguous(), k_pool, v_pool, table, torch.tensor([2]),
                                 torch.tensor([pos + 1]), None, window, 0.125, alone)
        assert torch.equal(alone[0], whole[pos]), pos
        batch_q = torch.randn(3, heads, 64, generator=g)
        batch_q[1] = q[pos]
        crowd = torch.empty(3, heads, 64)
        kernels.decode_attention(batch_q, k_pool, v_pool, table, torch.tensor([0, 2, 3]),
                                 torch.tensor([90, pos + 1, 7]), None, window, 0.125, crowd)
        assert torch.equal(crowd[1], whole[pos]), pos
