"""Load weights from a Hugging Face safetensors directory or a GGUF file into our fused layout.

Both sources are first mapped to canonical names (`layers.{i}.q`, `embed`, ...), then `assemble`
fuses q/k/v and gate/up once, so the model code never sees where the weights came from.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from lightllm.models.config import GEMMA_FAMILIES, ModelConfig, config_from_hf, gemma_layer_types
from lightllm.models.quant.gguf_blocks import gguf_blocks, kept_quantized, runs_from_blocks
from lightllm.models.quant.gguf_decode import dequantize as gguf_dequantize
from lightllm.models.decoder import ExpertWeights, LayerWeights, ModelWeights
from lightllm.models.loading.paths import find_gguf_file
from lightllm.models.loading.sharding import Sharder, TPShard, slice_rows
from lightllm.models.quant.factory import QUANT_TYPES, make_linear
from lightllm.models.quant.weights import GgufBlocks, GroupQuantized, cat_rows

logger = logging.getLogger(__name__)

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
# Gemma 2/3: post_attention_layernorm normalises the attention output; the pre-MLP norm has its own name
_HF_GEMMA_LAYER_NAMES = {
    **_HF_LAYER_NAMES,
    "post_attention_layernorm.weight": "attn_out_norm",
    "pre_feedforward_layernorm.weight": "post_norm",
    "post_feedforward_layernorm.weight": "mlp_out_norm",
}
# per-expert tensors: Qwen3-MoE `mlp.experts.E.gate_proj`, Mixtral `block_sparse_moe.experts.E.w1` (w3 up, w2 down)
_HF_EXPERT_NAMES = {"gate_proj.weight": "gate", "up_proj.weight": "up", "down_proj.weight": "down",
                    "w1.weight": "gate", "w3.weight": "up", "w2.weight": "down"}
_HF_GLOBAL_NAMES = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head"}
# Gemma 3's multimodal checkpoints nest the text decoder
_HF_TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                     "language_model.lm_head.": "lm_head."}

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


def load_model_config(model_path: str | Path) -> ModelConfig:
    gguf_path = find_gguf_file(model_path)
    if gguf_path is not None:
        return config_from_gguf(open_gguf(gguf_path))
    path = Path(model_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a directory with config.json")
    cfg = json.loads((path / "config.json").read_text())
    gen_path = path / "generation_config.json"
    gen_cfg = json.loads(gen_path.read_text()) if gen_path.exists() else None
    config = config_from_hf(cfg, gen_cfg)
    config.name = path.name
    return config


def resolve_quant_type(quant_type: str, model_path: str | Path, device: torch.device) -> str:
    """'auto': a GGUF file on CPU keeps its own quantization ('gguf', as llama.cpp runs it); everything else
    runs the checkpoint's dense weights ('none')."""
    if quant_type != "auto":
        return quant_type
    return "gguf" if device.type == "cpu" and find_gguf_file(model_path) is not None else "none"


