"""Logits processing and token selection for one batch.

Order: logit bias → penalties → min_new_tokens EOS ban → grammar mask → (greedy argmax | temperature,
top-k, top-p, min-p, seeded multinomial). Logprobs report the model's raw distribution (as vLLM does by
default), so they do not depend on the sampling knobs.
"""

from __future__ import annotations

import logging
import weakref

import torch

from lightllm.engine.scheduler import SampledToken
from lightllm.engine.sequence import Sequence
from lightllm.kernels import cpu as cpu_kernels

logger = logging.getLogger("lightllm.engine")


def _finite_(row: torch.Tensor) -> torch.Tensor:
    """In place: NaN → -inf (never chosen), +inf → the largest finite value (softmax stays defined)."""
    return torch.nan_to_num_(row, nan=float("-inf"), posinf=torch.finfo(row.dtype).max, neginf=float("-inf"))


def _clamp_finite_(row: torch.Tensor) -> torch.Tensor:
    """In place: every value finite. Penalties, biases and temperature make a token less or more likely but
    never forbid it; only masks (grammar, min_tokens) write -inf, so a row always keeps a token to choose."""
    info = torch.finfo(row.dtype)
    return torch.nan_to_num_(row, nan=info.min, posinf=info.max, neginf=info.min)


class PenaltyCounts:
    """One penalized sequence's token statistics over the vocabulary, kept up to date with the tokens it
    gains, so a step costs the vocabulary's size, not the context's: which tokens the prompt or the output
    holds (repetition_penalty) and how often each was generated (presence and frequency penalties)."""

    def __init__(self, seq: Sequence, vocab: int, device: torch.device):
        self.vocab = vocab
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.seen[self._ids(seq.prompt_ids)] = True
        self.counted = len(seq.prompt_ids)  # leading tokens of seq.token_ids taken in

    def _ids(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.long, device=self.seen.device)
        return t[(t >= 0) & (t < self.vocab)]

    def update(self, seq: Sequence) -> None:
        new = seq.token_ids[self.counted:]  # the tokens sampled since the last step (several after a draft)
        if new:
            ids = self._ids(new)
            self.seen[ids] = True
            self.counts.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float32, device=ids.device))
            self.counted = len(seq.token_ids)


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], device: torch.device):
        self.vocab_size = vocab_size
        self.eos_token_ids = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
        self.device = device
        # penalized sequences' counts, dropped with their sequence
        self._penalties: weakref.WeakKeyDictionary[Sequence, PenaltyCounts] = weakref.WeakKeyDictionary()

    def _penalty_counts(self, seq: Sequence, row: torch.Tensor) -> PenaltyCounts:
        counts = self._penalties.get(seq)
        if counts is None:
            counts = self._penalties[seq] = PenaltyCounts(seq, row.shape[0], row.device)
        counts.update(seq)
        return counts

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in seqs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._process(logits, seqs)
        greedy = [s.params.greedy for s in seqs]
        tokens = torch.empty(len(seqs), dtype=torch.long)
        if any(greedy):
            tokens[:] = cpu_kernels.argmax_rows(logits).cpu()
        for i, seq in enumerate(seqs):
            if not greedy[i]:
                tokens[i] = self._sample_row(logits[i], seq)
        results = []
        for i, seq in enumerate(seqs):
            token = int(tokens[i])
            result = SampledToken(token)
            if raw_logprobs is not None and seq.params.logprobs is not None:
                row = raw_logprobs[i]
                result.logprob = float(row[token])
                k = seq.params.logprobs
                if k > 0:
                    values, ids = row.topk(k)
                    result.top_logprobs = list(zip(ids.tolist(), values.tolist()))
            results.append(result)
        return results

    def _process(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        needs_copy = any(self._row_needs_processing(s) for s in seqs)
        if not needs_copy:
            return logits
        logits = logits.clone()
        for i, seq in enumerate(seqs):
            p = seq.params
            row = logits[i]
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias.keys()), dtype=torch.long, device=row.device)
                row.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device))
            if p.repetition_penalty != 1.0:
                seen = self._penalty_counts(seq, row).seen
                penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                row.copy_(torch.where(seen, penalized, row))
            if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
                counts = self._penalty_counts(seq, row).counts.to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
            _clamp_finite_(row)  # e.g. repetition_penalty 1e70 overflows float32: unlikely, not forbidden
            if seq.num_output_tokens < p.min_new_tokens and self.eos_token_ids.numel():
                row[self.eos_token_ids] = float("-inf")
                if p.stop_token_ids:
                    row[torch.tensor(p.stop_token_ids, device=row.device)] = float("-inf")
            if seq.grammar is not None:
                seq.grammar.apply_mask(row)
                # a grammar at a dead end (admission refuses one that cannot start): end the request rather
                # than fail the whole step on an empty distribution (only a grammar can forbid every token)
                if self.eos_token_ids.numel() and bool(torch.isneginf(row).all()):
                    logger.warning("request %s: its constraint allows no token here; ending it", seq.rid)
                    row[self.eos_token_ids[0]] = 0.0
            _finite_(row)  # a NaN a mask left must not reach softmax
        return logits

    @staticmethod
    def _row_needs_processing(seq: Sequence) -> bool:
        p = seq.params
        return bool(p.logit_bias or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                    or seq.num_output_tokens < p.min_new_tokens or seq.grammar is not None)

    def _sample_row(self, row: torch.Tensor, seq: Sequence) -> int:
        p = seq.params
        forbidden = row == float("-inf")
        row = _clamp_finite_(row / p.temperature).masked_fill_(forbidden, float("-inf"))
        if 0 < p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cumulative = sorted_probs.cumsum(0)
            # Keep the smallest set whose mass reaches top_p (the first token always survives).
            drop = cumulative - sorted_probs > p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return int(torch.multinomial(probs, 1, generator=seq.generator))
