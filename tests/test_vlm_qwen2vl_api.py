"""Qwen2-VL images in chat end to end: a tiny random Qwen2-VL (SmolLM2's tokenizer with Qwen2-VL's vision
tokens added) behind a real server, driven with the openai SDK; images of different sizes take different
numbers of <|image_pad|> tokens (dynamic resolution); greedy tokens equal transformers' `generate`, plain and
streamed (decode after the images runs at M-RoPE's shifted positions); Qwen2.5-VL likewise (slow)."""

from __future__ import annotations

import io

import pytest
import torch

from tests.conftest import ServerProcess, embedded_model_path
from tests.test_vlm_qwen2vl import build_tiny_qwen2_vl
from tests.vlm_models import GREEDY, NEW_TOKENS, QUESTION, check_chat_with_one_image, data_url, draw_png, openai_client

MARKER = "<|vision_start|><|image_pad|><|vision_end|>"


def _serve(root, qwen25: bool = False):
    """A tiny random Qwen2-VL (or Qwen2.5-VL) with SmolLM2's tokenizer plus the vision tokens, served."""
    from lightllm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(embedded_model_path())
    tokenizer.add_tokens(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], special_tokens=True)
    start, end, pad, video = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                              "<|video_pad|>"])
    model_dir = build_tiny_qwen2_vl(root / "model", qwen25=qwen25, vocab_size=len(tokenizer), image_token_id=pad,
                                    vision_start_token_id=start, vision_end_token_id=end, video_token_id=video,
                                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(model_dir)
    server = ServerProcess(["--model_dir", str(model_dir), "--max_total_token_num", "4000", "--quant_type", "none",
                            "--kv_cache_dtype", "fp32", "--chunked_prefill_size", "16"], root / "server.log")
    return server, model_dir, tokenizer


@pytest.fixture(scope="module")
def qwen2vl_server(tmp_path_factory):
    served = _serve(tmp_path_factory.mktemp("qwen2vl_api"))
    yield served
    served[0].stop()


def _expected(model_dir, tokenizer, messages: list[dict], pngs: list[bytes]) -> tuple[list[int], str]:
    """transformers' greedy tokens for the chat with each image's pads expanded to its grid, and their text."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    processed = AutoImageProcessor.from_pretrained(model_dir)(
        images=[Image.open(io.BytesIO(p)).convert("RGB") for p in pngs], return_tensors="pt")
    counts = iter((processed["image_grid_thw"].prod(-1) // 4).tolist())
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = []
    for t in tokenizer.encode(text, add_special_tokens=False):
        ids += [t] * next(counts) if t == pad else [t]
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), pixel_values=processed["pixel_values"],
                         image_grid_thw=processed["image_grid_thw"],
                         mm_token_type_ids=(torch.tensor([ids]) == pad).int(),
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return ids, tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def test_chat_with_an_image_equals_transformers(qwen2vl_server):
    server, model_dir, tokenizer = qwen2vl_server
    png = draw_png(3, (120, 50))
    ids, text = _expected(model_dir, tokenizer, [{"role": "user", "content": QUESTION + MARKER}], [png])
    check_chat_with_one_image(server, png, ids, text)


def test_streamed_chat_with_two_images_of_different_sizes_equals_transformers(qwen2vl_server):
    _two_images_streamed(*qwen2vl_server)


@pytest.mark.slow
def test_qwen25_vl_streamed_chat_with_two_images_equals_transformers(tmp_path):
    served = _serve(tmp_path, qwen25=True)
    try:
        _two_images_streamed(*served)
    finally:
        served[0].stop()


def _two_images_streamed(server, model_dir, tokenizer) -> None:
    first, second = draw_png(4, (57, 113)), draw_png(5, (150, 100))
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(first)}},
        {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": data_url(second)}},
        {"type": "text", "text": "differ how?"}]}]
    ids, text = _expected(model_dir, tokenizer, [{"role": "user", "content": f"{MARKER}and{MARKER}differ how?"}],
                          [first, second])
    stream = openai_client(server).chat.completions.create(model="m", messages=messages, stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    again = openai_client(server).chat.completions.create(model="m", messages=messages, **GREEDY)
    assert again.choices[0].message.content == text  # from the prefix cache: the same positions, the same answer
    assert again.usage.prompt_tokens == len(ids)
    assert again.usage.prompt_tokens_details.cached_tokens > len(ids) // 2
