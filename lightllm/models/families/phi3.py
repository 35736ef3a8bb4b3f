"""Phi-3 / Phi-3.5: the Llama decoder; checkpoints hold q/k/v and gate/up fused (the loader splits them) and
`longrope` (su) scaling lives in the rotary embedding. Partial rotary (Phi-4-mini) is refused by the loader."""

from __future__ import annotations

from lightllm.models.decoder import LlamaModel
from lightllm.models.families.base import Family

FAMILY = Family(
    name="phi3",
    model_class=LlamaModel,
    hf_architectures=("Phi3ForCausalLM",),
    hf_model_types=("phi3",),
    gguf_architecture="phi3",
)
