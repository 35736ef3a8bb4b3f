"""Building blocks: RMSNorm, rotary embedding (linear, llama3, yarn, longrope scaling) and paged attention
(sliding windows, soft-capped scores)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from lightllm.kernels import cpu as cpu_kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op instead of five


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(inv_freq: torch.Tensor, theta: float, head_dim: int,
                   scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (Qwen2.5/Qwen3 long context): interpolate the low frequencies by `factor`, keep the high ones,
    ramp linearly between the dims that turn beta_fast and beta_slow times over the original context;
    cos/sin are scaled by the attention factor 0.1 * ln(factor) + 1."""
    factor = float(scaling["factor"])
    original = float(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(m: float = 1.0) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        attention_factor = get_mscale(mscale) / get_mscale(mscale_all_dim) if mscale and mscale_all_dim else get_mscale()
    return inv_freq, float(attention_factor)


def _longrope_attention_factor(scaling: dict[str, Any], max_positions: int) -> float:
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = int(scaling["original_max_position_embeddings"])
    factor = float(scaling.get("factor") or max_positions / original)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


class RotaryEmbedding:
    """Precomputed cos/sin tables (NeoX/HF "rotate_half" layout) indexed by absolute position.

    Scaling types: linear, llama3 (Llama 3.1+), yarn (Qwen), longrope/su (Phi-3: short factors for positions
    inside the original context, long factors beyond it — chosen per position, as vLLM does; transformers
    switches the whole sequence once it grows past the original context)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None,
                 device: torch.device, dtype: torch.dtype):
        wavelength_base = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        inv_freq = 1.0 / wavelength_base
        scaling = scaling or {}
        rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
        attention_factor = 1.0
        positions = torch.arange(max_positions, dtype=torch.float64)
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        elif rope_type == "yarn":
            inv_freq, attention_factor = _yarn_inv_freq(inv_freq, theta, head_dim, scaling)
        elif rope_type in ("longrope", "su"):
            attention_factor = _longrope_attention_factor(scaling, max_positions)
            original = int(scaling["original_max_position_embeddings"])
            short = 1.0 / (torch.tensor(scaling["short_factor"], dtype=torch.float64) * wavelength_base)
            long = 1.0 / (torch.tensor(scaling["long_factor"], dtype=torch.float64) * wavelength_base)
            inv_freq = torch.where((positions < original).unsqueeze(1), short, long)  # [P, D/2] per position
        elif rope_type != "default":
            raise ValueError(f"rope scaling type {rope_type!r} is not supported "
                             "(default, linear, llama3, yarn, longrope)")
        freqs = positions.unsqueeze(1) * inv_freq if inv_freq.dim() == 2 else torch.outer(positions, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = (emb.cos() * attention_factor).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * attention_factor).to(device=device, dtype=dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for a step's positions, [T, 1, D]; looked up once and shared by every layer."""
        return self.cos.index_select(0, positions).unsqueeze(1), self.sin.index_select(0, positions).unsqueeze(1)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index, cos table, sin table): row i rotates by the tables' row index[i] (the fused kernel's inputs;
        M-RoPE gives per-row tables, models/mrope.py)."""
        return positions, self.cos, self.sin

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] (q and k heads may be stacked)."""
        return torch.addcmul(x * cos, _rotate_half(x), sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@dataclass
class PrefillSegment:
    """One sequence whose new tokens (more than one) attend to its own cached context."""

    token_start: int
    token_end: int
    kv_indices: torch.Tensor  # [ctx] pool indices of the whole context, new tokens included
    # per attention window (None: global) the [n, ctx] bool mask; a None mask means plain causal, n == ctx
    masks: dict[int | None, torch.Tensor | None]


@dataclass
class AttentionMetadata:
    """Per-step description of the ragged batch; built once and shared by every layer."""

    slot_indices: torch.Tensor  # [T] pool index where each new token's K/V is written
    prefill: list[PrefillSegment] = field(default_factory=list)
    decode_token_idx: torch.Tensor | None = None  # [B] rows of the batch that are single-token decodes
    # PyTorch path: padded gather indices and mask
    decode_kv_indices: torch.Tensor | None = None  # [B, L] padded pool indices
    decode_masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)  # per window [B, 1, 1, L]
    # fused-kernel path: the kernel walks req_to_token rows itself
    table: torch.Tensor | None = None  # req_to_token [slots, max_len]
    decode_req_slots: torch.Tensor | None = None  # [B] table rows
    decode_lens: torch.Tensor | None = None  # [B] context lengths, the new token included


