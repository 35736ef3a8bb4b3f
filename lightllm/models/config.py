"""Architecture-neutral model configuration, built from an HF config.json (loading/hf.py) or GGUF metadata
(loading/gguf.py) with each family's facts (families/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each q and k head (weights [head_dim]) before rotary
    sliding_window: int | None = None
    # Per-layer attention kind ("full_attention" / "sliding_attention"); None: every layer uses `sliding_window`
    layer_types: list[str] | None = None
    local_rope_theta: float | None = None  # rope base of the sliding layers when it differs (Gemma 3)
    mrope_section: tuple[int, ...] | None = None  # Qwen2-VL's M-RoPE: frequency pairs per t/h/w (models/mrope.py)
    hidden_act: str = "silu"  # "silu" or "gelu_tanh" (Gemma)
    attention_scale: float | None = None  # None: head_dim ** -0.5
    attn_logit_softcap: float | None = None  # Gemma 2: scores = cap * tanh(scores / cap)
    final_logit_softcap: float | None = None
    embedding_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size)
    norm_weight_offset: float = 0.0  # Gemma's HF norms compute x * (1 + w); folded into w at load
    # Mixture of experts (Mixtral, Qwen3-MoE): every layer's MLP is `num_experts` routed experts
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = "model"

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def is_sliding_layer(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def window_for_layer(self, layer: int) -> int | None:
        """How many most recent positions a query at this layer attends to (itself included); None: all."""
        return self.sliding_window if self.is_sliding_layer(layer) else None
