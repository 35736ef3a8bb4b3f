"""Llama-family decoder (Llama 2/3, SmolLM, Mistral with sliding window, Qwen2 with q/k/v bias, Phi-3 whose
fused checkpoint tensors the loader splits). Families that differ in more than config values subclass
`LlamaModel` and override its hooks: per-head q/k norms (qwen3.py), Gemma's extra norms, scaled embeddings
and soft-capping (gemma.py), routed experts (moe.py).

Weights are plain tensors with q/k/v and gate/up fused at load time, so each layer runs four matmuls.
The model is stateless apart from its weights: the KV pool and the batch layout come in per call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lightllm.kernels import cpu as cpu_kernels
from lightllm.models.config import ModelConfig
from lightllm.models.layers import AttentionMetadata, RotaryEmbedding, paged_attention, prefill_attention_into, rms_norm
from lightllm.models.lora.batch import LoraBatch
from lightllm.models.quant.linear import DenseLinear, GgufLinear, Linear, RowCountDispatch
from lightllm.models.quant.tiled import TiledLinear
from lightllm.models.loading.sharding import TPComm


# ModelConfig.hidden_act -> the gated MLP's activation
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}
REFINED_LOGITS = 16  # candidates per row whose logits a quantized lm_head's exact weights recompute in fp32


@dataclass
class InputEmbeds:
    """Input embeddings that replace the token embeddings of some rows of a batch (an image's tokens)."""

    rows: torch.Tensor  # [R] row indices into the batch
    values: torch.Tensor  # [R, hidden]


@dataclass
class ExpertWeights:
    """Mixture-of-experts MLP: a router over `len(experts)` SwiGLU experts, `top_k` of them per token."""

    router: Linear  # hidden -> num_experts
    gate_up: list[Linear]  # per expert: hidden -> 2 * moe_intermediate
    down: list[Linear]
    top_k: int
    renormalize: bool


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear  # hidden -> (H + 2 * KVH) * D, with Qwen2's bias
    o: Linear
    post_norm: torch.Tensor  # the norm before the MLP
    gate_up: Linear | None  # hidden -> 2 * intermediate; None in MoE layers
    down: Linear | None
    q_norm: torch.Tensor | None = None  # [head_dim] per-head RMSNorm weights (Qwen3, Gemma 3), else None
    k_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None  # Gemma: norms on the attention and MLP outputs
    mlp_out_norm: torch.Tensor | None = None
    experts: ExpertWeights | None = None


@dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: Linear


# The per-family hooks of the decoder layer. `_forward_fused` (the C kernels' layer: SiLU-gated MLP, two norms)
# calls the first group; a family that overrides any of the second runs the PyTorch path (`runs_fused`), so a
# hook can never be skipped silently.
FUSED_PATH_HOOKS = ("_norm_qk_", "_embed", "_input_embeddings", "_reduce", "_logits", "_lora_add")
PYTORCH_PATH_ONLY_HOOKS = ("_attention_output", "_mlp", "_mlp_output")


class LlamaModel:
    # Prefill attention among one image's placeholder tokens goes both ways (Gemma 3): the runner's masks say so
    # and the scheduler never ends a prefill chunk inside such a run. The fused path's kernels mask causally only.
    bidirectional_images = False

    def __init__(self, config: ModelConfig, weights: ModelWeights, device: torch.device, dtype: torch.dtype,
                 comm: TPComm | None = None):
        """`config` is this rank's view under tensor parallelism (its heads, see sharding.shard_config) and
        `comm` the group's collectives; both the whole model's otherwise."""
        self.config = config
        self.comm = comm
        self.weights = weights
        self.device = device
        self.dtype = dtype
        self.scale = config.attention_scale or config.head_dim ** -0.5
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling, device, dtype)
        local_rotary = self.rotary
        if config.local_rope_theta is not None:  # Gemma 3: sliding layers rotate with their own base, unscaled
            local_rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.local_rope_theta,
                                           None, device, dtype)
        self.layer_windows = [config.window_for_layer(i) for i in range(config.num_layers)]
        self.layer_rotary = [local_rotary if config.is_sliding_layer(i) else self.rotary
                             for i in range(config.num_layers)]
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        # Fused C kernels for the elementwise work and the paged decode attention (fp32 CPU models);
        # otherwise, or when they cannot be built, the PyTorch path below.
        self.act = ACTIVATIONS[config.hidden_act]
        fused = (self.runs_fused() and config.hidden_act == "silu" and config.attn_logit_softcap is None
                 and not self.bidirectional_images and device.type == "cpu" and dtype == torch.float32)
        self.kernels = cpu_kernels.load() if fused else None
        self._exact_head_rows = self._exact_head_source(weights, config)
        self._lora: LoraBatch | None = None  # the current step's adapters (forward sets it; _mlp reads it)
        self._layer_index = {id(lw): i for i, lw in enumerate(weights.layers)}

    @classmethod
    def runs_fused(cls) -> bool:
        """Whether the fused C forward computes this family's layer: it keeps every hook it does not call."""
        return all(getattr(cls, hook) is getattr(LlamaModel, hook) for hook in PYTORCH_PATH_ONLY_HOOKS)

    @staticmethod
    def _exact_head_source(weights: ModelWeights, config: ModelConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Where a quantized lm_head's exact weights can be read, row by row: its own GGUF blocks, or with tied
        embeddings the embedding table. None for a dense head (its logits are exact already)."""
        head = weights.lm_head.quantized if isinstance(weights.lm_head, RowCountDispatch) else weights.lm_head
        if isinstance(head, DenseLinear):
            return None
        if isinstance(head, GgufLinear) or (isinstance(head, TiledLinear) and head.exact):
            return head.exact_rows
        if config.tie_word_embeddings:
            return lambda indices: weights.embed.index_select(0, indices)
        return None

    @property
    def attention_windows(self) -> set[int | None]:
        """The distinct attention windows of the layers (None: global); the runner builds a mask for each."""
        return set(self.layer_windows)

    @property
    def uses_paged_decode_kernel(self) -> bool:
        """Decode attention reads the req_to_token table itself (no padded index/mask per step)."""
        return self.kernels is not None

    def _norm_qk_(self, qk: torch.Tensor, lw: LayerWeights) -> None:
        """Hook on the q and k heads, [T, H + KVH, D] (a view into the qkv output), before rotary; changes
        them in place. Llama has no such step; Qwen3 normalises each head here."""

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.comm is not None:
            return self.comm.embed(self.weights.embed, input_ids)
        return self.weights.embed.index_select(0, input_ids)

    def _input_embeddings(self, input_ids: torch.Tensor, embeds: InputEmbeds | None) -> torch.Tensor:
        hidden = self._embed(input_ids)
        if embeds is not None:  # after the family's own embedding scale: image embeddings are not scaled
            hidden.index_copy_(0, embeds.rows, embeds.values.to(hidden.dtype))
        return hidden

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-parallel layer's output: summed over the tensor-parallel ranks (as is without TP)."""
        return partial if self.comm is None else self.comm.all_reduce_(partial)

    def _attention_output(self, out: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        """Hook on the o-projection's (reduced) output before the residual add (Gemma normalises it)."""
        return out

    def _mlp(self, x: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        """The MLP up to its (row-parallel) down projection; the caller reduces its output."""
        gate, up = self._lora_add(lw, "gate_up", x, lw.gate_up(x)).chunk(2, dim=-1)
        act = self.act(gate) * up
        return self._lora_add(lw, "down", act, lw.down(act))

    def _lora_add(self, lw: LayerWeights, target: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` of linear `target` plus the step's adapter deltas for its rows (as is without adapters)."""
        if self._lora is None:
            return out
        return self._lora.add_(self._layer_index[id(lw)], target, x, out)

    def _mlp_output(self, out: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        """Hook on the MLP's reduced output before the residual add (Gemma normalises it)."""
        return out

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        last = rms_norm(hidden, self.weights.final_norm, self.config.rms_norm_eps)
        logits = self.weights.lm_head(last).float()
        if self._exact_head_rows is not None and logits.shape[0]:  # (a step of prefill chunks samples no row)
            self._refine_top_logits_(logits, last)
        return logits if self.comm is None else self.comm.gather_logits(logits)

    def _refine_top_logits_(self, logits: torch.Tensor, last: torch.Tensor) -> None:
        """A quantized lm_head's logits carry its kernel's rounding (bf16 outputs; the GGUF kernel's int8
        activations), enough to flip near-ties. Where the exact weights are at hand (the head's own GGUF
        blocks, or tied embeddings), recompute each row's top candidates in fp32 from them, so the choice
        among close candidates is the exact model's."""
        top = cpu_kernels.topk_indices(logits, min(REFINED_LOGITS, logits.shape[-1]))  # [T, k]
        rows = self._exact_head_rows(top.reshape(-1)).view(*top.shape, -1).float()  # [T, k, D]
        exact = cpu_kernels.row_dots(rows, last)  # row-local: a row's logits do not depend on the batch
        logits.scatter_(1, top, exact)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                k_cache: list[torch.Tensor], v_cache: list[torch.Tensor],
                logit_rows: torch.Tensor, lora: LoraBatch | None = None,
                embeds: InputEmbeds | None = None) -> torch.Tensor:
        """Run one ragged batch; returns float32 logits for the token rows listed in `logit_rows`. `lora`: the
        LoRA adapters of the batch's rows (their deltas are added to the target linears' outputs)."""
        self._lora = lora
        try:
            return self._forward(input_ids, positions, meta, k_cache, v_cache, logit_rows, embeds)
        finally:
            self._lora = None

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], logit_rows: torch.Tensor,
                 embeds: InputEmbeds | None) -> torch.Tensor:
        if self.kernels is not None:
            return self._forward_fused(input_ids, positions, meta, k_cache, v_cache, logit_rows, embeds)
        cfg = self.config
        hidden = self._input_embeddings(input_ids, embeds)
        n_tokens = input_ids.shape[0]
        # cos/sin looked up once per distinct table (one, or Gemma 3's global and local), not once per layer
        rotations = {id(r): r.lookup(positions) for r in {self.rotary, *self.layer_rotary}}
        for layer_idx, lw in enumerate(self.weights.layers):
            residual = hidden
            x = rms_norm(hidden, lw.input_norm, cfg.rms_norm_eps)
            qkv = self._lora_add(lw, "qkv", x, lw.qkv(x))
            qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
            qk = qk.view(n_tokens, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
            self._norm_qk_(qk, lw)
            # q and k heads rotate together: half the rotary ops per layer
            qk = RotaryEmbedding.apply(qk, *rotations[id(self.layer_rotary[layer_idx])])
            q, k = qk[:, :cfg.num_heads], qk[:, cfg.num_heads:]
            v = v.view(n_tokens, cfg.num_kv_heads, cfg.head_dim)
            k_cache[layer_idx].index_copy_(0, meta.slot_indices, k.to(k_cache[layer_idx].dtype))
            v_cache[layer_idx].index_copy_(0, meta.slot_indices, v.to(v_cache[layer_idx].dtype))
            attn = paged_attention(q, k_cache[layer_idx], v_cache[layer_idx], meta, self.scale,
                                   self.layer_windows[layer_idx], cfg.attn_logit_softcap)
            attn = attn.reshape(n_tokens, self.q_size)
            out = self._reduce(self._lora_add(lw, "o", attn, lw.o(attn)))
            hidden = residual + self._attention_output(out, lw)
            residual = hidden
            x = rms_norm(hidden, lw.post_norm, cfg.rms_norm_eps)
            hidden = residual + self._mlp_output(self._reduce(self._mlp(x, lw)), lw)
        return self._logits(hidden.index_select(0, logit_rows))

    def _forward_fused(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       k_cache: list[torch.Tensor], v_cache: list[torch.Tensor],
                       logit_rows: torch.Tensor, embeds: InputEmbeds | None = None) -> torch.Tensor:
        """Same math as `forward`'s PyTorch path; per layer four matmuls and four kernel calls. Matmul
        outputs go straight into the kernels in whatever dtype the matmul produced (bf16 for the quantized
        ones), and each kernel writes the dtype its consumer takes."""
        cfg, k = self.config, self.kernels
        layers = self.weights.layers
        n_tokens = input_ids.shape[0]
        hidden = self._input_embeddings(input_ids, embeds)  # the fp32 residual stream, updated in place
        buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

        def buffer(name: str, width: int, dtype: torch.dtype) -> torch.Tensor:
            key = (name, dtype)
            if key not in buffers:
                buffers[key] = torch.empty(n_tokens, width, dtype=dtype)
            return buffers[key]

        q = torch.empty(n_tokens, cfg.num_heads, cfg.head_dim)
        x = buffer("norm", cfg.hidden_size, layers[0].qkv.input_dtype)
        k.add_rms_norm(hidden, None, layers[0].input_norm, cfg.rms_norm_eps, x)
        tables = {id(r): r.tables(positions) for r in {self.rotary, *self.layer_rotary}}
        for layer_idx, lw in enumerate(layers):
            qkv = self._lora_add(lw, "qkv", x, lw.qkv.raw(x))
            self._norm_qk_(qkv[:, :self.q_size + self.kv_size].view(n_tokens, -1, cfg.head_dim), lw)
            index, cos, sin = tables[id(self.layer_rotary[layer_idx])]
            k.rope_store(qkv, cfg.num_heads, cfg.num_kv_heads, index, cos, sin,
                         meta.slot_indices, k_cache[layer_idx], v_cache[layer_idx], q)
            attn = buffer("attn", self.q_size, lw.o.input_dtype).view(n_tokens, cfg.num_heads, cfg.head_dim)
            for seg in meta.prefill:
                prefill_attention_into(attn[seg.token_start:seg.token_end], q, k_cache[layer_idx], v_cache[layer_idx],
                                       seg, self.scale, self.layer_windows[layer_idx])
            if meta.decode_req_slots is not None:
                k.decode_attention(q, k_cache[layer_idx], v_cache[layer_idx], meta.table, meta.decode_req_slots,
                                   meta.decode_lens, meta.decode_token_idx if meta.prefill else None,
                                   self.layer_windows[layer_idx], self.scale, attn)
            x = buffer("norm", cfg.hidden_size, lw.gate_up.input_dtype)
            attn_rows = attn.view(n_tokens, self.q_size)
            o_out = self._reduce(self._lora_add(lw, "o", attn_rows, lw.o.raw(attn_rows)))
            k.add_rms_norm(hidden, o_out, lw.post_norm, cfg.rms_norm_eps, x)
            act = buffer("act", cfg.intermediate_size, lw.down.input_dtype)
            k.silu_mul(self._lora_add(lw, "gate_up", x, lw.gate_up.raw(x)), act)
            down = self._reduce(self._lora_add(lw, "down", act, lw.down.raw(act)))
            if layer_idx + 1 < len(layers):
                nxt = layers[layer_idx + 1]
                x = buffer("norm", cfg.hidden_size, nxt.qkv.input_dtype)
                k.add_rms_norm(hidden, down, nxt.input_norm, cfg.rms_norm_eps, x)
            else:
                hidden.add_(down)
        return self._logits(hidden.index_select(0, logit_rows))
