"""What a model family is: the names that select it, where its checkpoint's facts live, and its model class.

Each family file (families/*.py) declares one `Family`; families/registry.py collects them. The loaders
(loading/hf.py, loading/gguf.py) read what every family shares and ask the family for the rest through the
small hooks below, so adding a family is adding one file and one line in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from lightllm.models.decoder import LlamaModel


class GgufMetadata(Protocol):
    """A GGUF file's key/value metadata, keys relative to the architecture (`attention.sliding_window` means
    `{general.architecture}.attention.sliding_window`)."""

    architecture: str
    num_layers: int

    def value(self, key: str, default: Any = None) -> Any: ...


def _no_facts(*_: Any) -> dict[str, Any]:
    return {}


def _same(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg


@dataclass(frozen=True)
class Family:
    name: str  # ModelConfig.architecture
    model_class: type[LlamaModel]
    hf_architectures: tuple[str, ...] = ()  # config.json `architectures` entries
    hf_model_types: tuple[str, ...] = ()  # config.json `model_type` values (when no architecture matches)
    gguf_architecture: str | None = None  # GGUF `general.architecture`
    gguf_has_experts: bool = False  # llama.cpp writes Mixtral as `llama` with an expert count
    gguf_qk_permuted: bool = False  # llama.cpp's converter interleaved the q/k rows (llama-arch files)
    # canonical names of HF per-layer tensors that differ from the shared map (loading/hf.py)
    hf_layer_names: Mapping[str, str] = field(default_factory=dict)
    # config.json -> the decoder's part of it (multimodal checkpoints nest the text model)
    hf_text_config: Callable[[dict[str, Any]], dict[str, Any]] = _same
    # ModelConfig fields this family sets from config.json, over the shared reading
    hf_facts: Callable[[dict[str, Any]], dict[str, Any]] = _no_facts
    # ModelConfig fields this family sets from GGUF metadata, over the shared reading
    gguf_facts: Callable[[GgufMetadata], dict[str, Any]] = _no_facts
    # vision-language checkpoints: the loader of their vision tower in models/vision/registry.py (None: text only)
    vision: str | None = None


def no_hf_sliding_window(cfg: dict[str, Any]) -> dict[str, Any]:
    """Qwen configs carry a `sliding_window` that applies only with `use_sliding_window`."""
    return {} if cfg.get("use_sliding_window", False) else {"sliding_window": None}


def refuse_mixed_moe_layers(cfg: dict[str, Any]) -> None:
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step") or 1) != 1:
        raise ValueError("MoE checkpoints with dense layers among the expert ones (mlp_only_layers, "
                         "decoder_sparse_step > 1) are not supported")


def hf_expert_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    """The routed-expert fields of an MoE config.json (Mixtral, Qwen3-MoE)."""
    refuse_mixed_moe_layers(cfg)
    return {"num_experts": int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)}
