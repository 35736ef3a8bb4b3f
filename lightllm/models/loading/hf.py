"""Hugging Face checkpoints: config.json → ModelConfig and safetensors tensors → canonical names (`layers.{i}.q`,
`embed`, ...). What every family shares is read here; each family (families/) supplies the rest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from lightllm.models.config import ModelConfig
from lightllm.models.families.base import Family
from lightllm.models.families.registry import family_for_hf

_HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "q",
    "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v",
    "self_attn.q_proj.bias": "q_bias",
    "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias",
    "self_attn.o_proj.weight": "o",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
    "mlp.gate_proj.weight": "gate",
    "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down",
    "input_layernorm.weight": "input_norm",
    "post_attention_layernorm.weight": "post_norm",
    # Phi-3 checkpoints hold q/k/v and gate/up fused already
    "self_attn.qkv_proj.weight": "qkv",
    "mlp.gate_up_proj.weight": "gate_up",
    # mixture of experts: the router (Qwen3-MoE, Mixtral)
    "mlp.gate.weight": "router",
    "block_sparse_moe.gate.weight": "router",
}
# per-expert tensors: Qwen3-MoE `mlp.experts.E.gate_proj`, Mixtral `block_sparse_moe.experts.E.w1` (w3 up, w2 down)
_HF_EXPERT_NAMES = {"gate_proj.weight": "gate", "up_proj.weight": "up", "down_proj.weight": "down",
                    "w1.weight": "gate", "w3.weight": "up", "w2.weight": "down"}
_HF_GLOBAL_NAMES = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head"}
# Gemma 3's multimodal checkpoints nest the text decoder
_HF_TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                     "language_model.lm_head.": "lm_head."}


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def config_from_hf(cfg: dict[str, Any], generation_cfg: dict[str, Any] | None = None) -> ModelConfig:
    """The shared reading of a config.json; its family (families/) sets what differs."""
    family = family_for_hf(cfg)
    cfg = family.hf_text_config(cfg)
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    # transformers >= 5 nests rope settings in `rope_parameters`; older configs keep them top-level.
    rope_params = dict(cfg.get("rope_parameters") or {})
    local_rope_theta = cfg.get("rope_local_base_freq")
    if "full_attention" in rope_params:  # per-layer-type rope (Gemma 3 in transformers >= 5)
        local_rope_theta = rope_params.get("sliding_attention", {}).get("rope_theta", local_rope_theta)
        rope_params = dict(rope_params["full_attention"])
    rope_scaling = cfg.get("rope_scaling") or None
    if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
        rope_scaling = rope_params
    if rope_scaling is not None and "original_max_position_embeddings" in cfg:  # Phi-3 keeps it top-level
        rope_scaling = {"original_max_position_embeddings": cfg["original_max_position_embeddings"], **rope_scaling}
    if float(rope_params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor < 1, e.g. Phi-4-mini) are not supported")
    eos = _as_list(cfg.get("eos_token_id"))
    if generation_cfg:
        eos += [e for e in _as_list(generation_cfg.get("eos_token_id")) if e not in eos]
    fields: dict[str, Any] = dict(
        architecture=family.name,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        sliding_window=cfg.get("sliding_window"),
        layer_types=cfg.get("layer_types"),
        local_rope_theta=float(local_rope_theta) if local_rope_theta else None,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos,
    )
    facts = family.hf_facts(cfg)
    if "hidden_act" not in facts:
        fields["hidden_act"] = _activation(cfg.get("hidden_act", "silu"))
    fields.update(facts)
    window = fields["sliding_window"]
    fields["sliding_window"] = int(window) if window else None
    fields["layer_types"] = list(fields["layer_types"]) if fields["layer_types"] and window else None
    return ModelConfig(**fields)



def _activation(name: str) -> str:
    if name == "silu":
        return "silu"
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return "gelu_tanh"
    raise ValueError(f"unsupported hidden_act {name!r} (silu, gelu_pytorch_tanh)")


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def safetensors_tensors(path: Path, family: Family) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    from safetensors import safe_open

    for file in _safetensors_files(path):
        # Left open on purpose: the loaders run after this generator is exhausted; GC closes it.
        handle = safe_open(str(file), framework="pt")
        for name in handle.keys():
            canonical = canonical_hf_name(name, family)
            if canonical is not None:
                yield canonical, (lambda h=handle, n=name: h.get_tensor(n))


def canonical_hf_name(name: str, family: Family | None = None) -> str | None:
    for prefix, replacement in _HF_TEXT_PREFIXES.items():
        if name.startswith(prefix):
            name = replacement + name[len(prefix):]
    if name in _HF_GLOBAL_NAMES:
        return _HF_GLOBAL_NAMES[name]
    if name.startswith("model.layers."):
        _, _, idx, rest = name.split(".", 3)
        layer_names = family.hf_layer_names if family is not None else {}
        if rest in layer_names or rest in _HF_LAYER_NAMES:
            return f"layers.{idx}.{layer_names.get(rest) or _HF_LAYER_NAMES[rest]}"
        if rest.startswith(("mlp.experts.", "block_sparse_moe.experts.")):
            expert, part = rest.split(".experts.", 1)[1].split(".", 1)
            if part in _HF_EXPERT_NAMES:
                return f"layers.{idx}.experts.{expert}.{_HF_EXPERT_NAMES[part]}"
    return None  # rotary inv_freq buffers, vision towers and the like
