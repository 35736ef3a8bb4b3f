"""Load weights from a Hugging Face safetensors directory or a GGUF file into our fused layout.

Both sources are first mapped to canonical names (`layers.{i}.q`, `embed`, ...), then `assemble`
fuses q/k/v and gate/up once, so the model code never sees where the weights came from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from lightllm.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, config_from_hf
from lightllm.models.llama import LayerWeights, ModelWeights
from lightllm.models.paths import find_gguf_file
from lightllm.models.quant import QUANT_TYPES, GroupQuantized, cat_rows, gguf_q4_blocks, make_linear

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
}
_HF_GLOBAL_NAMES = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head"}

_GGUF_LAYER_NAMES = {
    "attn_q.weight": "q", "attn_k.weight": "k", "attn_v.weight": "v",
    "attn_q.bias": "q_bias", "attn_k.bias": "k_bias", "attn_v.bias": "v_bias",
    "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
    "attn_output.weight": "o", "ffn_gate.weight": "gate", "ffn_up.weight": "up", "ffn_down.weight": "down",
    "attn_norm.weight": "input_norm", "ffn_norm.weight": "post_norm",
}
_GGUF_GLOBAL_NAMES = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head"}


def load_model_config(model_path: str | Path) -> ModelConfig:
    gguf_path = find_gguf_file(model_path)
    if gguf_path is not None:
        from gguf import GGUFReader

        return config_from_gguf(GGUFReader(str(gguf_path)))
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
                       dtype: torch.dtype, quant_type: str = "none") -> ModelWeights:
    """`quant_type` is a resolved one (see resolve_quant_type), not 'auto'."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"--quant_type {quant_type!r} is not supported; choose from {QUANT_TYPES}")
    gguf_path = find_gguf_file(model_path)
    if gguf_path is not None:
        tensors = _gguf_tensors(gguf_path, config, keep_q4=quant_type == "gguf")
    else:
        tensors = _safetensors_tensors(Path(model_path))
    return assemble(config, tensors, device, dtype, quant_type)


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


