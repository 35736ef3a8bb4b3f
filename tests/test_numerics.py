"""Our model runtime against the transformers reference: logits for a ragged batch, prefill + decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightllm.engine.engine import Engine
from lightllm.engine.protocol import AddRequest, EngineConfig, SamplingParams
from tests.conftest import build_tiny_model, run_engine_recording_logits

CASES = {
    "llama_gqa_untied": ("llama", dict(tie_word_embeddings=False)),
    "llama_tied_llama3_rope": ("llama", dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True)),
    # the config's activation reaches the shared MLP (and keeps the SiLU-only fused kernels out)
    "llama_gelu_tanh_act": ("llama", dict(hidden_act="gelu_pytorch_tanh")),
    # head_dim 32 != hidden / heads (16), as in the real Qwen3 sizes
    "qwen3_qk_norm_tied_head_dim": ("qwen3", dict(tie_word_embeddings=True, head_dim=32)),
    "mistral_sliding_window": ("mistral", dict(sliding_window=6, tie_word_embeddings=False)),
    "qwen2_yarn": ("qwen2", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 32})),
    # (1 + w) norms, sandwich norms, GELU-tanh, scaled embeddings, query_pre_attn_scalar, alternating
    # sliding/global layers, soft-capped scores and logits
    "gemma2_softcap_sliding": ("gemma2", dict(tie_word_embeddings=True)),
    # + per-head q/k norms, 2 sliding layers with their own rope base around a global one
    "gemma3_local_global": ("gemma3", dict(tie_word_embeddings=True)),
    # fused qkv / gate_up checkpoint tensors; longrope short factors + attention factor
    "phi3_fused_longrope": ("phi3", dict(tie_word_embeddings=False, max_position_embeddings=512,
                                         original_max_position_embeddings=128, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 0.5 * i for i in range(8)], "original_max_position_embeddings": 128})),
    "mixtral_top2_of_4": ("mixtral", dict(tie_word_embeddings=False)),
    "qwen3moe_top2_unnormalised": ("qwen3moe", dict(tie_word_embeddings=False)),
}
# The fourth prompt repeats the first one's opening 8 tokens: a prefix-cache hit in the middle of the run.
PROMPTS = [[5, 17, 33, 2 + 40, 9, 100, 3, 77, 12, 8, 250, 19], [7, 7], [1, 90, 45, 60, 23],
           [5, 17, 33, 2 + 40, 9, 100, 3, 77, 66, 31]]
DECODE_STEPS = 9  # run_engine_recording_logits' default


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, model_path_kind, tmp_path):
    from transformers import AutoModelForCausalLM

    arch, overrides = CASES[case]
    model_dir = build_tiny_model(tmp_path / case, arch, **overrides)
    cached_tokens: dict[str, int] = {}
    engine, outputs, recorded = run_engine_recording_logits(model_dir, PROMPTS, chunked_prefill_size=4,
                                                            cached_tokens=cached_tokens)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for i, prompt in enumerate(PROMPTS):
        generated = outputs[str(i)]
        assert len(generated) == DECODE_STEPS
        full = torch.tensor([prompt + generated])
        with torch.no_grad():
            ref_logits = reference(full).logits[0]
        ours = torch.stack(recorded[str(i)])
        expected = ref_logits[len(prompt) - 1:len(prompt) - 1 + DECODE_STEPS]
        assert ours.shape == expected.shape
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert engine.pool.num_used - engine.prefix_cache.evictable() == 0
    # When the fourth prompt is admitted only the first prompt's first chunk (4 tokens) is computed and
    # published; those come from the prefix cache, the rest of the shared opening is computed again.
    assert cached_tokens["3"] == 4


_GGUF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight", "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
}
_GGUF_GEMMA_NAMES = {**_GGUF_LAYER_NAMES, "post_attention_layernorm.weight": "post_attention_norm.weight",
                     "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                     "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}
_GGUF_EXPERT_PARTS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


def _write_gguf_from_hf(model_dir, out_path, arch="llama", quantized=None):
    """Write an F32 GGUF the way llama.cpp's converter does: q/k rows permuted for the llama arch only,
    Gemma's norms stored as (1 + w), experts stacked into one [experts, out, in] tensor per projection,
    Mixtral written as the llama arch with an expert count. `quantized` (a GGMLQuantizationType) stores
    the matrices whose rows are whole blocks of it in that type instead."""
    import json
    import re

    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tensors = load_file(str(model_dir / "model.safetensors"))
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    gguf_arch = "llama" if arch == "mixtral" else arch
    permuted = gguf_arch == "llama"
    gemma = arch.startswith("gemma")
    rope = cfg.get("rope_parameters", {})
    rope = rope.get("full_attention", rope)

    def permute(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(out_path), gguf_arch)

    def add(name: str, array: np.ndarray) -> None:
        block = gguf.GGML_QUANT_SIZES[quantized][0] if quantized is not None else 0
        if quantized is not None and array.ndim >= 2 and array.shape[-1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, quantized), raw_dtype=quantized)
        else:
            writer.add_tensor(name, array)

    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    if cfg.get("head_dim"):
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])
    writer.add_rope_freq_base(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_eos_token_id(2)
    if cfg.get("sliding_window"):
        writer.add_sliding_window(cfg["sliding_window"])
    if cfg.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
    if cfg.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg["num_experts_per_tok"])
        if cfg.get("moe_intermediate_size"):
            writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("norm_topk_prob") is False:
            writer.add_expert_weights_norm(False)
    names = _GGUF_GEMMA_NAMES if gemma else _GGUF_LAYER_NAMES
    stacked: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, tensor in tensors.items():
        array = tensor.float().numpy()
        if gemma and name.endswith("norm.weight"):
            array = array + 1.0
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        elif match := re.match(r"model\.layers\.(\d+)\..*experts\.(\d+)\.(\w+)\.weight", name):
            idx, expert, part = match.groups()
            stacked.setdefault((idx, _GGUF_EXPERT_PARTS[part]), {})[int(expert)] = array
            continue
        else:
            _, _, idx, rest = name.split(".", 3)
            gname = f"blk.{idx}.{names[rest]}"
            if permuted and rest == "self_attn.q_proj.weight":
                array = permute(array, n_head)
            elif permuted and rest == "self_attn.k_proj.weight":
                array = permute(array, n_kv)
        add(gname, np.ascontiguousarray(array))
    for (idx, part), per_expert in sorted(stacked.items()):
        add(f"blk.{idx}.ffn_{part}_exps.weight", np.ascontiguousarray(np.stack([per_expert[e] for e in sorted(per_expert)])))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# GGUF files carry no per-layer rope bases or layer pattern: llama.cpp's Gemma 3 uses 10000 for the sliding
# layers and makes every sixth layer global, so the tiny Gemma 3 here is built that way.
_GGUF_GEMMA3 = dict(tie_word_embeddings=True, num_hidden_layers=6, layer_types=None,
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})


@pytest.mark.parametrize("arch, overrides", [
    ("llama", dict(tie_word_embeddings=False)),
    ("qwen3", dict(tie_word_embeddings=True, head_dim=32)),
    ("gemma2", dict(tie_word_embeddings=True, query_pre_attn_scalar=16)),  # GGUF scales by head_dim ** -0.5
    ("gemma3", _GGUF_GEMMA3),
    ("phi3", dict(tie_word_embeddings=False)),
    ("mixtral", dict(tie_word_embeddings=False)),
    ("qwen3moe", dict(tie_word_embeddings=False)),
])
def test_gguf_and_safetensors_give_same_logits(arch, overrides, tmp_path):
    model_dir = build_tiny_model(tmp_path / arch, arch, **overrides)
    gguf_path = tmp_path / "tiny.gguf"
    _write_gguf_from_hf(model_dir, gguf_path, arch)
    _, out_st, logits_st = run_engine_recording_logits(model_dir, PROMPTS)
    _, out_gguf, logits_gguf = run_engine_recording_logits(gguf_path, PROMPTS)
    assert out_st == out_gguf
    for rid in logits_st:
        torch.testing.assert_close(torch.stack(logits_gguf[rid]), torch.stack(logits_st[rid]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, overrides", [
    ("llama", dict(tie_word_embeddings=False)),
    ("gemma3", _GGUF_GEMMA3),  # tied: the lm_head runs from the embedding's blocks
    ("qwen3moe", dict(tie_word_embeddings=False)),  # stacked experts split into per-expert blocks
])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0"])
def test_gguf_kernel_path_tracks_the_exact_weights(arch, overrides, qtype, tmp_path):
    """A GGUF of quantized matrices under --quant_type gguf (the layers run from their blocks) against the same
    file decoded to dense float32 (--quant_type none): only the int8 activations differ."""
    import gguf

    from lightllm.engine.engine import Engine
    from lightllm.engine.protocol import EngineConfig
    from lightllm.models.quant.linear import GgufLinear, RowCountDispatch
    from lightllm.models.quant.tiled import TiledLinear

    model_dir = build_tiny_model(tmp_path / arch, arch, **overrides)
    gguf_path = tmp_path / "tiny-q.gguf"
    _write_gguf_from_hf(model_dir, gguf_path, arch, quantized=gguf.GGMLQuantizationType[qtype])
    engine = Engine(EngineConfig(model_path=str(gguf_path), max_total_token_num=256, grammar_backend="none",
                                 quant_type="gguf"))
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    cfg = engine.model.config
    layers = [(engine.model.weights.lm_head, cfg.hidden_size)]
    for lw in engine.model.weights.layers:
        layers += [(lw.qkv, cfg.hidden_size), (lw.o, cfg.num_heads * cfg.head_dim)]
        if lw.experts:
            layers += [(down, cfg.moe_intermediate_size) for down in lw.experts.down]
        else:
            layers.append((lw.down, cfg.intermediate_size))
    for layer, in_features in layers:  # matrices whose rows are whole blocks run from them
        kernel = layer.quantized if isinstance(layer, RowCountDispatch) else layer
        assert isinstance(kernel, (GgufLinear, TiledLinear)) == (in_features % block == 0), (type(kernel), in_features)
    del engine
    _, exact_tokens, exact = run_engine_recording_logits(gguf_path, PROMPTS, quant_type="none")
    _, native_tokens, native = run_engine_recording_logits(gguf_path, PROMPTS, quant_type="gguf")
    compared = 0
    for rid in exact:
        # a random tiny model has near-ties: compare the steps up to where the greedy tokens first differ
        same = next((i for i, (a, b) in enumerate(zip(exact_tokens[rid], native_tokens[rid])) if a != b),
                    len(exact_tokens[rid]))
        for ours, ref in list(zip(native[rid], exact[rid]))[:same + 1]:
            assert (ours - ref).abs().max() <= 0.05 * ref.abs().max(), ((ours - ref).abs().max(), ref.abs().max())
            compared += 1
    assert compared >= 2 * len(exact)


def test_preemption_recomputes_and_matches_solo_runs(tmp_path):
    """A pool too small for all requests at once forces preemption; outputs still equal solo runs."""
    model_dir = build_tiny_model(tmp_path / "llama", "llama")
    prompts = [[3 + i, 10 + i, 20, 30, 40 + i, 50] for i in range(6)]

    def run(prompt_list, pool):
        engine = Engine(EngineConfig(model_path=str(model_dir), max_total_token_num=pool,
                                     disable_dynamic_prompt_cache=True, router_max_new_token_len=1))
        for i, p in enumerate(prompt_list):
            engine.add_request(AddRequest(str(i), p, SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)))
        outs: dict[str, list[int]] = {}
        while engine.scheduler.has_work():
            for o in engine.step():
                assert o.error is None, o.error
                outs.setdefault(o.rid, []).append(o.token_id)
        assert engine.pool.num_used == 0
        return engine, outs

    engine, batched = run(prompts, pool=100)
    assert engine.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        _, solo = run([prompt], pool=100)
        assert batched[str(i)] == solo["0"]
