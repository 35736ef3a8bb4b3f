"""A sequence keeps one token list that only grows: reading it costs no copy of the context."""

from __future__ import annotations

from lightllm.engine.protocol import SamplingParams
from lightllm.engine.sequence import Sequence


def test_one_token_list_grows_in_place():
    prompt = [5, 6, 7]
    seq = Sequence("r", prompt, SamplingParams(max_new_tokens=4))
    ids = seq.all_ids
    assert ids == [5, 6, 7] and seq.total_len == 3 and seq.num_output_tokens == 0 and seq.output_ids == ()
    seq.append_token(9)
    seq.append_token(10)
    assert seq.all_ids is ids and ids == [5, 6, 7, 9, 10]  # the same list, extended: never rebuilt
    assert seq.output_ids == (9, 10) and seq.num_output_tokens == 2 and seq.remaining_new_tokens == 2
    assert seq.prompt_ids == [5, 6, 7] and prompt == [5, 6, 7]  # the request's own list is not touched
    assert seq.total_len == 5 and seq.num_pending == 5


def test_sequences_compare_by_identity():
    params = SamplingParams()
    a, b = Sequence("same", [1, 2], params), Sequence("same", [1, 2], params)
    assert a != b and [a].count(b) == 0  # the scheduler's `in` / `remove` never match another request's twin
