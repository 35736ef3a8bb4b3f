"""LoRA adapters in the engine against peft: each request's logits equal those of the base model with its own
adapter merged by peft (fp32, within 1e-4), with three adapters and the base model in one batch, over
prefill (chunked) and decode, on the fused C path and the PyTorch path; quantized base weights too."""

from __future__ import annotations

import pytest
import torch

from lightllm.engine.engine import Engine
from lightllm.engine.protocol import AddRequest, EngineConfig, SamplingParams
from lightllm.models.lora.adapter import AdapterError, load_adapter
from tests.conftest import build_tiny_model, free_port, record_logits
from tests.lora_helpers import ALL_MODULES, build_adapter, merged_model

# family -> (tiny model overrides, three adapters' settings)
CASES = {
    "llama": ("llama", dict(tie_word_embeddings=False), [
        dict(r=8, alpha=16), dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=16, alpha=4, target_modules=["o_proj", "down_proj", "up_proj"])]),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True), [
        dict(r=8, alpha=16, use_rslora=True), dict(r=2, alpha=32, target_modules=["k_proj", "gate_proj"]),
        dict(r=8, alpha=8, rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 3.0})]),
    "qwen3": ("qwen3", dict(tie_word_embeddings=True, head_dim=32), [
        dict(r=8, alpha=16), dict(r=6, alpha=12, use_rslora=True, target_modules=["q_proj", "o_proj"]),
        dict(r=4, alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"])]),
}
PROMPTS = [[5, 17, 33, 42, 9, 100, 3, 77, 12, 8, 250, 19], [7, 7, 90], [1, 90, 45, 60, 23],
           [5, 17, 33, 42, 9, 100, 3, 77, 66, 31]]
STEPS = 6


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """Per family: the base model's folder and its three adapters' folders (built once per module)."""
    built = {}
    for case, (arch, overrides, adapters) in CASES.items():
        root = tmp_path_factory.mktemp(case)
        base = build_tiny_model(root / "base", arch, **overrides)
        built[case] = (base, [build_adapter(base, root / f"lora{i}", seed=100 + i, **kw)
                              for i, kw in enumerate(adapters)])
    return built


def run_mixed(base, adapters, requests, **engine_kwargs):
    """Greedy-run (prompt, adapter index or None) requests in one engine, all in the same batches; returns the
    engine, each request's generated ids and the logits each sampling step saw."""
    modules = [f"a{i}={path}" for i, path in enumerate(adapters)]
    engine_kwargs.setdefault("quant_type", "none")
    engine_kwargs.setdefault("chunked_prefill_size", 4)
    engine = Engine(EngineConfig(model_path=str(base), max_total_token_num=1024, kv_cache_dtype="fp32",
                                 spec_ngram_tokens=0, lora_modules=modules,
                                 max_loras=len(adapters), **engine_kwargs))
    recorded = record_logits(engine)
    for i, (prompt, which) in enumerate(requests):
        params = SamplingParams(max_new_tokens=STEPS, temperature=0.0, ignore_eos=True,
                                lora=None if which is None else f"a{which}")
        error = engine.add_request(AddRequest(str(i), prompt, params))
        assert error is None
    outputs: dict[str, list[int]] = {}
    while engine.scheduler.has_work():
        for out in engine.step():
            assert out.error is None, out.error
            outputs.setdefault(out.rid, []).append(out.token_id)
    return engine, outputs, recorded


def assert_matches_merged(base, adapters, requests, outputs, recorded):
    references = {}
    for i, (prompt, which) in enumerate(requests):
        if which not in references:
            references[which] = merged_model(base, None if which is None else adapters[which])
        full = torch.tensor([prompt + outputs[str(i)]])
        with torch.no_grad():
            expected = references[which](full).logits[0][len(prompt) - 1:len(prompt) - 1 + STEPS]
        torch.testing.assert_close(torch.stack(recorded[str(i)]), expected, atol=1e-4, rtol=1e-4)


# Every family on the fused C path (gathered rows through the BGMV kernel); the PyTorch path (segments, no
# kernels) on Llama by default and on the other two families in the slow suite.
PATHS = [("fused_kernels", case) for case in sorted(CASES)] + [("pytorch", "llama")] + [
    pytest.param(("pytorch", case), marks=pytest.mark.slow) for case in ("qwen2", "qwen3")]


@pytest.mark.parametrize("path_case", PATHS, ids=lambda pc: f"{pc[0]}-{pc[1]}")
def test_three_adapters_and_base_in_one_batch_match_peft_merged(path_case, family_models, monkeypatch):
    from lightllm.kernels import cpu as cpu_kernels

    path, case = path_case
    if path == "pytorch":
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    elif cpu_kernels.load() is None:
        pytest.skip("no C compiler: fused CPU kernels unavailable")
    base, adapters = family_models[case]
    # the same prompt under two adapters and the base: no KV may be shared between them
    requests = [(PROMPTS[0], 0), (PROMPTS[1], 1), (PROMPTS[2], 2), (PROMPTS[3], None), (PROMPTS[0], 2),
                (PROMPTS[0], None)]
    engine, outputs, recorded = run_mixed(base, adapters, requests)
    assert_matches_merged(base, adapters, requests, outputs, recorded)
    # every adapter changes the output (their B is non-zero): the comparison is not against the base alone
    for i in range(3):
        assert not torch.allclose(merged_model(base, adapters[i])(torch.tensor([PROMPTS[0]])).logits,
                                  merged_model(base, None)(torch.tensor([PROMPTS[0]])).logits, atol=1e-3)
    assert engine.pool.num_used - engine.prefix_cache.evictable() == 0


def test_quantized_base_keeps_the_adapter_delta(family_models):
    """int8 base weights: the adapter's delta is the same float delta; logits differ from the fp32 merged model
    only by the base's own quantization error (compared with the base alone under the same quantization)."""
    base, adapters = family_models["llama"]
    requests = [(PROMPTS[0], 0), (PROMPTS[0], None)]
    _, out_q, rec_q = run_mixed(base, adapters, requests, quant_type="int8wo")
    _, out_f, rec_f = run_mixed(base, adapters, requests)
    # the adapter's effect (adapter row minus base row at the first step) agrees between int8 and fp32 bases
    effect_q = rec_q["0"][0] - rec_q["1"][0]
    effect_f = rec_f["0"][0] - rec_f["1"][0]
    assert float((effect_q - effect_f).abs().max()) < 0.05 * float(effect_f.abs().max())


def test_bad_adapters_are_refused_with_the_reason(family_models, tmp_path):
    base, adapters = family_models["llama"]
    from lightllm.engine.model_setup import model_config_for

    config = model_config_for(EngineConfig(model_path=str(base)))
    with pytest.raises(AdapterError, match="exceeds --max_lora_rank 8"):
        load_adapter("big", str(adapters[2]), config, max_rank=8)
    other_base = build_tiny_model(tmp_path / "wide", "llama", hidden_size=96, tie_word_embeddings=False)
    wide = build_adapter(other_base, tmp_path / "wide_lora", seed=1)
    with pytest.raises(AdapterError, match="another base model"):
        load_adapter("wide", str(wide), config, max_rank=64)
    lm_head = build_adapter(base, tmp_path / "head_lora", seed=2, target_modules=["lm_head"])
    with pytest.raises(AdapterError, match="does not adapt"):
        load_adapter("head", str(lm_head), config, max_rank=64)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter("none", str(tmp_path), config, max_rank=64)
    with pytest.raises(AdapterError, match="exceeds --max_lora_rank"):  # the engine refuses to start, naming it
        Engine(EngineConfig(model_path=str(base), max_total_token_num=256, lora_modules=[f"big={adapters[2]}"],
                            max_lora_rank=8))
    assert set(ALL_MODULES) == set(load_adapter("ok", str(adapters[0]), config, 64).target_modules)


@pytest.mark.parametrize("field,value,message", [("lora_alpha", [], "lora_alpha must be a number"),
                                                 ("r", "8", "r must be a number"),
                                                 ("use_rslora", "yes", "use_rslora must be true or false"),
                                                 ("alpha_pattern", {"q_proj": "x"}, "alpha_pattern must map"),
                                                 ("rank_pattern", {"(": 4}, "not a regular expression")])
def test_a_hand_edited_config_of_the_wrong_type_is_refused_with_the_field(family_models, tmp_path, field, value,
                                                                          message):
    """(A TypeError or re.error there would escape the engine loop on a dynamic load.)"""
    import json
    import shutil

    from lightllm.engine.model_setup import model_config_for

    base, adapters = family_models["llama"]
    folder = tmp_path / "edited"
    shutil.copytree(adapters[0], folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=message):
        load_adapter("edited", str(folder), model_config_for(EngineConfig(model_path=str(base))), max_rank=64)


def _engine(base, adapters, max_loras, **kwargs):
    return Engine(EngineConfig(model_path=str(base), max_total_token_num=1024, kv_cache_dtype="fp32",
                               quant_type="none", spec_ngram_tokens=0,
                               lora_modules=[f"a{i}={path}" for i, path in enumerate(adapters)], max_loras=max_loras,
                               **kwargs))


def _drain(engine, recorded=None):
    """Step until idle; returns each request's (generated ids, cached prompt tokens)."""
    results: dict[str, tuple[list[int], int]] = {}
    while engine.scheduler.has_work():
        for out in engine.step():
            assert out.error is None, out.error
            ids, _ = results.get(out.rid, ([], 0))
            results[out.rid] = (ids + [out.token_id], out.cached_tokens)
    return results


def _params(lora):
    return SamplingParams(max_new_tokens=STEPS, temperature=0.0, ignore_eos=True, lora=lora)


def test_prefix_cache_is_per_adapter(family_models):
    """The same prompt under the base model, then adapter a0, then a0 again, then a1: only the second a0 request
    reuses cached KV (another adapter's K/V differs), and every request still matches its merged model."""
    base, adapters = family_models["llama"]
    engine = _engine(base, adapters[:2], max_loras=2)
    prompt = PROMPTS[0]
    runs = [None, "a0", "a0", "a1"]
    cached, outputs = [], []
    for i, lora in enumerate(runs):
        assert engine.add_request(AddRequest(str(i), prompt, _params(lora))) is None
        ids, hit = _drain(engine)[str(i)]
        cached.append(hit)
        outputs.append(ids)
    assert cached[0] == 0 and cached[1] == 0 and cached[3] == 0
    assert cached[2] == len(prompt) - 1  # the whole prompt but its last token (that one is recomputed)
    for lora, ids in zip(runs, outputs):
        reference = merged_model(base, None if lora is None else adapters[int(lora[1])])
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=STEPS, min_new_tokens=STEPS,
                                      do_sample=False)[0, len(prompt):]
        assert ids == expected.tolist()
    assert outputs[1] != outputs[0] or outputs[3] != outputs[0]  # the adapters do change the output


def test_one_resident_adapter_two_alternating(family_models):
    """--max_loras 1 with requests for two adapters at once: the second adapter's requests wait until the first
    adapter's finish, then it is loaded in its place (least recently used out); no request runs on the
    wrong adapter (each equals its merged model)."""
    base, adapters = family_models["qwen2"]
    engine = _engine(base, adapters[:2], max_loras=1)
    assert list(engine.lora.resident) == ["a0"]
    order = ["a1", "a0", "a1", "a0"]
    for i, lora in enumerate(order):
        assert engine.add_request(AddRequest(str(i), PROMPTS[i], _params(lora))) is None
    seen_together: set[frozenset] = set()
    results: dict[str, list[int]] = {}
    while engine.scheduler.has_work():
        running = frozenset(s.lora_name for s in engine.scheduler.running)
        if running:
            seen_together.add(running)
        for out in engine.step():
            assert out.error is None, out.error
            results.setdefault(out.rid, []).append(out.token_id)
    assert all(len(names) == 1 for names in seen_together)  # never two adapters resident at once
    assert engine.lora.evictions >= 1 and len(engine.lora.resident) == 1
    for i, lora in enumerate(order):
        reference = merged_model(base, adapters[int(lora[1])])
        expected = reference.generate(torch.tensor([PROMPTS[i]]), max_new_tokens=STEPS, min_new_tokens=STEPS,
                                      do_sample=False)
        assert results[str(i)] == expected[0, len(PROMPTS[i]):].tolist()


def test_long_prefill_segment_and_decoding_rows_in_one_step(family_models):
    """A 40-token prompt prefilled in 32-token chunks (a segment: its own matmuls) while other requests decode
    (their rows gathered per row into one kernel call): both ways in the same steps, each row its own model's."""
    base, adapters = family_models["llama"]
    long_prompt = [(7 * i + 3) % 250 + 3 for i in range(40)]
    requests = [(PROMPTS[1], 0), (PROMPTS[2], 1), (long_prompt, 2), (long_prompt, None)]
    _, outputs, recorded = run_mixed(base, adapters, requests, chunked_prefill_size=32)
    assert_matches_merged(base, adapters, requests, outputs, recorded)


def test_residency_waits_for_a_busy_slot_and_evicts_the_least_recently_used(family_models):
    from lightllm.engine.lora import LoraManager
    from lightllm.engine.model_setup import model_config_for

    base, adapters = family_models["llama"]
    manager = LoraManager(model_config_for(EngineConfig(model_path=str(base))), max_loras=2, max_rank=64)
    for i, path in enumerate(adapters):
        manager.register(f"a{i}", str(path))
    assert list(manager.resident) == ["a0", "a1"]  # a2 is registered (checked) but not resident
    assert manager.acquire("a2", busy={"a0", "a1"}) is None  # both slots in use: the request waits
    manager.acquire("a0", busy=set())  # a0 becomes the most recently used
    a2 = manager.acquire("a2", busy=set())
    assert a2 is not None and list(manager.resident) == ["a0", "a2"] and manager.evictions == 1
    uid = manager.uid("a2")
    manager.unregister("a2")
    with pytest.raises(KeyError):
        manager.acquire("a2", busy=set())
    manager.register("a2", str(adapters[2]))
    assert manager.uid("a2") != uid  # a new registration: a new prefix-cache namespace
    with pytest.raises(AdapterError, match="already loaded"):
        manager.register("a2", str(adapters[2]))


def test_lora_flags_are_checked_at_start():
    from lightllm.server.args import parse_args

    args = parse_args(["--lora_modules", "sql=/a", "chat=/b", "--max_loras", "2", "--max_lora_rank", "32",
                       "--lora_dtype", "bf16"])
    config = args.engine_config("/m")
    assert config.lora_modules == ["sql=/a", "chat=/b"] and config.max_loras == 2 and config.max_lora_rank == 32
    assert config.lora_dtype == "bf16" and parse_args([]).engine_config("/m").lora_dtype == "auto"
    with pytest.raises(SystemExit):  # not one of the choices (argparse's own message)
        parse_args(["--lora_dtype", "float16"])
    from lightllm.engine.lora import lora_dtype

    assert lora_dtype("auto", torch.float32) == torch.float32 and lora_dtype("auto", torch.float16) == torch.float32
    assert lora_dtype("bf16", torch.float32) == torch.bfloat16 and lora_dtype("auto", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="--lora_dtype 'float16' is not supported"):
        lora_dtype("float16", torch.float32)
    for argv, reason in ((["--lora_modules", "sql"], "is not NAME=PATH"), (["--lora_modules", "a b=/x"], "NAME=PATH"),
                         (["--lora_modules", "a=/x", "a=/y"], "names 'a' twice"),
                         (["--max_loras", "0"], "must be at least 1")):
        with pytest.raises(SystemExit, match=reason):
            parse_args(argv)


def test_unloading_ends_waiting_requests_and_lets_running_ones_finish(family_models):
    base, adapters = family_models["llama"]
    engine = _engine(base, adapters[:2], max_loras=1)
    long = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True, lora="a0")
    assert engine.add_request(AddRequest("running", PROMPTS[0], long)) is None
    engine.step()  # a0's request runs; a1's must wait for the one slot
    assert engine.add_request(AddRequest("waiting", PROMPTS[1], _params("a1"))) is None
    engine.step()
    assert [s.rid for s in engine.scheduler.waiting] == ["waiting"]
    engine.lora.unregister("a1")
    engine.lora.unregister("a0")
    outputs: dict[str, list] = {}
    while engine.scheduler.has_work():
        for out in engine.step():
            outputs.setdefault(out.rid, []).append(out)
    assert outputs["waiting"][-1].error is not None and "not loaded" in outputs["waiting"][-1].error.message
    assert outputs["waiting"][-1].error.kind == "client"
    finished = [o for o in outputs["running"] if o.token_id is not None]
    assert len(finished) == 18 and outputs["running"][-1].finish_reason == "length"  # 2 tokens came before


