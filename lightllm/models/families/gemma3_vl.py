"""Gemma 3 with images (`Gemma3ForConditionalGeneration`): the Gemma 3 decoder (families/gemma3.py, its
`text_config`) fed by a SigLIP tower and projector (models/vision/gemma3.py). In prefill an image's tokens attend
to each other both ways (transformers builds that from token_type_ids); everything else stays causal, and
sliding where the layer slides."""

from __future__ import annotations

from lightllm.models.families.base import Family
from lightllm.models.families.gemma2 import HF_LAYER_NAMES, GemmaModel
from lightllm.models.families.gemma3 import hf_text_config, hf_facts


class Gemma3VisionModel(GemmaModel):
    bidirectional_images = True


FAMILY = Family(
    name="gemma3_vl",
    model_class=Gemma3VisionModel,
    hf_architectures=("Gemma3ForConditionalGeneration",),
    hf_model_types=("gemma3",),
    hf_layer_names=HF_LAYER_NAMES,
    hf_text_config=hf_text_config,
    hf_facts=hf_facts,
    vision="gemma3",
)
