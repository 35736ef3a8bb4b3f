"""Tiny PEFT LoRA adapters for the tests: built with `peft` on a tiny random base model, with random non-zero
weights (peft starts B at zero, which would make every adapter the base model), saved as PEFT folders."""

from __future__ import annotations

import functools
from pathlib import Path

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapter(base_dir: Path, out_dir: Path, seed: int, r: int = 8, alpha: float = 16,
                  target_modules: list[str] | None = None, use_rslora: bool = False,
                  rank_pattern: dict | None = None, alpha_pattern: dict | None = None) -> Path:
    """Save a LoRA adapter for the model at `base_dir` into `out_dir` (adapter_config.json +
    adapter_model.safetensors); returns `out_dir`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules or ALL_MODULES, lora_dropout=0.0,
                        use_rslora=use_rslora, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(out_dir)
    return out_dir


@functools.lru_cache(maxsize=16)
def merged_model(base_dir: Path, adapter_dir: Path | None):
    """The reference: the base model with the adapter merged into its weights by peft (None: the base); built
    once per test process (the tests only run it)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is None:
        return base
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()