def test_tp2_adapters_match_peft_merged_through_loads_and_evictions(family_models):
    """--tp 2 (gloo): each rank holds its shard of every adapter (B's rows of its q/k/v heads and gate/up slice,
    A's columns of its o/down inputs, whose partial deltas the all-reduce sums). Three adapters (all modules;
    q/v; o/up/down) and the base in one batch equal peft's merged models; then a dynamic load and a request
    that evicts the least recently used adapter and reads another back: the other rank follows every load and
    drop (a row on a stale or missing adapter there would change the logits or fail the step)."""
    base, adapters = family_models["llama"]
    engine = Engine(EngineConfig(model_path=str(base), max_total_token_num=1024, kv_cache_dtype="fp32",
                                 quant_type="none", spec_ngram_tokens=0, chunked_prefill_size=4, tp=2,
                                 nccl_port=free_port(), lora_modules=[f"a{i}={path}" for i, path in enumerate(adapters[:2])],
                                 max_loras=2))
    try:
        assert engine.model.config.num_heads == 2  # this rank holds half the heads
        pair = engine.lora.resident["a0"].layers[0]["o"]
        assert pair.a.shape[1] == engine.model.config.num_heads * engine.model.config.head_dim  # A's columns cut
        recorded = record_logits(engine)
        from lightllm.engine.protocol import LoadLora

        assert engine.load_lora(LoadLora(1, "a2", str(adapters[2]))).error is None  # registered, not resident
        rounds = [[(PROMPTS[0], 0), (PROMPTS[1], 1), (PROMPTS[3], None), (PROMPTS[0], 1)],
                  [(PROMPTS[2], 2), (PROMPTS[1], 2), (PROMPTS[0], None)],  # a2 read in place of a0
                  [(PROMPTS[3], 0), (PROMPTS[2], 2)]]  # a0 read again in place of a1
        for n, requests in enumerate(rounds):
            for i, (prompt, which) in enumerate(requests):
                assert engine.add_request(AddRequest(f"{n}.{i}", prompt, _params(None if which is None else f"a{which}"))) is None
            outputs = {rid: ids for rid, (ids, _) in _drain(engine).items()}
            for i, (prompt, which) in enumerate(requests):
                reference = merged_model(base, None if which is None else adapters[which])
                full = torch.tensor([prompt + outputs[f"{n}.{i}"]])
                with torch.no_grad():
                    expected = reference(full).logits[0][len(prompt) - 1:len(prompt) - 1 + STEPS]
                torch.testing.assert_close(torch.stack(recorded[f"{n}.{i}"]), expected, atol=1e-4, rtol=1e-4)
        assert engine.lora.evictions == 2 and sorted(engine.lora.resident) == ["a0", "a2"]
    finally:
        engine.shutdown()
    assert all(proc.poll() is not None for proc in engine.workers)


