"""Gemma 3 with images end to end: a tiny random Gemma3ForConditionalGeneration (SmolLM2's tokenizer with Gemma 3's
image tokens added) behind a real server, driven with the openai SDK and PNGs drawn with PIL; greedy tokens equal
transformers' `generate` on Gemma3Processor's layout (each `<start_of_image>` of the chat text expanded to
"\\n\\n<start_of_image>" + soft tokens + "<end_of_image>\\n\\n", token_type_ids marking the soft tokens), plain and
streamed."""

from __future__ import annotations

import io

import pytest
import requests
import torch

from tests.conftest import ServerProcess, embedded_model_path
from tests.test_vlm_gemma3 import TOKENS_PER_IMAGE, build_tiny_gemma3
from tests.vlm_models import GREEDY, NEW_TOKENS, QUESTION, check_chat_with_one_image, data_url, draw_png, openai_client

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
EXPANDED = f"\n\n{BOI}{SOFT * TOKENS_PER_IMAGE}{EOI}\n\n"  # Gemma3Processor.full_image_sequence


@pytest.fixture(scope="module")
def gemma3_server(tmp_path_factory):
    from lightllm.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("gemma3v_api")
    tokenizer = load_tokenizer(embedded_model_path())
    tokenizer.add_tokens([BOI, EOI, SOFT], special_tokens=True)
    boi, eoi, soft = tokenizer.convert_tokens_to_ids([BOI, EOI, SOFT])
    model_dir = build_tiny_gemma3(root / "model", vocab_size=len(tokenizer), boi=boi, eoi=eoi, image=soft,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(model_dir)
    # 8-token chunks: the prompt's text is cut before each image, whose run then goes in one chunk
    server = ServerProcess(["--model_dir", str(model_dir), "--max_total_token_num", "4000", "--quant_type", "none",
                            "--kv_cache_dtype", "fp32", "--chunked_prefill_size", "8"], root / "server.log")
    yield server, model_dir, tokenizer
    server.stop()


def _expected(model_dir, tokenizer, messages: list[dict], pngs: list[bytes]) -> tuple[list[int], str]:
    """transformers' greedy tokens for the chat as Gemma3Processor lays it out, and their text."""
    from PIL import Image
    from transformers import AutoImageProcessor, Gemma3ForConditionalGeneration

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text.replace(BOI, EXPANDED), add_special_tokens=False)
    inputs = torch.tensor([ids])
    model = Gemma3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    pixels = AutoImageProcessor.from_pretrained(model_dir)(
        images=[Image.open(io.BytesIO(p)).convert("RGB") for p in pngs], return_tensors="pt")["pixel_values"]
    token_types = (inputs == tokenizer.convert_tokens_to_ids(SOFT)).long()
    assert int(token_types.sum()) == TOKENS_PER_IMAGE * len(pngs)
    out = model.generate(inputs, pixel_values=pixels, token_type_ids=token_types, max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False)
    return ids, tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def test_chat_with_an_image_equals_transformers(gemma3_server):
    server, model_dir, tokenizer = gemma3_server
    png = draw_png(3)
    ids, text = _expected(model_dir, tokenizer, [{"role": "user", "content": QUESTION + BOI}], [png])
    check_chat_with_one_image(server, png, ids, text)
    info = requests.get(server.base_url + "/get_server_info", timeout=10).json()
    assert info["architecture"] == "gemma3_vl"


def test_streamed_chat_with_two_images_equals_transformers(gemma3_server):
    server, model_dir, tokenizer = gemma3_server
    first, second = draw_png(4), draw_png(5, size=(100, 90))
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(first)}},
        {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": data_url(second)}},
        {"type": "text", "text": "differ how?"}]}]
    ids, text = _expected(model_dir, tokenizer, [{"role": "user", "content": f"{BOI}and{BOI}differ how?"}],
                          [first, second])
    stream = openai_client(server).chat.completions.create(model="m", messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.prompt_tokens == len(ids)
    # the same images again: a prefix-cache hit through both images, the same answer
    again = openai_client(server).chat.completions.create(model="m", messages=messages, **GREEDY)
    assert again.choices[0].message.content == text
    assert again.usage.prompt_tokens_details.cached_tokens > 2 * TOKENS_PER_IMAGE
