"""LLaVA through the engine: a tiny random checkpoint's logits equal transformers' in fp32 for prompts with one and
two images, alone and batched with each other and a text-only prompt, with chunked prefill cutting through the
images' tokens; the prefix cache tells images apart and the encoder cache encodes an image once."""

from __future__ import annotations

import io
import time

import pytest
import torch

from lightllm.engine.engine import Engine
from lightllm.engine.protocol import AddRequest, EngineConfig, ImageInput, SamplingParams
from tests.vlm_models import TOKENS_PER_IMAGE, build_tiny_llava, digest, draw_png, run_image_requests

IMAGE = 299
STEPS = 6


def _prompt(parts: list) -> tuple[list[int], list[bytes]]:
    """Token ids with an image's placeholder run wherever `parts` holds image bytes."""
    ids, images = [], []
    for part in parts:
        if isinstance(part, bytes):
            ids += [IMAGE] * TOKENS_PER_IMAGE
            images.append(part)
        else:
            ids += part
    return ids, images


def _inputs(ids: list[int], images: list[bytes]) -> list[ImageInput]:
    offsets = [i for i, t in enumerate(ids) if t == IMAGE and (i == 0 or ids[i - 1] != IMAGE)]
    return [ImageInput(data, digest(data), off, TOKENS_PER_IMAGE) for data, off in zip(images, offsets)]


def _reference(model_dir, ids: list[int], images: list[bytes]) -> tuple[list[int], list[torch.Tensor]]:
    from PIL import Image
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    pixels = {"pixel_values": AutoImageProcessor.from_pretrained(model_dir)(
        images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images], return_tensors="pt")["pixel_values"]
    } if images else {}
    out = model.generate(torch.tensor([ids]), **pixels, max_new_tokens=STEPS, min_new_tokens=STEPS,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), [step[0].float() for step in out.logits]


def _run(engine: Engine, requests: dict[str, tuple[list[int], list[bytes]]], together: bool = True):
    """Greedy-run the requests; returns (tokens, logits per step, cached tokens) by rid."""
    return run_image_requests(engine, requests, _inputs, STEPS, together)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava") / "model")


def _engine(model_dir, **kwargs) -> Engine:
    kwargs.setdefault("max_total_token_num", 2048)
    return Engine(EngineConfig(model_path=str(model_dir), kv_cache_dtype="fp32", quant_type="none",
                               spec_ngram_tokens=0, **kwargs))


RED, BLUE = draw_png(1), draw_png(2)
PROMPTS = {
    "one": _prompt([[1, 33, 71, 5], RED, [12, 80, 44]]),
    "two": _prompt([[1, 9], BLUE, [17, 23, 5], RED, [61, 3, 40, 7]]),
    "text": _prompt([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]),  # text-only, batched with the others
}


def test_logits_equal_transformers_with_chunked_prefill_through_images(llava_dir, model_path_kind):
    # 7-token chunks: every image's 16 tokens are cut across chunks; both requests in one batch
    engine = _engine(llava_dir, chunked_prefill_size=7, batch_max_tokens=14)
    layout = engine.ready_message().image_layout
    assert (layout.image_marker, layout.placeholder_id, layout.tokens_per_image) == ((IMAGE,), IMAGE, TOKENS_PER_IMAGE)
    tokens, logits, _ = _run(engine, PROMPTS)
    for rid, (ids, images) in PROMPTS.items():
        ref_tokens, ref_logits = _reference(llava_dir, ids, images)
        assert tokens[rid] == ref_tokens, rid
        for ours, theirs in zip(logits[rid], ref_logits, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_images_change_the_answer_and_the_prefix_cache_tells_them_apart(llava_dir):
    engine = _engine(llava_dir)
    prefix = [1, 33, 71, 5, 8, 9, 10, 11]
    reqs = {"red": _prompt([prefix, RED, [12, 80]]), "blue": _prompt([prefix, BLUE, [12, 80]]),
            "red_again": _prompt([prefix, RED, [12, 80]])}
    tokens, logits, cached = _run(engine, reqs, together=False)
    assert not torch.equal(logits["red"][0], logits["blue"][0])  # the image reaches the model
    assert cached["blue"] == len(prefix)  # the text before the image only: another image's KV is not reused
    torch.testing.assert_close(logits["blue"][0], _reference(llava_dir, *reqs["blue"])[1][0], atol=1e-4, rtol=0)
    # the same image again: its tokens come from the cache, and its encoder output too
    assert cached["red_again"] == len(reqs["red"][0]) - 1
    assert tokens["red_again"] == tokens["red"]
    assert engine.images.stats == {"encoded": 2, "cache_hits": engine.images.stats["cache_hits"]}


def test_engine_refuses_malformed_image_layouts(llava_dir, tmp_path):
    from tests.conftest import build_tiny_model

    from lightllm.engine.memory import tensor_bytes

    engine = _engine(llava_dir)
    # the start-up memory breakdown counts the vision tower's weights with the language model's
    tower = tensor_bytes(engine.images.encoder)
    assert tower > 0 and engine.memory.weights == tensor_bytes(engine.model.weights) + tower
    ids, images = PROMPTS["one"]
    params = SamplingParams(max_new_tokens=2)
    cases = {
        "placeholder tokens (299) that no image fills": AddRequest("a", ids, params),
        "16 placeholder tokens, not 3": AddRequest("b", ids, params, [ImageInput(RED, digest(RED), 4, 3)]),
        "must hold token 299 only": AddRequest("c", ids, params, [ImageInput(RED, digest(RED), 0, 16)]),
    }
    for message, request in cases.items():
        out = engine.add_request(request)
        assert out is not None and out.error.kind == "client" and message in out.error.message, (message, out)
    # the encoder runs on its thread as the request arrives: an image it cannot take fails that request alone
    assert engine.add_request(AddRequest("e", ids, params, [ImageInput(b"no image", "00", 4, 16)])) is None
    while engine.encoding:
        time.sleep(0.01)
        refused = engine.admit_encoded()
    assert [r.rid for r in refused] == ["e"] and "the image could not be processed" in refused[0].error.message
    assert refused[0].error.kind == "client" and not engine.scheduler.has_work()
    text_dir = build_tiny_model(tmp_path / "text", "llama", vocab_size=300)
    text_engine = _engine(text_dir)
    out = text_engine.add_request(AddRequest("d", ids, params, _inputs(ids, images)))
    assert out is not None and "does not take images" in out.error.message and "'text'" in out.error.message
    assert text_engine.ready_message().image_layout is None


def test_cache_keys_tell_images_apart_and_cost_nothing_without_images():
    from lightllm.engine.sequence import Sequence

    ids, images = PROMPTS["one"]
    red = Sequence("r", ids, SamplingParams(), images=_inputs(ids, images))
    blue = Sequence("b", ids, SamplingParams(), images=_inputs(ids, [BLUE]))
    text = Sequence("t", ids, SamplingParams())
    offset = ids.index(IMAGE)
    assert red.prompt_content[:offset] == blue.prompt_content[:offset] == ids[:offset]
    assert red.prompt_content[offset] != blue.prompt_content[offset] and red.prompt_content[offset] < 0
    assert red.prompt_content == red.cache_key(len(ids)) != ids
    assert text.prompt_content is text.prompt_ids  # no copy for a text-only prompt


def test_a_gguf_vision_projector_is_refused_saying_what_it_is(tmp_path):
    import gguf

    from lightllm.models.loading.loader import load_model_config

    path = tmp_path / "mmproj-model-f16.gguf"
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_tensor("v.patch_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="vision projector .*mmproj"):
        load_model_config(path)