@pytest.mark.parametrize("build", ["native", "portable", "avx2"])
def test_bgmv_kernel_with_bf16_weights_equals_float32_on_the_same_values(build):
    """lora_bgmv.c with bfloat16 A/Bt (--lora_dtype bfloat16): each weight widened exactly, float32 arithmetic:
    the result of the float32 call on the widened weights, and a float64 reference (input width 164: the
    unrolled loop, the vector loop and the tail; an adapter without a pair for this linear leaves its rows
    alone)."""
    from lightllm.kernels import cpu as cpu_kernels

    kernels = cpu_kernels.load(build)
    if kernels is None:
        pytest.skip(f"no {build} build of the CPU kernels here")
    gen = torch.Generator().manual_seed(7)
    rows, width_in, parts = 7, 164, [(3, 0, 40), (5, 40, 24)]  # (rank, first column, width) per part
    a = [torch.randn(8, width_in, generator=gen) for _ in range(2)]
    bt = [torch.randn(3 * 40 + 5 * 24, generator=gen) for _ in range(2)]
    meta = torch.tensor([2, *parts[0], *parts[1]], dtype=torch.int64)
    x, y0 = torch.randn(rows, width_in, generator=gen), torch.randn(rows, 64, generator=gen)
    row_index, offsets = torch.tensor([0, 3, 5, 1, 6, 2, 4]), torch.tensor([0, 3, 5, 7])  # third: no pair

    def run(dtype):
        a_d, bt_d = [t.to(dtype) for t in a], [t.to(dtype) for t in bt]
        y = y0.clone()
        kernels.lora_bgmv(x, y, torch.tensor([a_d[0].data_ptr(), a_d[1].data_ptr(), 0]),
                          torch.tensor([bt_d[0].data_ptr(), bt_d[1].data_ptr(), 0]),
                          torch.tensor([meta.data_ptr(), meta.data_ptr(), 0]), torch.tensor([8, 8, 0]), row_index,
                          offsets, dtype)
        return y

    a, bt = [t.to(torch.bfloat16).float() for t in a], [t.to(torch.bfloat16).float() for t in bt]
    got = run(torch.bfloat16)
    torch.testing.assert_close(got, run(torch.float32), rtol=1e-6, atol=1e-5)
    expected = y0.double().clone()
    for g in range(2):
        for t in row_index[offsets[g]:offsets[g + 1]].tolist():
            v, r0, at = a[g].double() @ x[t].double(), 0, 0
            for r, col, w in parts:
                expected[t, col:col + w] += v[r0:r0 + r] @ bt[g][at:at + r * w].double().view(r, w)
                r0, at = r0 + r, at + r * w
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(got[[2, 4]], y0[[2, 4]])
    with pytest.raises(cpu_kernels.KernelError, match="float32 or bfloat16"):
        run(torch.float16)


