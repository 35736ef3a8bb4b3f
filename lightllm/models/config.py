"""Architecture-neutral model configuration, built from an HF config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "mixtral", "qwen3moe")

# HF `architectures` entries -> our family name.
_HF_ARCH_TO_FAMILY = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3moe",
}
# HF `model_type` values that name a family differently
_HF_MODEL_TYPE_TO_FAMILY = {"gemma3_text": "gemma3", "qwen3_moe": "qwen3moe"}
GEMMA_FAMILIES = ("gemma2", "gemma3")
MOE_FAMILIES = ("mixtral", "qwen3moe")


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


def gemma_layer_types(num_layers: int, pattern: int) -> list[str]:
    """Gemma's interleaving: every `pattern`-th layer is global, the rest slide (Gemma 2: 2, Gemma 3: 6)."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def config_from_hf(cfg: dict[str, Any], generation_cfg: dict[str, Any] | None = None) -> ModelConfig:
    archs = cfg.get("architectures") or []
    family = next((_HF_ARCH_TO_FAMILY[a] for a in archs if a in _HF_ARCH_TO_FAMILY), None)
    if family is None:
        family = _HF_MODEL_TYPE_TO_FAMILY.get(cfg.get("model_type"), cfg.get("model_type"))
    if family == "gemma3" and "text_config" in cfg:  # the multimodal checkpoint: its text decoder
        cfg = {**cfg["text_config"], "architectures": archs}
    if family not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {archs or cfg.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    # transformers >= 5 nests rope settings in `rope_parameters`; older configs keep them top-level.
    rope_params = dict(cfg.get("rope_parameters") or {})
    local_rope_theta = cfg.get("rope_local_base_freq")
    if "full_attention" in rope_params:  # per-layer-type rope (Gemma 3 in transformers >= 5)
        local_rope_theta = rope_params.get("sliding_attention", {}).get("rope_theta", local_rope_theta)
        rope_params = dict(rope_params["full_attention"])
    rope_theta = float(rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_scaling = cfg.get("rope_scaling") or None
    if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
        rope_scaling = rope_params
    if rope_scaling is not None and "original_max_position_embeddings" in cfg:  # Phi-3 keeps it top-level
        rope_scaling = {"original_max_position_embeddings": cfg["original_max_position_embeddings"], **rope_scaling}
    sliding_window = cfg.get("sliding_window")
    if family in ("qwen2", "qwen3", "qwen3moe") and not cfg.get("use_sliding_window", False):
        sliding_window = None
    if family == "llama":
        sliding_window = None
    layer_types = cfg.get("layer_types")
    if family in GEMMA_FAMILIES and layer_types is None:
        pattern = 2 if family == "gemma2" else int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        layer_types = gemma_layer_types(int(cfg["num_hidden_layers"]), pattern)
    gemma = family in GEMMA_FAMILIES
    if family in MOE_FAMILIES and (cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step") or 1) != 1):
        raise ValueError("MoE checkpoints with dense layers among the expert ones (mlp_only_layers, "
                         "decoder_sparse_step > 1) are not supported")
    if float(rope_params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor < 1, e.g. Phi-4-mini) are not supported")
    head_dim = int(cfg.get("head_dim") or hidden // num_heads)
    eos = _as_list(cfg.get("eos_token_id"))
    if generation_cfg:
        eos += [e for e in _as_list(generation_cfg.get("eos_token_id")) if e not in eos]
    return ModelConfig(
        architecture=family,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=family in ("qwen3", "qwen3moe", "gemma3"),
        sliding_window=int(sliding_window) if sliding_window else None,
        layer_types=list(layer_types) if layer_types and sliding_window else None,
        local_rope_theta=float(local_rope_theta) if gemma and local_rope_theta else None,
        hidden_act="gelu_tanh" if gemma else _activation(cfg.get("hidden_act", "silu")),
        attention_scale=float(cfg["query_pre_attn_scalar"]) ** -0.5 if gemma else None,
        attn_logit_softcap=_optional_float(cfg.get("attn_logit_softcapping")) if gemma else None,
        final_logit_softcap=_optional_float(cfg.get("final_logit_softcapping")) if gemma else None,
        embedding_scale=hidden ** 0.5 if gemma else None,
        norm_weight_offset=1.0 if gemma else 0.0,
        num_experts=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0) if family in MOE_FAMILIES else 0,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
        # Mixtral always renormalises the top-k softmax weights; Qwen3-MoE says so in its config
        norm_topk_prob=True if family == "mixtral" else bool(cfg.get("norm_topk_prob", True)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos,
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _activation(name: str) -> str:
    if name == "silu":
        return "silu"
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return "gelu_tanh"
    raise ValueError(f"unsupported hidden_act {name!r} (silu, gelu_pytorch_tanh)")