def load_model_weights(model_path: str | Path, config: ModelConfig, device: torch.device,
                       dtype: torch.dtype, quant_type: str = "none", shard: TPShard | None = None) -> ModelWeights:
    """`quant_type` is a resolved one (see resolve_quant_type), not 'auto'; `shard`: this rank's part of a
    tensor-parallel group (`config` stays the whole model's)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"--quant_type {quant_type!r} is not supported; choose from {QUANT_TYPES}")
    gguf_path = find_gguf_file(model_path)
    if gguf_path is not None:
        tensors = _gguf_tensors(gguf_path, config, keep_blocks=quant_type == "gguf")
    else:
        tensors = _safetensors_tensors(Path(model_path), config.architecture)
    return assemble(config, tensors, device, dtype, quant_type, shard)


# ---------------------------------------------------------------------------------------------- HF files


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def _safetensors_tensors(path: Path, family: str) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    from safetensors import safe_open

    for file in _safetensors_files(path):
        # Left open on purpose: the loaders run after this generator is exhausted; GC closes it.
        handle = safe_open(str(file), framework="pt")
        for name in handle.keys():
            canonical = _canonical_hf_name(name, family)
            if canonical is not None:
                yield canonical, (lambda h=handle, n=name: h.get_tensor(n))


def _canonical_hf_name(name: str, family: str = "llama") -> str | None:
    for prefix, replacement in _HF_TEXT_PREFIXES.items():
        if name.startswith(prefix):
            name = replacement + name[len(prefix):]
    if name in _HF_GLOBAL_NAMES:
        return _HF_GLOBAL_NAMES[name]
    if name.startswith("model.layers."):
        _, _, idx, rest = name.split(".", 3)
        layer_names = _HF_GEMMA_LAYER_NAMES if family in GEMMA_FAMILIES else _HF_LAYER_NAMES
        if rest in layer_names:
            return f"layers.{idx}.{layer_names[rest]}"
        if rest.startswith(("mlp.experts.", "block_sparse_moe.experts.")):
            expert, part = rest.split(".experts.", 1)[1].split(".", 1)
            if part in _HF_EXPERT_NAMES:
                return f"layers.{idx}.experts.{expert}.{_HF_EXPERT_NAMES[part]}"
    return None  # rotary inv_freq buffers, vision towers and the like


# ---------------------------------------------------------------------------------------------- GGUF


def open_gguf(path: Path) -> Any:
    """One parsed reader per file version (parsing a 0.5B model's metadata takes seconds): the config and
    the weights read the same one. Tensor data stays a read-only memmap of the file."""
    stat = Path(path).stat()
    return _open_gguf(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str, size: int, mtime_ns: int) -> Any:
    from gguf import GGUFReader

    return GGUFReader(path)


def _gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "qwen3moe")


def config_from_gguf(reader: Any) -> ModelConfig:
    arch = _gguf_value(reader, "general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_GGUF_ARCHITECTURES)}")
    p = f"{arch}."
    num_experts = int(_gguf_value(reader, p + "expert_count", 0) or 0)
    family = "mixtral" if arch == "llama" and num_experts else arch  # llama.cpp writes Mixtral as llama
    num_heads = int(_gguf_value(reader, p + "attention.head_count"))
    hidden = int(_gguf_value(reader, p + "embedding_length"))
    num_layers = int(_gguf_value(reader, p + "block_count"))
    head_dim = int(_gguf_value(reader, p + "attention.key_length", hidden // num_heads))
    vocab = _gguf_value(reader, p + "vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling_type = _gguf_value(reader, p + "rope.scaling.type")
    rope_scaling = None
    if scaling_type and scaling_type != "none":
        rope_scaling = {"rope_type": scaling_type, "factor": _gguf_value(reader, p + "rope.scaling.factor", 1.0)}
        original = _gguf_value(reader, p + "rope.scaling.original_context_length")
        if original:
            rope_scaling["original_max_position_embeddings"] = int(original)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_factors_long.weight" in tensors:  # Phi-3 longrope: the factors travel as tensors
        original = int(_gguf_value(reader, p + "rope.scaling.original_context_length"))
        rope_scaling = {"rope_type": "longrope", "original_max_position_embeddings": original,
                        "long_factor": [float(x) for x in tensors["rope_factors_long.weight"].data],
                        "short_factor": [float(x) for x in tensors["rope_factors_short.weight"].data],
                        "attention_factor": _gguf_value(reader, p + "rope.scaling.attn_factor")}
    eos = [int(_gguf_value(reader, "tokenizer.ggml.eos_token_id"))] if "tokenizer.ggml.eos_token_id" in reader.fields else []
    window = _gguf_value(reader, p + "attention.sliding_window")
    gemma = arch in GEMMA_FAMILIES
    layer_types = gemma_layer_types(num_layers, 2 if arch == "gemma2" else 6) if gemma and window else None
    return ModelConfig(
        architecture=family,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_gguf_value(reader, p + "feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(_gguf_value(reader, p + "attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(_gguf_value(reader, p + "attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_gguf_value(reader, p + "rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(_gguf_value(reader, p + "context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        sliding_window=int(window) if window else None,
        layer_types=layer_types,
        # llama.cpp's Gemma 3 rotates its sliding layers with base 10000 whatever the global base is
        local_rope_theta=10000.0 if arch == "gemma3" else None,
        hidden_act="gelu_tanh" if gemma else "silu",
        attention_scale=head_dim ** -0.5,
        attn_logit_softcap=_gguf_value(reader, p + "attn_logit_softcapping") if gemma else None,
        final_logit_softcap=_gguf_value(reader, p + "final_logit_softcapping") if gemma else None,
        embedding_scale=hidden ** 0.5 if gemma else None,
        norm_weight_offset=0.0,  # llama.cpp's converter stores Gemma's norms with the +1 already added
        num_experts=num_experts,
        num_experts_per_tok=int(_gguf_value(reader, p + "expert_used_count", 0) or 0),
        moe_intermediate_size=int(_gguf_value(reader, p + "expert_feed_forward_length", 0)
                                  or _gguf_value(reader, p + "feed_forward_length")),
        norm_topk_prob=bool(_gguf_value(reader, p + "expert_weights_norm", True)),
        bos_token_id=_gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos,
        name=str(_gguf_value(reader, "general.name", "model")),
    )


def _unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation that turns HF's rotate-half q/k rows into interleaved pairs."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _gguf_tensors(path: Path, config: ModelConfig, keep_blocks: bool = False) -> Iterator[tuple[str, Callable[[], Any]]]:
    """Each tensor decoded exactly (bit-identical to gguf's reader); with `keep_blocks`, quantized matrices
    stay as stored (see quant/gguf_blocks.kept_quantized), the embedding table excepted (it is gathered, not
    multiplied; a tied lm_head gets its blocks as "lm_head")."""
    reader = open_gguf(path)
    names = {tensor.name for tensor in reader.tensors}
    # Only llama-arch files (Mixtral too) were permuted by llama.cpp's converter; the others use NeoX rope as HF does.
    permuted = config.architecture in ("llama", "mistral", "mixtral")
    for tensor in reader.tensors:
        canonical = _canonical_gguf_name(tensor.name)
        if canonical is None:
            continue

        def load(t: Any = tensor, name: str = canonical) -> Any:
            heads = None
            if permuted and name.endswith((".q", ".q_bias")):
                heads = config.num_heads
            elif permuted and name.endswith((".k", ".k_bias")):
                heads = config.num_kv_heads
            type_name, shape = t.tensor_type.name, _gguf_shape(t)
            if keep_blocks and name != "embed":
                blocks = kept_quantized(t.data, type_name, shape)
                if blocks is not None:
                    return blocks if heads is None else blocks.permute_rows(lambda x: _unpermute_qk(x, heads))
            weight = gguf_dequantize(t.data, type_name, shape, name=t.name)
            return weight if heads is None else _unpermute_qk(weight, heads).contiguous()

        yield canonical, load
        if (canonical == "embed" and keep_blocks and "output.weight" not in names
                and runs_from_blocks(tensor.tensor_type.name, _gguf_shape(tensor))):
            # tied embeddings: the lm_head multiplies by the same table, so it runs from its blocks (else
            # assemble builds it from the decoded embedding)
            yield "lm_head", lambda t=tensor: gguf_blocks(t.data, t.tensor_type.name, _gguf_shape(t))


def _gguf_shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first


def _canonical_gguf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if rest in _GGUF_LAYER_NAMES:
            return f"layers.{idx}.{_GGUF_LAYER_NAMES[rest]}"
    return None


# ---------------------------------------------------------------------------------------------- assemble


def split_experts(stacked: Any, num_experts: int) -> list[Any]:
    """One tensor holding every expert's weights ([experts, out, in], or [experts * out, in] when kept
    quantized) → per-expert [out, in] weights."""
    if isinstance(stacked, (GgufBlocks, GroupQuantized)):
        rows = stacked.shape[0] // num_experts
        return [slice_rows(stacked, e * rows, (e + 1) * rows) for e in range(num_experts)]
    return list(stacked.reshape(num_experts, -1, stacked.shape[-1]).unbind(0))


def assemble(config: ModelConfig, tensors: Iterator[tuple[str, Callable[[], Any]]],
             device: torch.device, dtype: torch.dtype, quant_type: str = "none",
             shard: TPShard | None = None) -> ModelWeights:
    """Materialise tensors (with a progress bar), cut this rank's shard, fuse them into per-layer weights,
    build the linears."""
    cut = Sharder(config, shard)
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    loaders = dict(tensors)
    loaded: dict[str, Any] = {}
    for name in tqdm(sorted(loaders), desc="loading weights", unit="tensor", leave=False):
        value = loaders[name]()
        # Linear weights stay float32 on the host until make_linear decides their final form.
        loaded[name] = value if isinstance(value, (GroupQuantized, GgufBlocks)) else value.to(
            device=device if quant_type == "none" else "cpu", dtype=dtype if quant_type == "none" else torch.float32)

    def linear(weight: Any, bias: torch.Tensor | None = None):
        if bias is not None:
            bias = bias.to(device=device, dtype=dtype)
        return make_linear(weight, bias, quant_type, device, dtype)

    def norm(name: str) -> torch.Tensor:
        # Gemma's HF norms compute x * (1 + w): fold the 1 in once, in float32, as transformers adds it
        weight = take(name).float() + config.norm_weight_offset
        return weight.to(device=device, dtype=dtype)

    def optional_norm(name: str) -> torch.Tensor | None:
        return norm(name) if name in loaded else None

    def take(name: str) -> Any:
        if name not in loaded:
            raise ValueError(f"weight {name!r} missing from the checkpoint")
        return loaded.pop(name)

    def fused(p: str, fused_name: str, parts: tuple[str, ...], sizes: list[int]) -> Any:
        """This rank's rows of each part (q/k/v, gate/up), concatenated; the checkpoint may hold them as one
        fused tensor (Phi-3)."""
        if p + fused_name in loaded:
            return cat_rows(cut.split_rows(take(p + fused_name), sizes))
        if fused_name == "gate_up" and p + "gate" not in loaded and p + "up" in loaded:
            return cat_rows(cut.split_rows(take(p + "up"), sizes))  # Phi-3 GGUF: ffn_up stacks gate and up
        return cat_rows([cut.rows(take(p + part)) for part in parts])

    def experts(p: str) -> ExpertWeights:
        n = config.num_experts
        if p + "experts_gate" in loaded:  # GGUF: each tensor stacks the experts, [experts, out, in]
            gates, ups, downs = (split_experts(take(p + f"experts_{part}"), n) for part in ("gate", "up", "down"))
        else:
            gates, ups, downs = ([take(f"{p}experts.{e}.{part}") for e in range(n)] for part in ("gate", "up", "down"))
        # the router stays dense under every --quant_type: rounding it would change which experts run
        router = make_linear(take(p + "router"), None, "none", device, dtype)
        return ExpertWeights(router=router,
                             gate_up=[linear(cat_rows([cut.rows(g), cut.rows(u)])) for g, u in zip(gates, ups)],
                             down=[linear(cut.cols(d)) for d in downs],
                             top_k=config.num_experts_per_tok, renormalize=config.norm_topk_prob)

    layers = []
    for i in range(config.num_layers):
        p = f"layers.{i}."
        bias = None
        if config.attention_bias:
            bias = torch.cat([cut.rows(take(p + "q_bias")), cut.rows(take(p + "k_bias")),
                              cut.rows(take(p + "v_bias"))])
        moe = experts(p) if config.num_experts else None
        layers.append(LayerWeights(
            input_norm=norm(p + "input_norm"),
            qkv=linear(fused(p, "qkv", ("q", "k", "v"), [q_rows, kv_rows, kv_rows]), bias),
            o=linear(cut.cols(take(p + "o"))),
            post_norm=norm(p + "post_norm"),
            gate_up=None if moe else linear(fused(p, "gate_up", ("gate", "up"), [config.intermediate_size] * 2)),
            down=None if moe else linear(cut.cols(take(p + "down"))),
            q_norm=norm(p + "q_norm") if config.qk_norm else None,
            k_norm=norm(p + "k_norm") if config.qk_norm else None,
            attn_out_norm=optional_norm(p + "attn_out_norm"),
            mlp_out_norm=optional_norm(p + "mlp_out_norm"),
            experts=moe,
        ))
    embed = cut.vocab(take("embed")).to(device=device, dtype=dtype)  # vocab-parallel: this rank's rows
    lm_head = loaded.pop("lm_head", None)
    return ModelWeights(embed=embed, layers=layers, final_norm=norm("final_norm"),
                        lm_head=linear(embed if lm_head is None else cut.vocab(lm_head)))
