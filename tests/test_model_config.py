"""HF config.json -> ModelConfig and architecture -> model class, without loading any weights."""

from __future__ import annotations

import pytest

from lightllm.models.loading.hf import config_from_hf
from lightllm.models.decoder import LlamaModel
from lightllm.models.families.qwen3 import Qwen3Model
from lightllm.models.families.registry import model_class_for

QWEN3_0_6B = {  # Qwen/Qwen3-0.6B's config.json, abridged
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "head_dim": 128,
    "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "use_sliding_window": False, "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645,
}


def test_qwen3_config():
    cfg = config_from_hf(QWEN3_0_6B)
    assert cfg.architecture == "qwen3" and cfg.qk_norm
    assert cfg.head_dim == 128 != cfg.hidden_size // cfg.num_heads
    assert not cfg.attention_bias and cfg.sliding_window is None and cfg.tie_word_embeddings
    assert model_class_for("qwen3") is Qwen3Model
    assert model_class_for("qwen2") is LlamaModel
    assert not config_from_hf({**QWEN3_0_6B, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}).qk_norm


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(ValueError, match="unsupported architecture.*qwen3"):
        config_from_hf({**QWEN3_0_6B, "architectures": ["FalconForCausalLM"], "model_type": "falcon"})
    with pytest.raises(ValueError, match="unsupported architecture.*qwen3"):
        model_class_for("falcon")


GEMMA3_270M = {  # google/gemma-3-270m's config.json, abridged
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640,
    "intermediate_size": 2048, "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 18,
    "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 512, "vocab_size": 262144,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3, "bos_token_id": 2, "eos_token_id": [1, 106],
}


def test_gemma3_config():
    from lightllm.models.families.gemma2 import GemmaModel

    cfg = config_from_hf(GEMMA3_270M)
    assert cfg.architecture == "gemma3" and model_class_for("gemma3") is GemmaModel
    assert cfg.qk_norm and cfg.hidden_act == "gelu_tanh" and cfg.norm_weight_offset == 1.0
    assert cfg.embedding_scale == 640 ** 0.5 and cfg.attention_scale == 256 ** -0.5
    assert [cfg.window_for_layer(i) for i in range(6)] == [512] * 5 + [None]
    assert cfg.rope_theta == 1e6 and cfg.local_rope_theta == 10000.0
    # without layer_types, the documented pattern (every sixth layer global)
    no_types = config_from_hf({k: v for k, v in GEMMA3_270M.items() if k != "layer_types"})
    assert no_types.layer_types == cfg.layer_types
    # the multimodal checkpoint: its text decoder, the gemma3_vl family (images, models/vision/gemma3.py)
    nested = config_from_hf({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                             "text_config": GEMMA3_270M})
    assert nested.architecture == "gemma3_vl" and nested.num_layers == 18 and nested.layer_types == cfg.layer_types


def test_gemma2_config_soft_caps_and_alternating_windows():
    cfg = config_from_hf({**GEMMA3_270M, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
                          "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "layer_types": None})
    assert cfg.attn_logit_softcap == 50.0 and cfg.final_logit_softcap == 30.0 and not cfg.qk_norm
    assert [cfg.window_for_layer(i) for i in range(4)] == [512, None, 512, None]


def test_phi3_longrope_config():
    cfg = config_from_hf({
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32064,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "sliding_window": 262144,
        "rope_scaling": {"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48}})
    assert cfg.architecture == "phi3" and cfg.rope_scaling["original_max_position_embeddings"] == 4096
    assert cfg.sliding_window == 262144  # transformers applies Phi-3's window; so do we
    with pytest.raises(ValueError, match="partial rotary"):
        config_from_hf({**QWEN3_0_6B, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
                        "partial_rotary_factor": 0.75})


def test_moe_configs():
    from lightllm.models.families.mixtral import MixtralModel
    from lightllm.models.families.qwen3moe import Qwen3MoeModel

    qwen3_moe = {**QWEN3_0_6B, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                 "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
                 "decoder_sparse_step": 1, "mlp_only_layers": []}
    cfg = config_from_hf(qwen3_moe)
    assert (cfg.architecture, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == \
        ("qwen3moe", 128, 8, 768)
    assert cfg.qk_norm and cfg.norm_topk_prob and model_class_for("qwen3moe") is Qwen3MoeModel
    with pytest.raises(ValueError, match="mlp_only_layers"):
        config_from_hf({**qwen3_moe, "mlp_only_layers": [0]})
    mixtral = config_from_hf({**QWEN3_0_6B, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                              "num_local_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False})
    assert mixtral.num_experts == 8 and mixtral.norm_topk_prob  # Mixtral always renormalises
    assert not mixtral.qk_norm and model_class_for("mixtral") is MixtralModel
