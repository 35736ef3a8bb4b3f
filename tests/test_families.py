"""Family descriptors: every family is found by its own names, and the fused C path never skips a family's hook."""

from __future__ import annotations

import pytest
import torch

from lightllm.models.decoder import FUSED_PATH_HOOKS, PYTORCH_PATH_ONLY_HOOKS, LayerWeights, LlamaModel
from lightllm.models.families.registry import FAMILIES, family_for_gguf, family_for_hf, family_named, model_class_for


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_each_family_is_found_by_its_names(family):
    assert family_named(family.name) is family and model_class_for(family.name) is family.model_class
    for arch in family.hf_architectures:
        assert family_for_hf({"architectures": [arch]}) is family
    for model_type in family.hf_model_types:
        assert family_for_hf({"model_type": model_type}) is family
    if family.gguf_architecture:
        assert family_for_gguf(family.gguf_architecture, family.gguf_has_experts) is family


def test_names_are_unique_across_families():
    hf = [a for f in FAMILIES for a in f.hf_architectures]
    gguf = [(f.gguf_architecture, f.gguf_has_experts) for f in FAMILIES if f.gguf_architecture]
    assert len(hf) == len(set(hf)) and len(gguf) == len(set(gguf))
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)


def test_llama_gguf_with_experts_is_mixtral_and_unknown_names_are_refused():
    assert family_for_gguf("llama", True).name == "mixtral" and family_for_gguf("llama", False).name == "llama"
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'falcon'.*qwen2"):
        family_for_gguf("falcon", False)
    with pytest.raises(ValueError, match="Qwen2-VL.*mmproj.*Hugging Face directory"):
        family_for_gguf("qwen2vl", False)  # llama.cpp's split Qwen2-VL: said plainly, not "unsupported"
    with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM"):
        family_for_hf({"architectures": ["FalconForCausalLM"], "model_type": "falcon"})


def test_fused_path_runs_only_families_whose_hooks_it_calls():
    runs_fused = {f.name: f.model_class.runs_fused() for f in FAMILIES}
    assert runs_fused == {"llama": True, "mistral": True, "qwen2": True, "qwen3": True, "phi3": True,
                          "qwen3moe": False, "mixtral": False, "gemma2": False, "gemma3": False, "llava": True,
                          "gemma3_vl": False, "qwen2_vl": True}
    # every hook the PyTorch path calls is in one of the two groups
    assert set(FUSED_PATH_HOOKS) | set(PYTORCH_PATH_ONLY_HOOKS) == {
        name for name in vars(LlamaModel) if name.startswith("_") and not name.startswith("__")
        and callable(getattr(LlamaModel, name)) and name not in ("_forward", "_forward_fused", "_exact_head_source",
                                                                 "_refine_top_logits_")}  # (the paths themselves)


@pytest.mark.parametrize("hook", PYTORCH_PATH_ONLY_HOOKS)
def test_a_new_family_overriding_a_pytorch_only_hook_cannot_run_fused(hook):
    def override(self, out: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        return out

    family = type("NewFamilyModel", (LlamaModel,), {hook: override})
    assert not family.runs_fused()
    fused_hook = type("QkFamilyModel", (LlamaModel,), {"_norm_qk_": lambda self, qk, lw: None})
    assert fused_hook.runs_fused()
