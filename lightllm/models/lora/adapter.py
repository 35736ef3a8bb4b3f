"""A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) read and checked against the
base model, as float32 or bfloat16 low-rank pairs laid out for the decoder's fused linears.

The decoder runs q/k/v as one `qkv` matmul and gate/up as one `gate_up` matmul, so an adapter's per-module
pairs are joined per fused linear: A = [A_q; A_k; A_v] (ranks stacked: one shrink x @ A.T for all parts), and
each part's B (times its scaling, transposed) expands its own ranks into its own columns of the output: the
same sum as PEFT's per-module `scaling * B(A(x))`, with no zero blocks stored or multiplied.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lightllm.models.config import ModelConfig
from lightllm.models.loading.sharding import TPShard, shard_config

# PEFT module name -> (fused linear of the decoder, part index within it)
MODULE_PARTS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0),
}
FUSED_TARGETS = ("qkv", "o", "gate_up", "down")
_TENSOR = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """An adapter this server cannot serve with its model (the message says why)."""


@dataclass
class LowRankPair:
    """One fused linear's low-rank pair: v = x @ a.T (a [R, in], every part's ranks stacked), then for each part
    (rank r, first output column c, width w) out[:, c:c + w] += v[:, its ranks] @ bt_part, bt_part [r, w] being
    its B transposed with the scaling folded in. `bt` holds the parts' bt_part one after the other (flat) and
    `meta` [1 + 3 * parts] = (parts, then r, c, w per part): the C kernel's view; all contiguous."""

    a: torch.Tensor
    bt: torch.Tensor
    meta: torch.Tensor
    parts: list[tuple[int, int, int, torch.Tensor]]  # (first rank, first column, rank, bt_part view)


_keys = itertools.count(1)


@dataclass
class AdapterWeights:
    """An adapter as read from its folder and checked against the whole model: per (layer, PEFT module) its A
    [r, in] and its B [out, r] with the scaling folded in. What tensor-parallel ranks are sent to cut their
    own shard from (`shard_adapter`)."""

    name: str
    path: str
    rank: int  # the largest rank of its modules
    target_modules: list[str]
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


@dataclass(eq=False)  # identity: batches and caches key by the adapter object
class LoraAdapter:
    name: str
    path: str
    rank: int  # the largest rank of its modules
    target_modules: list[str]
    layers: list[dict[str, LowRankPair]]  # per decoder layer: fused target -> its pair (absent: no delta)
    # one per read of a folder: under tensor parallelism every rank holds this read's shard under this key
    key: int = dataclasses.field(default_factory=lambda: next(_keys))

    @functools.cached_property
    def nbytes(self) -> int:
        """Bytes of its weights (what /metrics reports per step: computed once)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for p in layer.values() for t in (p.a, p.bt))


def part_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each PEFT target module in the base model."""
    q, kv, h, inter = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.hidden_size, \
        config.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, inter),
            "up_proj": (h, inter), "down_proj": (inter, h)}


def _pattern_value(patterns: dict, module_key: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a pattern applies when it matches the module key's end."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return value
    return default


def read_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{folder}: no adapter_config.json (expected a PEFT LoRA adapter folder)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, allowed in (("use_dora", (False, None)), ("fan_in_fan_out", (False, None)), ("bias", ("none", None))):
        if cfg.get(key) not in allowed:
            raise AdapterError(f"{path}: {key}={cfg.get(key)!r} is not supported (only plain LoRA)")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save {cfg['modules_to_save']} is not supported (whole-module copies)")
    _check_types(cfg, path)
    return cfg


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(cfg: dict, path: Path) -> None:
    """The fields the loader computes with have the types PEFT writes (a hand-edited config must be refused
    with a message, not fail later with a TypeError or re.error)."""
    for key in ("r", "lora_alpha"):
        if key in cfg and not _is_number(cfg[key]):
            raise AdapterError(f"{path}: {key} must be a number, not {cfg[key]!r}")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise AdapterError(f"{path}: use_rslora must be true or false")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, dict) or not all(_is_number(v) for v in patterns.values()):
            raise AdapterError(f"{path}: {key} must map module patterns to numbers")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise AdapterError(f"{path}: {key} pattern {pattern!r} is not a regular expression ({exc})") from None


