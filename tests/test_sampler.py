"""The sampler's logits processing: extreme penalties make tokens unlikely but never leave a row with nothing
to sample (the fuzzing run found repetition_penalty 6.5e69 under a one-token grammar turning every allowed
logit into -inf, then NaN probabilities and a 500)."""

import pytest
import torch

from lightllm.engine.grammar import AllowedTokens
from lightllm.engine.protocol import SamplingParams
from lightllm.engine.sampler import Sampler
from lightllm.engine.sequence import Sequence

VOCAB = 16
EOS = 15


def _seq(prompt: list[int], allowed: tuple[int, ...] | None = None, **params) -> Sequence:
    seq = Sequence(rid="r", prompt_ids=prompt, params=SamplingParams(**params))
    seq.generator = torch.Generator().manual_seed(0)
    if allowed is not None:
        seq.grammar = AllowedTokens(allowed, VOCAB)
    return seq


def _logits(rows: int) -> torch.Tensor:
    return torch.linspace(-8.0, 4.0, VOCAB).repeat(rows, 1)


@pytest.mark.parametrize("temperature", [1.0, 1e-3, 0.0])
@pytest.mark.parametrize("penalty", [6.5e69, 1e-70])
def test_extreme_repetition_penalty_under_a_mask_still_samples_an_allowed_token(temperature, penalty):
    # Tokens 1 and 2 (negative logits) are the only ones allowed, and both are in the prompt: the penalty
    # multiplies them by a value float32 cannot hold.
    seq = _seq([1, 2, 3], allowed=(1, 2), repetition_penalty=penalty, temperature=temperature)
    [out] = Sampler(VOCAB, [EOS], torch.device("cpu"))(_logits(1), [seq])
    assert out.token_id in (1, 2)


def test_penalty_past_float32_on_every_token_leaves_a_row_greedy_can_read():
    # Every token seen, penalty far past float32: the row stays finite, and greedy picks a real token.
    seq = _seq(list(range(VOCAB)), repetition_penalty=1e300, temperature=0.0, presence_penalty=2.0)
    [out] = Sampler(VOCAB, [EOS], torch.device("cpu"))(_logits(1), [seq])
    assert 0 <= out.token_id < VOCAB


def test_nan_logits_never_win_a_sampled_row():
    logits = _logits(1)
    logits[0, 3] = float("nan")
    seq = _seq([0], repetition_penalty=1.2, temperature=1.0)
    sampler = Sampler(VOCAB, [EOS], torch.device("cpu"))
    tokens = {sampler(logits.clone(), [seq])[0].token_id for _ in range(20)}
    assert 3 not in tokens


def test_min_tokens_ban_still_forbids_eos_under_a_huge_negative_bias_elsewhere():
    logits = _logits(1)
    seq = _seq([0], min_new_tokens=2, temperature=1.0, logit_bias={t: -100.0 for t in range(VOCAB - 1)})
    tokens = {Sampler(VOCAB, [EOS], torch.device("cpu"))(logits.clone(), [seq])[0].token_id for _ in range(10)}
    assert EOS not in tokens


def test_a_row_its_constraint_leaves_empty_ends_on_eos_instead_of_failing_the_step():
    dead_end = _seq([1], allowed=(), temperature=1.0)
    other = _seq([2], temperature=0.0)
    out = Sampler(VOCAB, [EOS], torch.device("cpu"))(_logits(2), [dead_end, other])
    assert out[0].token_id == EOS and out[1].token_id == VOCAB - 1


def _penalized_reference(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """The penalties computed from the whole context (HF's repetition penalty, OpenAI's presence/frequency)."""
    p, row = seq.params, logits.clone()
    seen = torch.tensor(sorted(set(seq.all_ids)))
    row[seen] = torch.where(row[seen] > 0, row[seen] / p.repetition_penalty, row[seen] * p.repetition_penalty)
    counts = torch.bincount(torch.tensor(seq.output_ids, dtype=torch.long), minlength=VOCAB).float()
    return row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()


def test_penalty_counts_follow_the_sequence_step_by_step():
    # the sampler keeps running counts: each step's processed row equals the from-scratch computation, also
    # when several tokens arrive in one step (an accepted draft)
    sampler = Sampler(VOCAB, [EOS], torch.device("cpu"))
    seq = _seq([3, 4, 4, 9], repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.3, temperature=0.0)
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))
    for new_tokens in ([], [5], [5, 7, 3], [11], [5]):
        for token in new_tokens:
            seq.append_token(token)
        torch.testing.assert_close(sampler._process(logits, [seq])[0], _penalized_reference(logits[0], seq))
