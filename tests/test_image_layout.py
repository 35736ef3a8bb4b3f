"""Image layouts (models/vision/layout.py) and their expansion in the API process (server/multimodal.py):
dynamic resolution counts tokens as transformers' Qwen2-VL processor resizes, and each image marker of the chat
text becomes its family's text around a placeholder run, expanded before tokenizing as transformers'
processors do, with the runs found where the tokenizer put them."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from lightllm.models.vision.layout import ImageLayout, ResizeGrid
from lightllm.server.errors import APIError
from lightllm.server.multimodal import RequestImage, encode_with_images
from tests.conftest import embedded_model_path


def test_resize_grid_matches_transformers_smart_resize():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    grid = ResizeGrid(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    rng = random.Random(7)
    sizes = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(3000)] + [(10, 1000), (27, 27), (28, 28)]
    for width, height in sizes:
        if max(width, height) / min(width, height) > 200:
            with pytest.raises(ValueError):
                grid.tokens_for(width, height)
            continue
        h, w = smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
        assert grid.resized(width, height) == (w, h), (width, height)
        assert grid.tokens_for(width, height) == (h // 28) * (w // 28)


def test_a_layout_is_fixed_or_dynamic():
    with pytest.raises(ValueError):
        ImageLayout(image_marker=(5,), placeholder_id=5)
    with pytest.raises(ValueError):
        ImageLayout(image_marker=(5,), placeholder_id=5, tokens_per_image=4, grid=ResizeGrid(14, 2, 1, 10**6))


@pytest.fixture(scope="module")
def tokenizer():
    from lightllm.tokenizer import load_tokenizer

    tok = load_tokenizer(embedded_model_path())
    tok.add_tokens(["<start_of_image>", "<end_of_image>", "<image_soft_token>"], special_tokens=True)
    return tok


def _state(tokenizer, layout: ImageLayout | None):
    return SimpleNamespace(engine=SimpleNamespace(info=SimpleNamespace(image_layout=layout)), tokenizer=tokenizer,
                           model_name="tiny-vlm")


def _image(width: int, height: int, tag: str) -> RequestImage:
    return RequestImage(tag.encode(), tag, width, height)


def test_markers_expand_as_text_before_tokenizing(tokenizer):
    boi, eoi, soft = (tokenizer.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<end_of_image>",
                                                                     "<image_soft_token>"))
    # Gemma 3's processor: the marker becomes "\n\n<start_of_image>" + soft tokens + "<end_of_image>\n\n"
    layout = ImageLayout(image_marker=(boi,), placeholder_id=soft, before=("\n\n", boi), after=(eoi, "\n\n"),
                         tokens_per_image=3)
    text = "user\n<start_of_image>What is it?<start_of_image>\nAnd this"
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    ids, inputs = encode_with_images(_state(tokenizer, layout), text, [_image(8, 8, "a"), _image(9, 9, "b")],
                                     encode, "messages")
    expanded = text.replace("<start_of_image>", "\n\n<start_of_image>" + "<image_soft_token>" * 3 +
                            "<end_of_image>\n\n")
    assert ids == encode(expanded)  # "\n" + "\n\n" tokenize together, as in transformers' processor
    assert [(i.digest, i.length) for i in inputs] == [("a", 3), ("b", 3)]
    for image in inputs:
        assert ids[image.offset - 1] == boi and ids[image.offset + 3] == eoi
        assert ids[image.offset:image.offset + 3] == [soft] * 3


def test_dynamic_runs_follow_each_image_size(tokenizer):
    pad = tokenizer.convert_tokens_to_ids("<image_soft_token>")
    layout = ImageLayout(image_marker=(pad,), placeholder_id=pad, grid=ResizeGrid(14, 2, 56 * 56, 28 * 28 * 64))
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    # adjacent images: their runs touch and are told apart by each image's count
    ids, inputs = encode_with_images(_state(tokenizer, layout), "a<image_soft_token><image_soft_token>b",
                                     [_image(56, 56, "s"), _image(112, 84, "l")], encode, "messages")
    assert [(i.offset, i.length) for i in inputs] == [(1, 4), (5, 12)]
    assert ids.count(pad) == 16
    with pytest.raises(APIError, match="too elongated"):
        encode_with_images(_state(tokenizer, layout), "<image_soft_token>", [_image(3000, 10, "x")], encode, "m")


def test_text_holding_markers_or_placeholders_is_refused(tokenizer):
    boi, soft = (tokenizer.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<image_soft_token>"))
    layout = ImageLayout(image_marker=(boi,), placeholder_id=soft, tokens_per_image=2)
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    state = _state(tokenizer, layout)
    with pytest.raises(APIError, match="2 image markers for 1 images"):
        encode_with_images(state, "<start_of_image><start_of_image>", [_image(5, 5, "a")], encode, "messages")
    with pytest.raises(APIError, match="placeholder token"):
        encode_with_images(state, "<image_soft_token><start_of_image>", [_image(5, 5, "a")], encode, "messages")
    with pytest.raises(APIError, match="does not take images") as refused:
        encode_with_images(_state(tokenizer, None), "<start_of_image>", [_image(5, 5, "a")], encode, "messages")
    assert refused.value.status == 400