def _bf16_valued_copy(folder, out):
    """The adapter at `folder` with every weight rounded to a bfloat16 value (stored as float32)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: v.to(torch.bfloat16).float() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    return out


@pytest.mark.parametrize("path", ["fused_kernels", "pytorch"])
def test_bf16_adapter_storage_matches_peft_merged_on_bf16_values(family_models, tmp_path, monkeypatch, path):
    """--lora_dtype bfloat16 stores A and B (scaling folded in) in bfloat16, half the bytes, and computes in
    float32. Adapters whose weights are bfloat16 values already, with power-of-two scalings (the llama case's
    2, 2 and 1/4: folding them in rounds nothing), lose nothing to that storage: logits within 1e-4 of peft's
    merged models, through the kernel (decoding rows) and as segments (a 40-token prefill chunk)."""
    from lightllm.kernels import cpu as cpu_kernels

    if path == "pytorch":
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    base, adapters = family_models["llama"]
    exact = [_bf16_valued_copy(folder, tmp_path / f"bf16_{i}") for i, folder in enumerate(adapters)]
    long_prompt = [(7 * i + 3) % 250 + 3 for i in range(40)]
    requests = [(PROMPTS[0], 0), (PROMPTS[1], 1), (long_prompt, 2), (PROMPTS[3], None)]
    engine, outputs, recorded = run_mixed(base, exact, requests, lora_dtype="bfloat16", chunked_prefill_size=32)
    assert_matches_merged(base, exact, requests, outputs, recorded)
    stored = engine.lora.resident["a0"]
    assert all(t.dtype == torch.bfloat16 for layer in stored.layers for p in layer.values() for t in (p.a, p.bt))
    from lightllm.engine.model_setup import model_config_for

    fp32 = load_adapter("a0", str(exact[0]), model_config_for(EngineConfig(model_path=str(base))), 64)
    assert stored.nbytes * 2 == fp32.nbytes


@pytest.mark.parametrize("ranges", [[(0, 16)], [(0, 9), (20, 31)], [(0, 4), (6, 9), (12, 14), (17, 22), (25, 31)]])
def test_segment_products_range_by_range_equal_the_scattered_delta(family_models, monkeypatch, ranges):
    """Segments (SGMV): the expand added by BLAS straight into each row range of the output (at most
    SLICED_MAX_RANGES ranges) and the delta scattered with index_add_ (more ranges) both give x A^T B^T per row
    of the adapter, the other rows untouched."""
    from lightllm.engine.model_setup import model_config_for
    from lightllm.kernels import cpu as cpu_kernels
    from lightllm.models.lora import batch as lora_batch

    monkeypatch.setattr(cpu_kernels, "load", lambda: None)  # every adapter as segments
    base, adapters = family_models["llama"]
    adapter = load_adapter("a0", str(adapters[0]), model_config_for(EngineConfig(model_path=str(base))), 64)
    gen = torch.Generator().manual_seed(3)
    x, base_out = torch.randn(32, 64, generator=gen), torch.randn(32, 128, generator=gen)  # qkv: 64 -> 64 + 2 * 32
    pair = adapter.layers[1]["qkv"]
    rows = [r for start, stop in ranges for r in range(start, stop)]
    expected = base_out.clone()
    v = x[rows] @ pair.a.t()
    for r0, col, r, bt in pair.parts:
        expected[rows, col:col + bt.shape[1]] += v[:, r0:r0 + r] @ bt
    results = []
    for limit in (0, 8):
        monkeypatch.setattr(lora_batch, "SLICED_MAX_RANGES", limit)
        batch = lora_batch.LoraBatch.from_runs([(adapter, start, stop - start) for start, stop in ranges])
        results.append(batch.add_(1, "qkv", x, base_out.clone()))
        torch.testing.assert_close(results[-1], expected, atol=1e-5, rtol=1e-5)
    others = [r for r in range(32) if r not in rows]
    assert torch.equal(results[0][others], base_out[others]) and torch.equal(results[1][others], base_out[others])
