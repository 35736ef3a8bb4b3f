"""Gemma 3 with images through the engine: a tiny random `Gemma3ForConditionalGeneration` (SigLIP tower, pooling
projector, Gemma 3 decoder with sliding layers whose window is shorter than an image) built with transformers;
its logits equal transformers' within 1e-4 in fp32 for prompts with one and two images, alone and batched, with
chunked prefill around the images, and under --tp 2. An image's tokens attend to each other both ways in prefill,
so the scheduler never ends a chunk inside an image's run (LLaVA's chunks still cut through images). A published
Gemma 3 config.json (defaults left out) reads as transformers resolves it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from lightllm.engine.engine import Engine
from lightllm.engine.protocol import AddRequest, EngineConfig, ImageInput, SamplingParams
from tests.conftest import record_logits
from tests.vlm_models import digest, drain, draw_png

IMAGE_SIZE, PATCH, TOKENS_PER_IMAGE = 32, 4, 16  # an 8x8 patch grid pooled 2x2 into 4x4 image tokens
WINDOW = 12  # the sliding layers' window: shorter than an image's run, so the window cuts through images
BOI, EOI, IMAGE = 297, 298, 299
STEPS = 6


def build_tiny_gemma3(path: Path, vocab_size: int = 300, boi: int = BOI, eoi: int = EOI, image: int = IMAGE,
                      **text_overrides) -> Path:
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil,
                              Gemma3TextConfig, SiglipVisionConfig)

    text = Gemma3TextConfig(**{**dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], max_position_embeddings=512,
        bos_token_id=2, eos_token_id=1, pad_token_id=0), **text_overrides})
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS_PER_IMAGE,
                          boi_token_index=boi, eoi_token_index=eoi, image_token_index=image)
    torch.manual_seed(1234)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # norms start at ones / zeros: make them matter
                param.normal_(float(param.mean()), 0.3)
            elif "position_embedding" in name or "patch_embedding.bias" in name:
                param.normal_(0, 0.5)
            elif "mm_input_projection_weight" in name:  # zeros at init: image embeddings of the text's scale
                param.normal_(0, 0.15)
    model.save_pretrained(path)
    Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path


def prompt(parts: list) -> tuple[list[int], list[bytes]]:
    """Token ids with Gemma 3's image run (<start_of_image>, soft tokens, <end_of_image>) wherever `parts` holds
    image bytes."""
    ids, images = [], []
    for part in parts:
        if isinstance(part, bytes):
            ids += [BOI] + [IMAGE] * TOKENS_PER_IMAGE + [EOI]
            images.append(part)
        else:
            ids += part
    return ids, images


def image_inputs(ids: list[int], images: list[bytes]) -> list[ImageInput]:
    offsets = [i for i, t in enumerate(ids) if t == IMAGE and (i == 0 or ids[i - 1] != IMAGE)]
    return [ImageInput(data, digest(data), off, TOKENS_PER_IMAGE) for data, off in zip(images, offsets)]


_REFERENCE_MODELS: dict[str, object] = {}


def reference(model_dir, ids: list[int], images: list[bytes], steps: int = STEPS,
              bidirectional: bool = True) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens and logits; the image tokens marked in token_type_ids as Gemma3Processor marks
    them (without them transformers' prefill is causal throughout)."""
    from PIL import Image
    from transformers import AutoImageProcessor, Gemma3ForConditionalGeneration

    key = str(model_dir)
    if key not in _REFERENCE_MODELS:
        _REFERENCE_MODELS[key] = Gemma3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = _REFERENCE_MODELS[key]
    inputs = torch.tensor([ids])
    extra = {}
    if images:
        extra["pixel_values"] = AutoImageProcessor.from_pretrained(model_dir)(
            images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images], return_tensors="pt")["pixel_values"]
    if bidirectional:
        extra["token_type_ids"] = (inputs == IMAGE).long()
    out = model.generate(inputs, **extra, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), [step[0].float() for step in out.logits]


def engine_for(model_dir, **kwargs) -> Engine:
    kwargs.setdefault("max_total_token_num", 2048)
    return Engine(EngineConfig(model_path=str(model_dir), kv_cache_dtype="fp32", quant_type="none",
                               spec_ngram_tokens=0, **kwargs))


