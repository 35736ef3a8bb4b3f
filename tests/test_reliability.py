"""Failure containment inside the engine: a failing model step returns every KV slot it took and
reports a server fault; refusals are the client's; the length limits have one home."""

from __future__ import annotations

import pytest

from lightllm.engine.engine import Engine
from lightllm.engine.protocol import AddRequest, EngineConfig, GrammarSpec, SamplingParams, length_problem
from tests.conftest import build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def drain(engine: Engine, limit: int = 500) -> dict[str, list]:
    outs: dict[str, list] = {}
    for _ in range(limit):
        if not engine.scheduler.has_work():
            break
        for out in engine.step():
            outs.setdefault(out.rid, []).append(out)
    return outs


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("fail_at", [0, 2, 5])
def test_failing_step_frees_every_kv_slot_it_took(model_dir, prefix_cache, fail_at):
    engine = Engine(EngineConfig(model_path=str(model_dir), max_total_token_num=600, grammar_backend="none",
                                 chunked_prefill_size=8, disable_dynamic_prompt_cache=not prefix_cache))
    start_free = engine.pool.num_free
    execute = engine.runner.execute
    calls = {"n": 0}

    def failing_execute(plan):
        calls["n"] += 1
        if calls["n"] == fail_at + 1:
            raise RuntimeError("injected fault")
        return execute(plan)

    engine.runner.execute = failing_execute
    for i in range(3):  # prompts of 30 tokens in chunks of 8: the fault can hit prefill or decode
        engine.add_request(AddRequest(str(i), [10 + i] * 30, SamplingParams(max_new_tokens=6, temperature=0.0,
                                                                           ignore_eos=True)))
    outs = drain(engine)
    failed = [rid for rid, seq in outs.items() if seq[-1].error is not None]
    assert failed, "the injected fault must fail the requests of that step"
    for rid in failed:
        assert outs[rid][-1].error.kind == "server" and "injected fault" in outs[rid][-1].error.message
        assert outs[rid][-1].finish_reason == "abort"
    cached = engine.prefix_cache.evictable() if engine.prefix_cache else 0
    assert engine.pool.num_free + cached == start_free
    if engine.prefix_cache:
        engine.prefix_cache.evict(cached)
        assert engine.pool.num_free == start_free
    # the engine keeps serving: a new request after the fault completes
    engine.add_request(AddRequest("after", [7] * 12, SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)))
    after = drain(engine)["after"]
    assert len(after) == 4 and after[-1].error is None and after[-1].finish_reason == "length"


def test_refusals_are_client_errors(model_dir):
    engine = Engine(EngineConfig(model_path=str(model_dir), max_total_token_num=200, max_req_total_len=64))
    cases = {
        "empty": ([], 4, "empty"),
        "long": ([5] * 64, 4, "maximum context length is 64"),
        "room": ([5] * 60, 8, "Reduce the prompt"),
        "vocab": ([5, 100000], 4, "outside the vocabulary"),
    }
    for rid, (prompt, new, needle) in cases.items():
        out = engine.add_request(AddRequest(rid, prompt, SamplingParams(max_new_tokens=new)))
        assert out is not None and out.error.kind == "client" and needle in out.error.message, (rid, out)
    # This model directory has no tokenizer, so the grammar engine could not be built: a constrained
    # request then meets a server fault, not a client error.
    spec = GrammarSpec.json_schema({"type": "object"})
    engine.grammars.wait()  # (while it is still being built, the request would wait for it off the engine loop)
    out = engine.add_request(AddRequest("grammar", [5, 6], SamplingParams(max_new_tokens=4, grammar=spec)))
    assert out is not None and out.error.kind == "server" and "constrained decoding unavailable" in out.error.message


def test_length_limits_have_one_home():
    assert length_problem(0, 4, 100) == "the prompt is empty"
    assert "your prompt has 100 tokens" in length_problem(100, None, 100)
    assert "Reduce the prompt or max_completion_tokens" in length_problem(90, 20, 100, "max_completion_tokens")
    assert length_problem(90, 10, 100) is None and length_problem(99, None, 100) is None
