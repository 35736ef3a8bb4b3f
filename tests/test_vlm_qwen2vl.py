"""Qwen2-VL and Qwen2.5-VL through the engine: tiny random checkpoints built with transformers; our logits equal
transformers' in fp32 for prompts with one and two images of different sizes (dynamic resolution: each image's
token count follows its size), alone and batched with each other and a text-only prompt, with chunked prefill
cutting through the images' tokens and decode steps after them (M-RoPE's position delta); the layout's
smart_resize rule equals the image processor's."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from lightllm.engine.engine import Engine
from lightllm.engine.protocol import AddRequest, EngineConfig, ImageInput, SamplingParams
from tests.vlm_models import digest, drain, draw_png, run_image_requests

IMAGE, VISION_START, VISION_END, VIDEO = 299, 296, 297, 298
STEPS = 6
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 24  # small images: 4 to 24 tokens each


def build_tiny_qwen2_vl(path: Path, qwen25: bool = False, vocab_size: int = 300, image_token_id: int = IMAGE,
                        vision_start_token_id: int = VISION_START, vision_end_token_id: int = VISION_END,
                        video_token_id: int = VIDEO, **text_overrides) -> Path:
    """A random Qwen2-VL (or Qwen2.5-VL) with a two-layer language model (head size 16, mrope_section [2, 3, 3])
    and a two-block vision tower, saved with its image processor's settings."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, \
        Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    text = {**dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                   rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                   bos_token_id=1, eos_token_id=2), **text_overrides}
    if qwen25:  # windows of 56 px = 2 × 2 merged tokens, full attention in block 1 of 3
        vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, image_token_id=image_token_id,
                          video_token_id=video_token_id, vision_start_token_id=vision_start_token_id,
                          vision_end_token_id=vision_end_token_id)
    torch.manual_seed(1234)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_q" in name:  # norms start at ones / zeros: make them matter
                param.normal_(float(param.mean()), 0.3)
            elif "merger" in name or "patch_embed" in name:
                param.normal_(0, 0.3)  # image embeddings of the text model's scale, so images change the answer
            elif "visual" not in name and param.dim() == 2:
                param.normal_(0, 0.1)  # larger than the default init: positions and images move the logits more
    model.save_pretrained(path)
    Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}).save_pretrained(path)
    return path


def image_tokens(png: bytes) -> int:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from PIL import Image

    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    t, h, w = processor(images=[Image.open(io.BytesIO(png)).convert("RGB")], return_tensors="pt")["image_grid_thw"][0]
    return int(t * h * w) // 4


def _prompt(parts: list) -> tuple[list[int], list[bytes]]:
    """Token ids with <|vision_start|> + the image's pads + <|vision_end|> wherever `parts` holds image bytes."""
    ids, images = [], []
    for part in parts:
        if isinstance(part, bytes):
            ids += [VISION_START] + [IMAGE] * image_tokens(part) + [VISION_END]
            images.append(part)
        else:
            ids += part
    return ids, images


def _inputs(ids: list[int], images: list[bytes]) -> list[ImageInput]:
    offsets = [i for i, t in enumerate(ids) if t == IMAGE and ids[i - 1] != IMAGE]
    return [ImageInput(data, digest(data), off, image_tokens(data)) for data, off in zip(images, offsets)]


_REFERENCE_MODELS: dict[str, object] = {}


def _reference(model_dir, ids: list[int], images: list[bytes]) -> tuple[list[int], list[torch.Tensor]]:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    key = str(model_dir)
    if key not in _REFERENCE_MODELS:
        _REFERENCE_MODELS[key] = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = _REFERENCE_MODELS[key]
    extra = {}
    if images:
        processed = AutoImageProcessor.from_pretrained(model_dir)(
            images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images], return_tensors="pt")
        extra = dict(pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"],
                     mm_token_type_ids=(torch.tensor([ids]) == IMAGE).int())
    out = model.generate(torch.tensor([ids]), **extra, max_new_tokens=STEPS, min_new_tokens=STEPS,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), [step[0].float() for step in out.logits]


def _run(engine: Engine, requests: dict[str, tuple[list[int], list[bytes]]], together: bool = True):
    """Greedy-run the requests; returns (tokens, logits per step, cached tokens) by rid."""
    return run_image_requests(engine, requests, _inputs, STEPS, together)


def _engine(model_dir, **kwargs) -> Engine:
    kwargs.setdefault("max_total_token_num", 2048)
    return Engine(EngineConfig(model_path=str(model_dir), kv_cache_dtype="fp32", quant_type="none",
                               spec_ngram_tokens=0, **kwargs))


@pytest.fixture(scope="module")
def qwen2vl_dir(tmp_path_factory):
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2vl") / "model")


@pytest.fixture(scope="module")
def qwen25vl_dir(tmp_path_factory):
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen25vl") / "model", qwen25=True)


