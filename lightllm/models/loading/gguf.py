"""GGUF files: metadata → ModelConfig and tensors → canonical names, each decoded exactly or kept in its blocks.
What every family shares is read here; each family (families/) supplies the rest."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from lightllm.models.config import ModelConfig
from lightllm.models.families.registry import family_for_gguf, family_named
from lightllm.models.loading.gguf_file import GgufFile
from lightllm.models.quant.gguf_blocks import gguf_blocks, kept_quantized, runs_from_blocks
from lightllm.models.quant.gguf_decode import dequantize as gguf_dequantize

_GGUF_LAYER_NAMES = {
    "attn_q.weight": "q", "attn_k.weight": "k", "attn_v.weight": "v",
    "attn_q.bias": "q_bias", "attn_k.bias": "k_bias", "attn_v.bias": "v_bias",
    "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
    "attn_output.weight": "o", "ffn_gate.weight": "gate", "ffn_up.weight": "up", "ffn_down.weight": "down",
    "attn_norm.weight": "input_norm", "ffn_norm.weight": "post_norm",
    "post_attention_norm.weight": "attn_out_norm", "post_ffw_norm.weight": "mlp_out_norm",  # Gemma
    "attn_qkv.weight": "qkv",  # Phi-3 (whose ffn_up is the fused gate/up)
    "ffn_gate_inp.weight": "router",  # MoE: router and the experts stacked [experts, out, in]
    "ffn_gate_exps.weight": "experts_gate", "ffn_up_exps.weight": "experts_up", "ffn_down_exps.weight": "experts_down",
}
_GGUF_GLOBAL_NAMES = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head"}


def open_gguf(path: Path) -> Any:
    """One parsed file per file version: the config and the weights read the same one. Tensor data are views
    of one mapping of the file (gguf_file.GgufFile)."""
    stat = Path(path).stat()
    return _open_gguf(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str, size: int, mtime_ns: int) -> GgufFile:
    return GgufFile(path)


def _gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class _Metadata:
    """GgufMetadata over a reader: keys relative to the file's architecture."""

    def __init__(self, reader: Any):
        self.reader = reader
        self.architecture = str(_gguf_value(reader, "general.architecture"))
        self.num_layers = int(self.value("block_count"))

    def value(self, key: str, default: Any = None) -> Any:
        return _gguf_value(self.reader, f"{self.architecture}.{key}", default)


def config_from_gguf(reader: Any) -> ModelConfig:
    """The shared reading of a GGUF file's metadata; its family (families/) sets what differs."""
    if str(_gguf_value(reader, "general.architecture")) == "clip":  # llama.cpp's mmproj: no language model
        raise ValueError("this GGUF file is a vision projector (llama.cpp's mmproj), not a language model: serve "
                         "the language model GGUF and give this file with --mmproj")
    meta = _Metadata(reader)
    num_experts = int(meta.value("expert_count", 0) or 0)
    family = family_for_gguf(meta.architecture, num_experts > 0)
    num_heads = int(meta.value("attention.head_count"))
    hidden = int(meta.value("embedding_length"))
    head_dim = int(meta.value("attention.key_length", hidden // num_heads))
    vocab = meta.value("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling_type = meta.value("rope.scaling.type")
    rope_scaling = None
    if scaling_type and scaling_type != "none":
        rope_scaling = {"rope_type": scaling_type, "factor": meta.value("rope.scaling.factor", 1.0)}
        original = meta.value("rope.scaling.original_context_length")
        if original:
            rope_scaling["original_max_position_embeddings"] = int(original)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_factors_long.weight" in tensors:  # Phi-3 longrope: the factors travel as tensors
        original = int(meta.value("rope.scaling.original_context_length"))
        rope_scaling = {"rope_type": "longrope", "original_max_position_embeddings": original,
                        "long_factor": [float(x) for x in tensors["rope_factors_long.weight"].data],
                        "short_factor": [float(x) for x in tensors["rope_factors_short.weight"].data],
                        "attention_factor": meta.value("rope.scaling.attn_factor")}
    eos = [int(_gguf_value(reader, "tokenizer.ggml.eos_token_id"))] if "tokenizer.ggml.eos_token_id" in reader.fields else []
    window = meta.value("attention.sliding_window")
    fields: dict[str, Any] = dict(
        architecture=family.name,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta.value("feed_forward_length")),
        num_layers=meta.num_layers,
        num_heads=num_heads,
        num_kv_heads=int(meta.value("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(meta.value("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.value("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(meta.value("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        sliding_window=int(window) if window else None,
        attention_scale=head_dim ** -0.5,
        num_experts=num_experts,
        num_experts_per_tok=int(meta.value("expert_used_count", 0) or 0),
        moe_intermediate_size=int(meta.value("expert_feed_forward_length", 0) or meta.value("feed_forward_length")),
        norm_topk_prob=bool(meta.value("expert_weights_norm", True)),
        bos_token_id=_gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos,
        name=str(_gguf_value(reader, "general.name", "model")),
    )
    fields.update(family.gguf_facts(meta))
    return ModelConfig(**fields)


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation that turns HF's rotate-half q/k rows into interleaved pairs."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(path: Path, config: ModelConfig, keep_blocks: bool = False) -> Iterator[tuple[str, Callable[[], Any]]]:
    """Each tensor decoded exactly (bit-identical to gguf's reader); with `keep_blocks`, quantized matrices
    stay as stored (see quant/gguf_blocks.kept_quantized), the embedding table as its blocks (a view of the
    file; quant/embedding.py decodes the rows looked up; a tied lm_head gets the same blocks as "lm_head")."""
    reader = open_gguf(path)
    names = {tensor.name for tensor in reader.tensors}
    # Only llama-arch files (Mixtral too) were permuted by llama.cpp's converter; the others use NeoX rope as HF does.
    permuted = family_named(config.architecture).gguf_qk_permuted
    for tensor in reader.tensors:
        canonical = canonical_gguf_name(tensor.name)
        if canonical is None:
            continue

        def load(t: Any = tensor, name: str = canonical) -> Any:
            heads = None
            if permuted and name.endswith((".q", ".q_bias")):
                heads = config.num_heads
            elif permuted and name.endswith((".k", ".k_bias")):
                heads = config.num_kv_heads
            type_name, shape = t.tensor_type.name, _gguf_shape(t)
            if keep_blocks and name == "embed":  # gathered, not multiplied: rows decoded on lookup
                blocks = gguf_blocks(t.data, type_name, shape)
                if blocks is not None:
                    return blocks
            elif keep_blocks:
                blocks = kept_quantized(t.data, type_name, shape)
                if blocks is not None:
                    return blocks if heads is None else blocks.permute_rows(lambda x: unpermute_qk(x, heads))
            weight = gguf_dequantize(t.data, type_name, shape, name=t.name)
            return weight if heads is None else unpermute_qk(weight, heads).contiguous()

        yield canonical, load
        if (canonical == "embed" and keep_blocks and "output.weight" not in names
                and runs_from_blocks(tensor.tensor_type.name, _gguf_shape(tensor))):
            # tied embeddings: the lm_head multiplies by the same table, so it runs from its blocks (else
            # assemble builds it from the decoded embedding)
            yield "lm_head", lambda t=tensor: gguf_blocks(t.data, t.tensor_type.name, _gguf_shape(t))


def _gguf_shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first


def canonical_gguf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if rest in _GGUF_LAYER_NAMES:
            return f"layers.{idx}.{_GGUF_LAYER_NAMES[rest]}"
    return None
