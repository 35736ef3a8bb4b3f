"""A grammar that waits for the end of the thinking block (SamplingParams.grammar_gate).

Phases, by the tokens sampled so far:
- `open` (the output may open a block): the first token is the start tag's first token or one the grammar
  allows; once the start tag begins, its remaining tokens are the only choice, and the block is open.
- `think`: no constraint; the block ends when the last tokens are the end tag's.
- `grammar`: the wrapped matcher masks and accepts every token from here on.

Tags are matched on their canonical token ids (single special tokens in Qwen3, GLM-4.5 and Kimi-K2).
"""

from __future__ import annotations

from typing import Any

import torch

from lightllm.engine.protocol import ReasoningGate


class GatedGrammar:
    """The matcher interface (apply_mask / accept_token / is_terminated) around a grammar matcher."""

    def __init__(self, inner: Any, gate: ReasoningGate):
        self.inner = inner
        self.gate = gate
        self.phase = "think" if gate.in_block else ("open" if gate.start else "grammar")
        self.tag: list[int] = []  # tokens of the tag being matched (start tag in `open`, recent ones in `think`)

    def apply_mask(self, row: torch.Tensor) -> None:
        if self.phase == "grammar":
            self.inner.apply_mask(row)
        elif self.phase == "open":
            nxt = self.gate.start[len(self.tag)]
            keep = row[nxt].clone()
            if self.tag:  # inside the start tag: only its next token
                row.fill_(float("-inf"))
            else:
                self.inner.apply_mask(row)
            row[nxt] = keep

    def accept_token(self, token_id: int) -> None:
        if self.phase == "grammar":
            self.inner.accept_token(token_id)
        elif self.phase == "open":
            if token_id != self.gate.start[len(self.tag)]:  # no block: this token is the grammar's first
                self.phase = "grammar"
                self.inner.accept_token(token_id)
                return
            self.tag.append(token_id)
            if len(self.tag) == len(self.gate.start):
                self.phase, self.tag = "think", []
        else:
            end = self.gate.end
            self.tag = (self.tag + [token_id])[-len(end):]
            if tuple(self.tag) == end:
                self.phase = "grammar"

    def is_terminated(self) -> bool:
        return self.phase == "grammar" and self.inner.is_terminated()