def causal_mask(n_new: int, ctx_len: int, sliding_window: int | None, device: torch.device,
                bidirectional: Sequence[tuple[int, int]] = ()) -> torch.Tensor | None:
    """Mask for n_new queries that are the last tokens of a ctx_len context. `bidirectional`: position runs
    [start, end) whose tokens also attend to the later tokens of their own run (Gemma 3's images); the window
    applies over that (transformers: AND(window, OR(causal, same run)))."""
    if n_new == ctx_len and sliding_window is None and not bidirectional:
        return None
    q_pos = torch.arange(ctx_len - n_new, ctx_len, device=device).unsqueeze(1)
    k_pos = torch.arange(ctx_len, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    for start, end in bidirectional:
        if end > ctx_len:
            raise ValueError(f"a prefill chunk ends at {ctx_len}, inside the bidirectional run [{start}, {end})")
        mask |= (q_pos >= start) & (q_pos < end) & (k_pos >= start) & (k_pos < end)
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: AttentionMetadata,
                    scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q: [T, H, D]; pools: [P, KVH, D]. Returns [T, H, D].

    Prefill segments run one SDPA each over their gathered context; all single-token decodes run as one
    padded, masked SDPA so the per-step Python overhead does not grow with the batch. Gathers use
    index_select: on CPU it is ~8x faster than advanced indexing for these shapes.
    """
    if not meta.prefill and meta.decode_token_idx is not None:
        return _decode_attention(q, k_pool, v_pool, meta, scale, window, softcap)  # decode-only: no scatter
    out = torch.empty_like(q)
    for seg in meta.prefill:
        out[seg.token_start:seg.token_end] = prefill_attention(q, k_pool, v_pool, seg, scale, window, softcap)
    if meta.decode_token_idx is not None:
        out.index_copy_(0, meta.decode_token_idx, _decode_attention(q.index_select(0, meta.decode_token_idx),
                                                                    k_pool, v_pool, meta, scale, window, softcap))
    return out


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
               scale: float, softcap: float | None) -> torch.Tensor:
    """[B, H, n, D] queries over [B, KVH, L, D] keys/values. SDPA unless the scores are soft-capped
    (Gemma 2: cap * tanh(scores / cap) before the mask), which SDPA cannot express."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh((q @ k.transpose(-1, -2)) * (scale / softcap)) * softcap
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, seg: PrefillSegment,
                      scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """The segment's queries over its gathered context (compute-bound, so SDPA's blocked kernel) → [n, H, D].

    Inputs are 4-D ([1, heads, n, D]): on CPU only 4-D inputs reach the fused flash kernel, 3-D ones fall
    back to the unfused math path (3x slower for a 512-token prefill)."""
    qs = q[seg.token_start:seg.token_end].transpose(0, 1).unsqueeze(0)
    ks = k_pool.index_select(0, seg.kv_indices).transpose(0, 1).to(q.dtype).unsqueeze(0)
    vs = v_pool.index_select(0, seg.kv_indices).transpose(0, 1).to(q.dtype).unsqueeze(0)
    mask = seg.masks[window]
    o = _attention(qs, ks, vs, mask, mask is None, scale, softcap)
    return o[0].transpose(0, 1)


def prefill_attention_into(out: torch.Tensor, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           seg: PrefillSegment, scale: float, window: int | None = None,
                           softcap: float | None = None) -> None:
    """out = prefill_attention(...) ([n, H, D], the segment's rows), by the fused CPU kernel where it applies
    (fp16 pool, head size 64, float32, no soft-capping: 2-2.5x SDPA's speed here, and each row reduced
    exactly as the decode kernel reduces it), else SDPA."""
    kernels = cpu_kernels.load() if q.device.type == "cpu" else None
    if (kernels is not None and kernels.has_prefill_attention and softcap is None
            and k_pool.dtype == torch.float16 and q.dtype == out.dtype == torch.float32 and q.shape[-1] == 64):
        n = seg.token_end - seg.token_start
        kernels.prefill_attention(q[seg.token_start:seg.token_end], k_pool, v_pool, seg.kv_indices, n, scale, out,
                                  window)
    else:
        out.copy_(prefill_attention(q, k_pool, v_pool, seg, scale, window, softcap))


def _decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: AttentionMetadata,
                      scale: float, window: int | None, softcap: float | None) -> torch.Tensor:
    """q: [B, H, D], one query per decoding sequence → [B, H, D]."""
    batch, length = meta.decode_kv_indices.shape
    flat = meta.decode_kv_indices.reshape(-1)
    kd = k_pool.index_select(0, flat).view(batch, length, *k_pool.shape[1:]).transpose(1, 2).to(q.dtype)  # [B, KVH, L, D]
    vd = v_pool.index_select(0, flat).view(batch, length, *v_pool.shape[1:]).transpose(1, 2).to(q.dtype)
    o = _attention(q.unsqueeze(2), kd, vd, meta.decode_masks[window], False, scale, softcap)
    return o.squeeze(2)
