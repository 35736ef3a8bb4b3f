"""Speculative decoding without a draft model: prompt lookup (n-gram) drafting, verified in the same step.

A decoding sequence whose last n tokens (n = 3, then 2) occurred earlier in its prompt or output proposes the
tokens that followed that occurrence. The step computes the pending token and the draft together (one chunk
of 1 + k tokens, logits at every position); the draft is accepted up to its first token the model would not
have chosen greedily, and the model's own token at that position comes free. Greedy output is therefore
identical to decoding one token at a time. Copy-heavy outputs (tool calls that repeat arguments, code edits,
quoting) accept long drafts; free text rarely drafts at all.

Only greedy requests without logits processing (penalties, biases, grammar, logprobs, min_new_tokens still
pending) draft: for them the verification needs nothing but an argmax per position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NGRAM_SIZES = (3, 2)  # longest first: a longer match predicts better


@dataclass
class PromptLookup:
    """Per sequence: where each n-gram last ended, filled in as the sequence grows (memoized, so each step's
    lookup is O(1) instead of a scan of the whole context)."""

    indexed: int = 0  # n-grams ending at positions < indexed are recorded
    last_end: dict[tuple[int, ...], int] = field(default_factory=dict)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the sequence's final n-gram."""
        end = len(tokens)
        # record n-grams ending before the current end (the final n-gram itself must match an earlier one)
        for stop in range(max(self.indexed, 1), end):
            for n in NGRAM_SIZES:
                if stop >= n:
                    self.last_end[tuple(tokens[stop - n:stop])] = stop
        self.indexed = max(self.indexed, end)
        for n in NGRAM_SIZES:
            if end >= n:
                found = self.last_end.get(tuple(tokens[end - n:end]))
                if found is not None and found < end:
                    return tokens[found:found + k]
        return []


@dataclass(frozen=True)
class SpeculativeConfig:
    num_tokens: int = 0  # draft length; 0: off
    max_decodes: int = 4  # draft only while at most this many sequences decode (a small batch has idle compute)

    @property
    def enabled(self) -> bool:
        return self.num_tokens > 0


def accept_draft(draft: list[int], predicted: list[int]) -> tuple[list[int], int]:
    """`predicted[i]` is the model's greedy token after position i of the chunk (the pending token, then each
    draft token). Returns (accepted draft prefix, the model's next token after it)."""
    accepted = 0
    while accepted < len(draft) and draft[accepted] == predicted[accepted]:
        accepted += 1
    return draft[:accepted], predicted[accepted]