WIDE, TALL, SQUARE = draw_png(1, (120, 50)), draw_png(2, (57, 113)), draw_png(3, (80, 64))
PROMPTS = {
    "one": _prompt([[1, 33, 71, 5], WIDE, [12, 80, 44]]),
    "two": _prompt([[1, 9], TALL, [17, 23, 5], SQUARE, [61, 3, 40, 7]]),
    "text": _prompt([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]),  # text-only, batched with the others
}


def _assert_equal_to_transformers(model_dir, tokens, logits, prompts):
    for rid, (ids, images) in prompts.items():
        ref_tokens, ref_logits = _reference(model_dir, ids, images)
        assert tokens[rid] == ref_tokens, rid
        for ours, theirs in zip(logits[rid], ref_logits, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_image_token_counts_follow_the_processors_resize():
    from lightllm.models.vision.layout import ResizeGrid

    grid = ResizeGrid(14, 2, MIN_PIXELS, MAX_PIXELS)
    for size in [(120, 50), (57, 113), (80, 64), (30, 30), (300, 200), (28, 28), (500, 40), (1000, 1000),
                 (56, 57), (111, 29)]:
        assert grid.tokens_for(*size) == image_tokens(draw_png(5, size)), size


@pytest.mark.parametrize("parts", [PROMPTS["two"], _prompt([WIDE, TALL, [5, 6]]),
                                   ([IMAGE] * image_tokens(WIDE) + [7], [WIDE])],
                         ids=["text_between", "adjacent_images", "image_first_no_markers"])
def test_prompt_positions_match_transformers_rope_index(qwen2vl_dir, parts):
    from PIL import Image
    from transformers import AutoImageProcessor

    from lightllm.models.mrope import PromptPositions

    model = _reference_model(qwen2vl_dir)
    ids, images = parts
    grid_thw = AutoImageProcessor.from_pretrained(qwen2vl_dir)(
        images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images], return_tensors="pt")["image_grid_thw"]
    theirs, delta = model.model.get_rope_index(torch.tensor([ids]), (torch.tensor([ids]) == IMAGE).int(), grid_thw)
    runs = [(image.offset, image.length, int(g[1]) // 2, int(g[2]) // 2)
            for image, g in zip(_inputs(ids, images), grid_thw)]
    ours = PromptPositions.build(len(ids), runs)
    assert torch.equal(ours.table, theirs[:, 0]) and ours.delta == int(delta)
    after = torch.arange(len(ids), len(ids) + 3).expand(3, -1) + ours.delta  # decode: index + delta in all three
    assert torch.equal(ours.slice(len(ids) - 2, len(ids) + 3), torch.cat([theirs[:, 0, -2:], after], dim=1))


@pytest.mark.parametrize("qwen25", [False, True], ids=["qwen2_vl", "qwen2_5_vl"])
def test_vision_tower_equals_transformers(qwen2vl_dir, qwen25vl_dir, qwen25):
    """The encoder's output (tower and merger) for images of several sizes, against transformers' image features:
    Qwen2.5-VL's windows matter here (the image of 5 × 4 merged tokens spans six 2 × 2 windows)."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from lightllm.models.vision.qwen2_vl import load_qwen2_vl_vision

    model_dir = qwen25vl_dir if qwen25 else qwen2vl_dir
    ours = load_qwen2_vl_vision(model_dir, torch.device("cpu"), torch.float32)
    model = _reference_model(model_dir)
    for png in (WIDE, TALL, draw_png(7, (200, 150))):
        processed = AutoImageProcessor.from_pretrained(model_dir)(images=[Image.open(io.BytesIO(png)).convert("RGB")],
                                                                  return_tensors="pt")
        with torch.no_grad():
            theirs = model.model.get_image_features(processed["pixel_values"], processed["image_grid_thw"])
        mine = ours.encode(png)
        assert mine.shape[0] == image_tokens(png) == ours.layout.tokens_for(*Image.open(io.BytesIO(png)).size)
        torch.testing.assert_close(mine, theirs.pooler_output[0], atol=1e-4, rtol=1e-5)


def _reference_model(model_dir):
    _reference(model_dir, [1, 2, 3], [])  # loads and keeps it
    return _REFERENCE_MODELS[str(model_dir)]


def test_qwen2_vl_logits_equal_transformers_with_chunked_prefill_through_images(qwen2vl_dir, model_path_kind):
    # 7-token chunks: every image's tokens are cut across chunks; the three requests share steps
    engine = _engine(qwen2vl_dir, chunked_prefill_size=7, batch_max_tokens=14)
    assert engine.ready_message().image_layout.placeholder_id == IMAGE
    tokens, logits, _ = _run(engine, PROMPTS)
    _assert_equal_to_transformers(qwen2vl_dir, tokens, logits, PROMPTS)


def test_qwen2_vl_alone_unchunked_and_the_prefix_cache_tells_images_apart(qwen2vl_dir):
    engine = _engine(qwen2vl_dir)
    prefix = [1, 33, 71, 5, 8, 9, 10, 11]
    reqs = {"wide": _prompt([prefix, WIDE, [12, 80]]), "square": _prompt([prefix, SQUARE, [12, 80]]),
            "wide_again": _prompt([prefix, WIDE, [12, 80]]), "text": PROMPTS["text"]}
    tokens, logits, cached = _run(engine, reqs, together=False)  # one at a time: the text-only one on plain rope
    assert not torch.equal(logits["wide"][0], logits["square"][0])  # the image reaches the model
    assert cached["square"] == len(prefix) + 1  # the text before the image (and <|vision_start|>) only
    _assert_equal_to_transformers(qwen2vl_dir, tokens, logits, {k: reqs[k] for k in ("wide", "square", "text")})
    assert cached["wide_again"] == len(reqs["wide"][0]) - 1  # the same image again: a cache hit, same answer
    assert tokens["wide_again"] == tokens["wide"]


def test_qwen25_vl_logits_equal_transformers_with_windows_and_chunks(qwen25vl_dir):
    engine = _engine(qwen25vl_dir, chunked_prefill_size=5, batch_max_tokens=10)
    big = draw_png(7, (200, 150))  # 7 × 5 merged tokens: several 2 × 2 windows, some cut by the edge
    prompts = {**PROMPTS, "big": _prompt([[1, 4], big, [9, 8, 7]])}
    tokens, logits, _ = _run(engine, prompts)
    _assert_equal_to_transformers(qwen25vl_dir, tokens, logits, prompts)


def test_released_checkpoints_flat_config_is_read():
    """Qwen2-VL-2B-Instruct's config.json keeps the text settings at the top level, M-RoPE in rope_scaling."""
    from lightllm.models.loading.hf import config_from_hf

    cfg = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_size": 1536,
           "intermediate_size": 8960, "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
           "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "sliding_window": 32768,
           "use_sliding_window": False, "tie_word_embeddings": True, "vocab_size": 151936, "hidden_act": "silu",
           "image_token_id": 151655, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
           "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16}}
    config = config_from_hf(cfg)
    assert (config.architecture, config.mrope_section, config.rope_scaling) == ("qwen2_vl", (16, 24, 24), None)
    assert config.rope_theta == 1e6 and config.tie_word_embeddings and config.attention_bias
    assert config.sliding_window is None and config.head_dim == 128


@pytest.mark.slow
def test_tp2_with_images_equals_transformers(qwen2vl_dir):
    """--tp 2 (gloo): rank 0 lays out the M-RoPE positions and encodes the images; the other rank gets both with
    the step's inputs."""
    from tests.conftest import free_port

    engine = _engine(qwen2vl_dir, tp=2, nccl_port=free_port(), chunked_prefill_size=7, batch_max_tokens=14)
    try:
        assert engine.model.config.num_heads == 2  # rank 0 holds half the heads
        tokens, logits, _ = _run(engine, PROMPTS)
    finally:
        engine.shutdown()
    _assert_equal_to_transformers(qwen2vl_dir, tokens, logits, PROMPTS)


def test_an_image_processor_that_does_not_fit_the_tower_is_refused_at_load(qwen2vl_dir, tmp_path):
    import json
    import shutil

    from lightllm.models.vision.qwen2_vl import load_qwen2_vl_vision

    for change, message in (({"patch_size": 16}, "patch_size / merge_size"), ({"do_resize": False}, "do_resize")):
        model_dir = tmp_path / next(iter(change))
        shutil.copytree(qwen2vl_dir, model_dir)
        settings = json.loads((model_dir / "preprocessor_config.json").read_text())
        (model_dir / "preprocessor_config.json").write_text(json.dumps({**settings, **change}))
        with pytest.raises(ValueError, match=message):
            load_qwen2_vl_vision(model_dir, torch.device("cpu"), torch.float32)


def test_drafted_decode_after_images_equals_plain_decode(qwen2vl_dir):
    """Prompt-lookup drafts verified after an image run at M-RoPE's shifted positions: the same greedy tokens."""
    # prompts whose greedy continuations repeat themselves (so drafts from the context get accepted)
    prompts = {"a": _prompt([[1, 11, 6, 7, 8], TALL, [11, 6, 7, 8, 11, 6, 7, 8]]),
               "b": _prompt([[1, 12, 6, 7, 8], WIDE, [12, 6, 7, 8, 12, 6, 7, 8]])}
    results = {}
    for spec in (0, 5):
        engine = Engine(EngineConfig(model_path=str(qwen2vl_dir), kv_cache_dtype="fp32", quant_type="none",
                                     spec_ngram_tokens=spec, spec_max_decodes=8, max_total_token_num=2048))
        for rid, (ids, images) in prompts.items():
            params = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)
            assert engine.add_request(AddRequest(rid, ids, params, _inputs(ids, images))) is None
        tokens: dict[str, list[int]] = {}
        drain(engine, tokens, {})
        results[spec] = tokens, dict(engine.scheduler.draft_stats)
    assert results[5][0] == results[0][0]
    assert results[5][1]["accepted"] > 0  # drafts were made and verified
