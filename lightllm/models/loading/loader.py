"""Load weights from a Hugging Face safetensors directory (loading/hf.py) or a GGUF file (loading/gguf.py) into
our fused layout.

Both sources are first mapped to canonical names (`layers.{i}.q`, `embed`, ...), then `assemble`
fuses q/k/v and gate/up once, so the model code never sees where the weights came from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from lightllm.kernels import cpu as cpu_kernels
from lightllm.models.config import ModelConfig
from lightllm.models.decoder import ExpertWeights, LayerWeights, ModelWeights
from lightllm.models.families.registry import family_named
from lightllm.models.loading.catalog import file_digest
from lightllm.models.loading.gguf import config_from_gguf, gguf_tensors, open_gguf
from lightllm.models.loading.hf import config_from_hf, safetensors_tensors
from lightllm.models.loading.paths import find_gguf_file
from lightllm.models.loading.sharding import Sharder, TPShard, slice_rows
from lightllm.models.quant.factory import QUANT_TYPES, make_linear
from lightllm.models.quant import tile_cache
from lightllm.models.quant.embedding import QuantizedEmbedding
from lightllm.models.quant.weights import GgufBlocks, GroupQuantized, cat_rows

logger = logging.getLogger(__name__)

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
    if gguf_path is None:
        tensors = safetensors_tensors(Path(model_path), family_named(config.architecture))
        return assemble(config, tensors, device, dtype, quant_type, shard)
    tensors = gguf_tensors(gguf_path, config, keep_blocks=quant_type == "gguf")
    # a quantized model's tiles are packed once per file (digest), quant type and shard, then mapped
    digest = file_digest(gguf_path) if quant_type != "none" and device.type == "cpu" and tile_cache.enabled() else None
    tag = f"{quant_type.replace('-', '')}_tp{shard.world if shard else 1}r{shard.rank if shard else 0}"
    with tile_cache.session(digest, tag):
        weights = assemble(config, tensors, device, dtype, quant_type, shard)
    # packing touched every page of the file; what is still read (embedding rows, blocks) comes back on use
    open_gguf(gguf_path).release_pages()
    return weights


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
    embed = embedding_table(cut.vocab(take("embed")), device, dtype)  # vocab-parallel: this rank's rows
    lm_head = loaded.pop("lm_head", None)
    return ModelWeights(embed=embed, layers=layers, final_norm=norm("final_norm"),
                        lm_head=linear(embed if lm_head is None else cut.vocab(lm_head)))  # (embed dense here)


def embedding_table(weight: "torch.Tensor | GgufBlocks", device: torch.device,
                    dtype: torch.dtype) -> "torch.Tensor | QuantizedEmbedding":
    """GGUF blocks stay quantized on CPU (rows decoded on lookup); anything else becomes a dense table."""
    if isinstance(weight, GgufBlocks):
        if device.type == "cpu":
            return QuantizedEmbedding(weight, dtype, cpu_kernels.load())
        weight = weight.dequantize()
    return weight.to(device=device, dtype=dtype)