def load_adapter(name: str, path: str, config: ModelConfig, max_rank: int, moe_layers: bool = False,
                 dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """Read and check the adapter at `path` for the model `config`; AdapterError says what does not fit:
    rank above `max_rank`, a target module the model lacks, shapes of another architecture."""
    return shard_adapter(read_adapter(name, path, config, max_rank, moe_layers), config, None, dtype)


def read_adapter(name: str, path: str, config: ModelConfig, max_rank: int,
                 moe_layers: bool = False) -> AdapterWeights:
    """`load_adapter`'s reading and checking (against the whole model's `config`), before any sharding."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    cfg = read_config(folder)
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise AdapterError(f"{folder}: no adapter_model.safetensors")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{weights_file}: not readable ({exc})") from None
    shapes = part_shapes(config)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _TENSOR.match(key)
        if m is None:
            raise AdapterError(f"{name}: tensor {key!r} targets a module this server does not adapt (supported: "
                               f"{', '.join(MODULE_PARTS)} of the decoder layers)")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in MODULE_PARTS:
            raise AdapterError(f"{name}: target module {module!r} does not exist in this model (it has "
                               f"{', '.join(MODULE_PARTS)})")
        if layer >= config.num_layers:
            raise AdapterError(f"{name}: targets layer {layer}, the model has {config.num_layers} layers "
                               f"(an adapter for another base model?)")
        if moe_layers and MODULE_PARTS[module][0] in ("gate_up", "down"):
            raise AdapterError(f"{name}: targets {module} but this model's MLPs are routed experts")
        pairs.setdefault((layer, module), {})[which] = tensor.float()
    if not pairs:
        raise AdapterError(f"{name}: adapter_model.safetensors holds no LoRA tensors")
    alpha = float(cfg.get("lora_alpha", cfg.get("r", 8)))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    max_seen = 0
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{name}: layer {layer} {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        in_features, out_features = shapes[module]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or a.shape[1] != in_features or b.shape[0] != out_features:
            raise AdapterError(f"{name}: layer {layer} {module} has A {tuple(a.shape)}, B {tuple(b.shape)}; this "
                               f"model's {module} is {in_features} -> {out_features} (an adapter for another base "
                               f"model?)")
        if r > max_rank:
            raise AdapterError(f"{name}: rank {r} of layer {layer} {module} exceeds --max_lora_rank {max_rank}")
        max_seen = max(max_seen, r)
        block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        key = f"model.layers.{layer}.{block}.{module}"
        r_cfg = _pattern_value(rank_pattern, key, cfg.get("r", r))
        if r_cfg != r:
            raise AdapterError(f"{name}: layer {layer} {module} has rank {r}, its config says {r_cfg}")
        a_ = _pattern_value(alpha_pattern, key, alpha)
        scaling = a_ / math.sqrt(r) if rslora else a_ / r
        modules[(layer, module)] = (a, b * scaling)
    return AdapterWeights(name, str(folder), max_seen, sorted({module for _, module in pairs}), modules)


def shard_adapter(weights: AdapterWeights, config: ModelConfig, shard: TPShard | None,
                  dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """The adapter laid out for one rank's fused linears (`config`: the whole model's; `shard` None: no tensor
    parallelism), its weights stored as `dtype` (--lora_dtype: float32 or bfloat16; scaling folded in first). Each module is cut like its base linear: a column-parallel one (q/k/v per head, gate/up per
    intermediate slice) keeps the rows of B of this rank's outputs, A whole; a row-parallel one (o, down)
    keeps the columns of A of this rank's inputs, B whole, and its partial delta joins the partial output
    that the layer's all-reduce sums (sum over ranks of x_s A_s^T B^T = x A^T B^T)."""
    world = shard.world if shard is not None else 1
    shapes = part_shapes(shard_config(config, world))
    layers: list[dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]] = [{} for _ in range(config.num_layers)]
    for (layer, module), (a, b) in sorted(weights.modules.items()):
        if shard is not None and world > 1:
            if module in ("o_proj", "down_proj"):
                start, end = shard.span(a.shape[1])
                a = a[:, start:end]
            else:
                start, end = shard.span(b.shape[0])
                b = b[start:end]
        target, part = MODULE_PARTS[module]
        layers[layer].setdefault(target, []).append((part, a.contiguous(), b.contiguous()))
    joined = [{target: _join(target, parts, shapes, dtype) for target, parts in layer.items()} for layer in layers]
    return LoraAdapter(weights.name, weights.path, weights.rank, weights.target_modules, joined)


_FUSED_PARTS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
                "down": ("down_proj",)}


def _join(target: str, parts: list[tuple[int, torch.Tensor, torch.Tensor]],
          shapes: dict[str, tuple[int, int]], dtype: torch.dtype = torch.float32) -> LowRankPair:
    """One fused linear's pair from its parts (part index, A [r, in], scaled B [out_part, r])."""
    modules = _FUSED_PARTS[target]
    col_starts, col = [], 0
    for module in modules:
        col_starts.append(col)
        col += shapes[module][1]
    ordered = sorted(parts, key=lambda p: p[0])
    bt = torch.cat([b.t().contiguous().reshape(-1) for _, _, b in ordered]).to(dtype)
    meta, views, r0, at = [len(ordered)], [], 0, 0
    for part, a, b in ordered:
        r, width = a.shape[0], b.shape[0]
        meta += [r, col_starts[part], width]
        views.append((r0, col_starts[part], r, bt[at:at + r * width].view(r, width)))
        r0, at = r0 + r, at + r * width
    a_full = torch.cat([a for _, a, _ in ordered]).to(dtype).contiguous()
    return LowRankPair(a_full, bt, torch.tensor(meta, dtype=torch.int64), views)
