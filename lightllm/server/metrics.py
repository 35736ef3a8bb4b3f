"""Prometheus exposition of engine and request counters, rendered on scrape."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST


def render_metrics(state: Any) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    stats = state.engine.stats
    gauges = {
        "lightllm_kv_cache_total_tokens": state.engine.info.max_total_token_num,
        "lightllm_kv_cache_used_tokens": stats.kv_used if stats else 0,
        "lightllm_kv_cache_prefix_cached_tokens": stats.kv_cached if stats else 0,
        "lightllm_requests_running": stats.running if stats else 0,
        "lightllm_requests_waiting": stats.waiting if stats else 0,
        "lightllm_requests_inflight": state.inflight,
        "lightllm_requests_total": state.counters["requests"],
        "lightllm_prompt_tokens_total": state.counters["prompt_tokens"],
        "lightllm_generation_tokens_total": state.counters["generation_tokens"],
        # prompt tokens served by the prefix cache, and their share of all prompt tokens
        "lightllm_prefix_cache_hit_tokens_total": state.counters["prefix_cache_hit_tokens"],
        "lightllm_prefix_cache_hit_rate": (state.counters["prefix_cache_hit_tokens"] / state.counters["prompt_tokens"]
                                           if state.counters["prompt_tokens"] else 0.0),
        # prompt-lookup speculative decoding (--spec_ngram_tokens): draft tokens proposed and accepted
        "lightllm_spec_draft_tokens_total": stats.draft_tokens if stats else 0,
        "lightllm_spec_accepted_tokens_total": stats.draft_accepted if stats else 0,
        # constrained decoding: grammars compiled, and requests that reused a compiled (or compiling) one
        "lightllm_grammar_compiled_total": stats.grammar_compiled if stats else 0,
        "lightllm_grammar_cache_hits_total": stats.grammar_cache_hits if stats else 0,
        # LoRA adapters: resident now (and their bytes), folders read, evictions under --max_loras
        "lightllm_lora_resident_adapters": stats.lora_resident if stats else 0,
        "lightllm_lora_resident_bytes": stats.lora_resident_bytes if stats else 0,
        "lightllm_lora_loads_total": stats.lora_loads if stats else 0,
        "lightllm_lora_evictions_total": stats.lora_evictions if stats else 0,
    }
    # the engine's start-up memory breakdown (engine/memory.py): weights, kv_cache, activations, runtime, total
    gauges.update({f"lightllm_memory_{part}_bytes": value for part, value in state.engine.info.memory.items()})
    for name, value in gauges.items():
        Gauge(name, name.replace("_", " "), registry=registry).set(value)
    return generate_latest(registry), CONTENT_TYPE_LATEST