def run(engine: Engine, requests: dict[str, tuple[list[int], list[bytes]]], together: bool = True, steps: int = STEPS):
    """Greedy-run the requests; returns (tokens, logits per step, cached tokens, chunks run) by rid; chunks as
    (start, end) prompt positions."""
    logits = record_logits(engine)
    chunks: dict[str, list[tuple[int, int]]] = {}
    execute = engine.runner.execute

    def recording(plan):
        for c in plan:
            chunks.setdefault(c.seq.rid, []).append((c.start, c.start + c.num_tokens))
        return execute(plan)

    engine.runner.execute = recording
    tokens: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    for rid, (ids, images) in requests.items():
        refused = engine.add_request(AddRequest(rid, ids, SamplingParams(max_new_tokens=steps, temperature=0.0,
                                                                         ignore_eos=True), image_inputs(ids, images)))
        assert refused is None, refused.error
        if not together:
            drain(engine, tokens, cached)
    drain(engine, tokens, cached)
    return tokens, logits, cached, chunks


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3v") / "model")


RED, BLUE = draw_png(1), draw_png(2)
PROMPTS = {
    "one": prompt([[2, 33, 71, 5, 8], RED, [12, 80, 44]]),
    "two": prompt([[2, 9], BLUE, [17, 23, 5], RED, [61, 3, 40, 7]]),
    "text": prompt([[2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]),  # text-only, batched with the others
}


def _runs(ids: list[int], images: list[bytes]) -> list[tuple[int, int]]:
    return [(i.offset, i.offset + i.length) for i in image_inputs(ids, images)]


def test_logits_equal_transformers_with_chunks_around_images(gemma3_dir):
    # 7-token chunks in 14-token steps: chunks end before images, and each image's 16 tokens run in one chunk
    engine = engine_for(gemma3_dir, chunked_prefill_size=7, batch_max_tokens=14)
    assert engine.model.bidirectional_images and engine.model.kernels is None
    tokens, logits, _, chunks = run(engine, PROMPTS)
    for rid, (ids, images) in PROMPTS.items():
        ref_tokens, ref_logits = reference(gemma3_dir, ids, images)
        assert tokens[rid] == ref_tokens, rid
        for ours, theirs in zip(logits[rid], ref_logits, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        for first, last in _runs(ids, images):  # no chunk ends inside an image; one ended at an image's start
            assert not any(first < end < last for _, end in chunks[rid]), (rid, chunks[rid])
            assert any(start == first and end >= last for start, end in chunks[rid]), (rid, chunks[rid])
    # 7 tokens would end inside RED's run (6..22): the chunk ends at 6 and the next step takes the run whole
    assert any(end == 6 for _, end in chunks["one"]) and (6, 22) in chunks["one"]


def test_logits_equal_transformers_alone_and_without_chunking(gemma3_dir):
    engine = engine_for(gemma3_dir, disable_chunked_prefill=True)
    tokens, logits, _, chunks = run(engine, {k: PROMPTS[k] for k in ("two", "one")}, together=False)
    for rid in ("two", "one"):
        ref_tokens, ref_logits = reference(gemma3_dir, *PROMPTS[rid])
        assert tokens[rid] == ref_tokens
        for ours, theirs in zip(logits[rid], ref_logits, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        assert chunks[rid][0][1] == len(PROMPTS[rid][0])  # the whole prompt in one step (BOS may be cached)


def test_images_attend_both_ways_and_change_the_answer(gemma3_dir):
    """The comparison above can fail: transformers' causal prefill (no token_type_ids) gives other logits, and
    the image changes the answer."""
    engine = engine_for(gemma3_dir)
    _, logits, _, _ = run(engine, {"red": PROMPTS["one"], "blue": prompt([[2, 33, 71, 5, 8], BLUE, [12, 80, 44]])})
    causal = reference(gemma3_dir, *PROMPTS["one"], steps=1, bidirectional=False)[1][0]
    assert (logits["red"][0] - causal).abs().max() > 1e-2
    assert (logits["red"][0] - logits["blue"][0]).abs().max() > 1e-2


def test_a_cached_image_head_and_a_prompt_ending_in_an_image(gemma3_dir):
    # the same prompt again, ending inside an image's run: the cache holds all but its last token, which is
    # computed over the cached run; equal to transformers' with the whole image bidirectional
    engine = engine_for(gemma3_dir, chunked_prefill_size=8)
    ends_in_image = prompt([[2, 5, 6, 7, 9], BLUE])
    ids, images = ends_in_image[0][:-1], ends_in_image[1]  # <end_of_image> dropped: the prompt ends in the run
    tokens, logits, cached, chunks = run(engine, {"first": (ids, images), "again": (ids, images)}, together=False)
    assert cached["again"] == len(ids) - 1 and chunks["again"][0] == (len(ids) - 1, len(ids))
    ref_tokens, ref_logits = reference(gemma3_dir, ids, images)
    for rid in ("first", "again"):
        assert tokens[rid] == ref_tokens
        for ours, theirs in zip(logits[rid], ref_logits, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_the_scheduler_moves_chunk_ends_off_image_runs():
    from lightllm.engine.scheduler import Scheduler
    from lightllm.engine.sequence import Sequence

    ids, images = prompt([[2, 9, 10], RED, [17, 23, 5, 4, 4, 4, 4, 4, 4, 4], BLUE, [1]])
    seq = Sequence("s", ids, SamplingParams(), images=image_inputs(ids, images))
    red, blue = _runs(ids, images)  # (4, 20), (32, 48)
    cut = Scheduler._image_runs_whole
    assert cut(seq, 0, 4) == 4 and cut(seq, 0, 3) == 3  # ends at or before the run: as is
    assert cut(seq, 0, 7) == red[0]  # would end inside: ends at the run's start
    assert cut(seq, red[0], 5) == red[1] - red[0]  # begins at the run: takes it whole, past the budget
    assert cut(seq, 10, 2) == red[1] - 10  # begins inside (a cached head): the rest of the run
    assert cut(seq, red[0], 30) == blue[0] - red[0]  # past one image, would end inside the next
    assert cut(seq, 20, 50) == 50


def test_a_mask_that_would_cut_an_image_is_refused():
    from lightllm.models.layers import causal_mask

    # queries 6..9 of a 10-token context, the run [6, 9) an image, token 9 text after it
    mask = causal_mask(4, 10, None, torch.device("cpu"), [(6, 9)])
    assert mask[0].tolist() == [True] * 9 + [False]  # the run's first token sees its whole run, not the text
    assert mask[3].tolist() == [True] * 10  # the text after it: causal
    windowed = causal_mask(4, 10, 3, torch.device("cpu"), [(6, 9)])
    assert windowed[0].tolist() == [False] * 4 + [True] * 5 + [False]  # the window's left edge, the run's right
    assert causal_mask(4, 10, None, torch.device("cpu")).tolist() == mask.tril(6).tolist()
    with pytest.raises(ValueError, match="inside the bidirectional run"):
        causal_mask(4, 10, None, torch.device("cpu"), [(8, 12)])


def test_layout_and_family(gemma3_dir):
    from lightllm.models.loading.loader import load_model_config

    from lightllm.models.families.registry import FAMILIES

    engine = engine_for(gemma3_dir)
    assert engine.scheduler.whole_image_runs  # LLaVA's and Qwen2-VL's chunks still cut through images:
    assert [f.name for f in FAMILIES if f.model_class.bidirectional_images] == ["gemma3_vl"]
    layout = engine.images.layout
    assert layout.image_marker == (BOI,) and layout.placeholder_id == IMAGE
    assert layout.before == ("\n\n", BOI) and layout.after == (EOI, "\n\n")
    assert layout.tokens_per_image == TOKENS_PER_IMAGE
    cfg = load_model_config(gemma3_dir)
    assert cfg.architecture == "gemma3_vl" and cfg.layer_types == ["sliding_attention"] * 2 + ["full_attention"]
    assert cfg.sliding_window == WINDOW and cfg.embedding_scale == 64 ** 0.5


def test_checkpoints_the_encoder_cannot_take_are_refused_at_load(gemma3_dir, tmp_path):
    import json
    import shutil

    from lightllm.models.vision.gemma3 import load_gemma3_vision

    def variant(name: str, config: dict | None = None, preprocessor: dict | None = None) -> Path:
        path = tmp_path / name
        shutil.copytree(gemma3_dir, path)
        for file, changes in (("config.json", config), ("preprocessor_config.json", preprocessor)):
            if changes:
                data = json.loads((path / file).read_text())
                (path / file).write_text(json.dumps({**data, **changes}))
        return path

    cases = {
        "pan-and-scan": variant("pan", preprocessor={"do_pan_and_scan": True}),
        "does not pool a 8x8 patch grid": variant("pool", config={"mm_tokens_per_image": 9}),
        "the vision tower takes 32x32": variant("size", preprocessor={"size": {"height": 64, "width": 64}}),
        "outside the 300-token vocabulary": variant("vocab", config={"image_token_index": 300}),
    }
    for message, path in cases.items():
        with pytest.raises(ValueError, match=message):
            load_gemma3_vision(path, torch.device("cpu"), torch.float32)


def test_tp2_keeps_images_bidirectional(gemma3_dir):
    # the masks are built on rank 0 and travel with the step's inputs; the image rows too (LLaVA's tp path)
    from tests.conftest import free_port

    engine = engine_for(gemma3_dir, tp=2, nccl_port=free_port(), chunked_prefill_size=7, batch_max_tokens=14)
    try:
        assert engine.model.config.num_heads == 2
        tokens, logits, _, _ = run(engine, PROMPTS)
    finally:
        engine.shutdown()
    for rid, (ids, images) in PROMPTS.items():
        ref_tokens, ref_logits = reference(gemma3_dir, ids, images)
        assert tokens[rid] == ref_tokens, rid
        for ours, theirs in zip(logits[rid], ref_logits, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# google/gemma-3-4b-it's config.json: transformers 4.50 wrote only the values that differ from the defaults
GEMMA3_4B_IT = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}


def test_a_published_config_reads_as_transformers_resolves_it():
    from transformers import Gemma3Config

    from lightllm.models.loading.hf import config_from_hf
    from lightllm.models.vision.gemma3 import gemma3_layout
    from lightllm.models.vision.siglip import siglip_config

    ours, theirs = config_from_hf(GEMMA3_4B_IT), Gemma3Config.from_dict(GEMMA3_4B_IT)
    text, vision = theirs.text_config, theirs.vision_config
    assert ours.architecture == "gemma3_vl"
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size, ours.num_layers, ours.num_heads,
            ours.num_kv_heads, ours.head_dim, ours.max_position_embeddings, ours.sliding_window) == (
        text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
        text.num_key_value_heads, text.head_dim, text.max_position_embeddings, text.sliding_window)
    assert ours.layer_types == text.layer_types and ours.attention_scale == text.query_pre_attn_scalar ** -0.5
    assert ours.rms_norm_eps == text.rms_norm_eps and ours.tie_word_embeddings
    full, sliding = text.rope_parameters["full_attention"], text.rope_parameters["sliding_attention"]
    assert ours.rope_theta == full["rope_theta"] and ours.local_rope_theta == sliding["rope_theta"]
    assert ours.rope_scaling == {"factor": full["factor"], "rope_type": full["rope_type"]}
    assert ours.eos_token_ids == [1, 106] and ours.bos_token_id == text.bos_token_id
    tower = siglip_config(GEMMA3_4B_IT["vision_config"])
    assert (tower.hidden_size, tower.num_heads, tower.num_layers, tower.image_size, tower.patch_size,
            tower.layer_norm_eps, tower.hidden_act) == (vision.hidden_size, vision.num_attention_heads,
                                                        vision.num_hidden_layers, vision.image_size, vision.patch_size,
                                                        vision.layer_norm_eps, vision.hidden_act)
    layout = gemma3_layout(GEMMA3_4B_IT)
    assert (layout.image_marker, layout.placeholder_id, layout.tokens_per_image) == (
        (theirs.boi_token_index,), theirs.image_token_index, theirs.mm_tokens_per_image)


@pytest.mark.slow
def test_the_encoder_at_gemma3s_real_geometry_equals_transformers(tmp_path):
    """SigLIP So400m's width and heads at 896 px (a 64x64 patch grid pooled 4x4 into 256 tokens), two of its 27
    layers: the image features equal transformers' get_image_features."""
    from PIL import Image
    from transformers import (AutoImageProcessor, Gemma3Config, Gemma3ForConditionalGeneration,
                              Gemma3ImageProcessorPil, Gemma3TextConfig, SiglipVisionConfig)

    from lightllm.models.vision.gemma3 import load_gemma3_vision

    text = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16,
                                image_size=896, patch_size=14, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, boi_token_index=BOI,
                          eoi_token_index=EOI, image_token_index=IMAGE)
    torch.manual_seed(99)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(float(param.mean()), 0.3)
            elif "mm_input_projection_weight" in name or "position_embedding" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    Gemma3ImageProcessorPil(size={"height": 896, "width": 896}).save_pretrained(tmp_path)
    png = draw_png(7, size=(448, 448))
    ours = load_gemma3_vision(tmp_path, torch.device("cpu"), torch.float32).encode(png)
    pixels = AutoImageProcessor.from_pretrained(tmp_path)(images=[Image.open(io.BytesIO(png)).convert("RGB")],
                                                          return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        theirs = model.model.get_image_features(pixels).pooler_output[0]
    assert ours.shape == (256, 64)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
