"""Mixture of experts (Mixtral, Qwen3-MoE): each layer's MLP is a router over SwiGLU experts. A token's
router logits go through a float32 softmax, its top-k experts run, and their outputs are summed with the
softmax weights (renormalised over the chosen k when the model says so: Mixtral always, Qwen3-MoE per its
`norm_topk_prob`). Attention is the base family's (families/mixtral.py, families/qwen3moe.py)."""

from __future__ import annotations

from typing import Callable

import torch

from lightllm.models.decoder import ExpertWeights, LayerWeights


def routed_experts(x: torch.Tensor, moe: ExpertWeights, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x: [T, hidden] → [T, hidden]. Each expert runs once on the rows routed to it (grouped, not per token)."""
    weights = torch.softmax(moe.router(x).float(), dim=-1)
    top_weights, top_experts = weights.topk(moe.top_k, dim=-1)
    if moe.renormalize:
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    top_weights = top_weights.to(x.dtype)
    out = torch.zeros_like(x)
    for expert in top_experts.unique().tolist():
        rows, rank = (top_experts == expert).nonzero(as_tuple=True)
        gate, up = moe.gate_up[expert](x.index_select(0, rows)).chunk(2, dim=-1)
        y = moe.down[expert](act(gate) * up)
        out.index_add_(0, rows, y * top_weights[rows, rank].unsqueeze(1))
    return out


class RoutedExperts:
    """Mixin: the layer's MLP is its routed experts (overriding `_mlp`, so the fused C path does not run it:
    decoder.LlamaModel.runs_fused)."""

    def _mlp(self, x: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        return routed_experts(x, lw.experts, self.act)
