"""HF config.json -> ModelConfig and architecture -> model class, without loading any weights."""

from __future__ import annotations

import pytest

from lightllm.models.config import config_from_hf
from lightllm.models.llama import LlamaModel
from lightllm.models.qwen3 import Qwen3Model
from lightllm.models.registry import model_class_for

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
