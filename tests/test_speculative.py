"""Prompt-lookup speculative decoding: the drafting memo, the acceptance rule, and greedy output identical to
decoding one token at a time (with the KV of rejected drafts returned to the pool)."""

from __future__ import annotations

import pytest

from lightllm.engine.engine import Engine
from lightllm.engine.protocol import AddRequest, EngineConfig, SamplingParams
from lightllm.engine.speculative import PromptLookup, accept_draft
from tests.conftest import build_tiny_model


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    lookup = PromptLookup()
    tokens = [9, 1, 2, 3, 4, 5, 6, 1, 2, 3]
    assert lookup.propose(tokens, 3) == [4, 5, 6]
    tokens += [4, 5, 7, 8]  # grows: only the new n-grams are indexed
    assert lookup.propose(tokens, 3) == []  # (7, 8) and (8,) never occurred before
    tokens += [1, 2]
    assert lookup.propose(tokens, 2) == [3, 4]  # no earlier (8, 1, 2); the latest earlier (1, 2) ends at 9
    assert PromptLookup().propose([5, 6], 4) == []


def test_acceptance_keeps_the_drafts_the_model_would_have_chosen():
    assert accept_draft([4, 5, 6], [4, 5, 9, 1]) == ([4, 5], 9)
    assert accept_draft([4, 5, 6], [7, 0, 0, 0]) == ([], 7)
    assert accept_draft([4, 5], [4, 5, 8]) == ([4, 5], 8)  # all accepted, one more for free


def _run(model_dir, prompts, spec: int, **params) -> tuple[dict[str, list[int]], Engine]:
    engine = Engine(EngineConfig(model_path=str(model_dir), max_total_token_num=2000, grammar_backend="none",
                                 kv_cache_dtype="fp32", spec_ngram_tokens=spec, spec_max_decodes=8))
    for i, prompt in enumerate(prompts):
        engine.add_request(AddRequest(str(i), prompt, SamplingParams(temperature=0.0, **params)))
    outputs: dict[str, list[int]] = {}
    while engine.scheduler.has_work():
        for out in engine.step():
            assert out.error is None
            outputs.setdefault(out.rid, []).append(out.token_id)
    return outputs, engine


@pytest.mark.parametrize("params", [dict(max_new_tokens=40, ignore_eos=True),
                                    dict(max_new_tokens=23, ignore_eos=True, stop_token_ids=[7, 11, 42])])
def test_greedy_output_is_identical_with_drafting(params, tmp_path):
    model_dir = build_tiny_model(tmp_path / "llama", "llama")
    # repeated phrases give the lookup something to copy; tiny random models also fall into loops it predicts
    phrase = [17, 33, 42, 9, 100, 3, 77]
    prompts = [phrase * 3, [5, 6, 7, 8] * 4 + [9], [1, 90, 45, 60, 23]]
    plain, _ = _run(model_dir, prompts, spec=0, **params)
    drafted, engine = _run(model_dir, prompts, spec=5, **params)
    assert drafted == plain
    stats = engine.scheduler.draft_stats
    assert stats["proposed"] > 0 and stats["accepted"] > 0  # drafts were made, and some verified
    assert engine.pool.num_used - engine.prefix_cache.evictable() == 0  # rejected drafts' KV went back


def test_requests_with_logits_processing_do_not_draft(tmp_path):
    model_dir = build_tiny_model(tmp_path / "llama", "llama")
    prompts = [[17, 33, 42, 9] * 4]
    plain, _ = _run(model_dir, prompts, spec=0, max_new_tokens=20, ignore_eos=True, repetition_penalty=1.3)
    drafted, engine = _run(model_dir, prompts, spec=5, max_new_tokens=20, ignore_eos=True, repetition_penalty=1.3)
    assert drafted == plain and engine.scheduler.draft_stats["proposed"] == 0