def _safetensors_tensors(path: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    from safetensors import safe_open

    for file in _safetensors_files(path):
        # Left open on purpose: the loaders run after this generator is exhausted; GC closes it.
        handle = safe_open(str(file), framework="pt")
        for name in handle.keys():
            canonical = _canonical_hf_name(name)
            if canonical is not None:
                yield canonical, (lambda h=handle, n=name: h.get_tensor(n))


def _canonical_hf_name(name: str) -> str | None:
    if name in _HF_GLOBAL_NAMES:
        return _HF_GLOBAL_NAMES[name]
    if name.startswith("model.layers."):
        _, _, idx, rest = name.split(".", 3)
        if rest in _HF_LAYER_NAMES:
            return f"layers.{idx}.{_HF_LAYER_NAMES[rest]}"
    return None  # rotary inv_freq buffers and the like


# ---------------------------------------------------------------------------------------------- GGUF


def _gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader: Any) -> ModelConfig:
    arch = _gguf_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    p = f"{arch}."
    num_heads = int(_gguf_value(reader, p + "attention.head_count"))
    hidden = int(_gguf_value(reader, p + "embedding_length"))
    vocab = _gguf_value(reader, p + "vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling_type = _gguf_value(reader, p + "rope.scaling.type")
    rope_scaling = None
    if scaling_type and scaling_type != "none":
        rope_scaling = {"rope_type": scaling_type, "factor": _gguf_value(reader, p + "rope.scaling.factor", 1.0)}
    eos = [int(_gguf_value(reader, "tokenizer.ggml.eos_token_id"))] if "tokenizer.ggml.eos_token_id" in reader.fields else []
    names = [t.name for t in reader.tensors]
    window = _gguf_value(reader, p + "attention.sliding_window")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_gguf_value(reader, p + "feed_forward_length")),
        num_layers=int(_gguf_value(reader, p + "block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_gguf_value(reader, p + "attention.head_count_kv", num_heads)),
        head_dim=int(_gguf_value(reader, p + "attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(_gguf_value(reader, p + "attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_gguf_value(reader, p + "rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(_gguf_value(reader, p + "context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm=arch == "qwen3",
        sliding_window=int(window) if window else None,
        bos_token_id=_gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos,
        name=str(_gguf_value(reader, "general.name", "model")),
    )


def _unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation that turns HF's rotate-half q/k rows into interleaved pairs."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _gguf_tensors(path: Path, config: ModelConfig, keep_q4: bool = False) -> Iterator[tuple[str, Callable[[], Any]]]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    # Only llama-arch files were permuted by llama.cpp's converter; qwen2/qwen3 use NeoX rope as HF does.
    permuted = config.architecture in ("llama", "mistral")
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
            if keep_q4 and t.tensor_type.name in ("Q4_0", "Q4_1") and name not in ("embed",):
                blocks = gguf_q4_blocks(t.data, t.tensor_type.name, (t.data.shape[0], int(t.shape[0])))
                if heads is not None:
                    blocks = blocks.permute_rows(lambda x: torch.from_numpy(_unpermute_qk(x.numpy(), heads)))
                return blocks
            array = dequantize(t.data, t.tensor_type)
            if heads is not None:
                array = _unpermute_qk(array, heads)
            return torch.from_numpy(np.array(array, dtype=np.float32))  # copy: GGUF data is a read-only memmap

        yield canonical, load


def _canonical_gguf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if rest in _GGUF_LAYER_NAMES:
            return f"layers.{idx}.{_GGUF_LAYER_NAMES[rest]}"
    return None


# ---------------------------------------------------------------------------------------------- assemble


def assemble(config: ModelConfig, tensors: Iterator[tuple[str, Callable[[], Any]]],
             device: torch.device, dtype: torch.dtype, quant_type: str = "none") -> ModelWeights:
    """Materialise tensors (with a progress bar), fuse them into per-layer weights, build the linears."""
    loaders = dict(tensors)
    loaded: dict[str, Any] = {}
    for name in tqdm(sorted(loaders), desc="loading weights", unit="tensor", leave=False):
        value = loaders[name]()
        # Linear weights stay float32 on the host until make_linear decides their final form.
        loaded[name] = value if isinstance(value, GroupQuantized) else value.to(
            device=device if quant_type == "none" else "cpu", dtype=dtype if quant_type == "none" else torch.float32)

    def linear(weight: Any, bias: torch.Tensor | None = None):
        if bias is not None:
            bias = bias.to(device=device, dtype=dtype)
        return make_linear(weight, bias, quant_type, device, dtype)

    def small(name: str) -> torch.Tensor:
        return take(name).to(device=device, dtype=dtype)

    def take(name: str) -> Any:
        if name not in loaded:
            raise ValueError(f"weight {name!r} missing from the checkpoint")
        return loaded.pop(name)

    layers = []
    for i in range(config.num_layers):
        p = f"layers.{i}."
        bias = None
        if config.attention_bias:
            bias = torch.cat([take(p + "q_bias"), take(p + "k_bias"), take(p + "v_bias")])
        layers.append(LayerWeights(
            input_norm=small(p + "input_norm"),
            qkv=linear(cat_rows([take(p + "q"), take(p + "k"), take(p + "v")]), bias),
            o=linear(take(p + "o")),
            post_norm=small(p + "post_norm"),
            gate_up=linear(cat_rows([take(p + "gate"), take(p + "up")])),
            down=linear(take(p + "down")),
            q_norm=small(p + "q_norm") if config.qk_norm else None,
            k_norm=small(p + "k_norm") if config.qk_norm else None,
        ))
    embed = small("embed")
    lm_head = loaded.pop("lm_head", None)
    return ModelWeights(embed=embed, layers=layers, final_norm=small("final_norm"),
                        lm_head=linear(embed if lm_head is None else lm_head))
