"""Images in chat end to end: a tiny random LLaVA (SmolLM2's tokenizer with an `<image>` token) behind a real
server, driven with the openai SDK; greedy tokens equal transformers' `generate`, plain and streamed; every bad
image input gets a 400 with the API's error object."""

from __future__ import annotations

import base64
import io
import json

import pytest
import requests
import torch

from tests.conftest import ServerProcess, embedded_model_path
from tests.vlm_models import (GREEDY, NEW_TOKENS, QUESTION, TOKENS_PER_IMAGE, build_tiny_llava,
                              check_chat_with_one_image, data_url, draw_png, openai_client)

MAX_PIXELS = 120 * 100


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    from lightllm.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("vlm")
    tokenizer = load_tokenizer(embedded_model_path())
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    model_dir = build_tiny_llava(root / "model", vocab_size=len(tokenizer), image_token_id=image_token,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(model_dir)
    media = root / "media"
    media.mkdir()
    server = ServerProcess(["--model_dir", str(model_dir), "--max_total_token_num", "4000", "--quant_type", "none",
                            "--kv_cache_dtype", "fp32", "--allowed_local_media_path", str(media),
                            "--max_image_pixels", str(MAX_PIXELS), "--limit_mm_per_prompt", "2"],
                           root / "server.log")
    yield server, model_dir, tokenizer, media
    server.stop()


def _expected(model_dir, tokenizer, messages: list[dict], pngs: list[bytes]) -> tuple[list[int], str]:
    """transformers' greedy tokens for the chat with the images in place, and their text."""
    from PIL import Image
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    image = tokenizer.convert_tokens_to_ids("<image>")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = []
    for t in tokenizer.encode(text, add_special_tokens=False):
        ids += [t] * TOKENS_PER_IMAGE if t == image else [t]
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    pixels = AutoImageProcessor.from_pretrained(model_dir)(
        images=[Image.open(io.BytesIO(p)).convert("RGB") for p in pngs], return_tensors="pt")["pixel_values"]
    out = model.generate(torch.tensor([ids]), pixel_values=pixels, max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False)
    new = out[0, len(ids):].tolist()
    return ids, tokenizer.decode(new, skip_special_tokens=True)


def test_chat_with_an_image_equals_transformers(vlm):
    server, model_dir, tokenizer, _ = vlm
    png = draw_png(3)
    ids, text = _expected(model_dir, tokenizer, [{"role": "user", "content": QUESTION + "<image>"}], [png])
    check_chat_with_one_image(server, png, ids, text)


def test_streamed_chat_with_two_images_equals_transformers(vlm):
    server, model_dir, tokenizer, media = vlm
    first, second = draw_png(4), draw_png(5, size=(100, 90))
    (media / "second.png").write_bytes(second)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(first)}},
        {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": f"file://{media / 'second.png'}"}},
        {"type": "text", "text": "differ how?"}]}]
    _, text = _expected(model_dir, tokenizer, [{"role": "user", "content": "<image>and<image>differ how?"}],
                        [first, second])
    stream = openai_client(server).chat.completions.create(model="m", messages=messages, stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    # the same image again shares the prefix cache (its tokens stand for its content)
    again = openai_client(server).chat.completions.create(model="m", messages=messages, **GREEDY)
    assert again.choices[0].message.content == text
    assert again.usage.prompt_tokens_details.cached_tokens > 2 * TOKENS_PER_IMAGE


def _refusal(server, content, status: int = 400) -> str:
    response = requests.post(server.base_url + "/v1/chat/completions", timeout=30,
                             json={"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": content}]})
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def _image(url: str, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def test_bad_images_are_refused_with_400(vlm, tmp_path):
    server, _, _, media = vlm
    png = draw_png(6)
    assert "does not fetch image URLs" in _refusal(server, [_image("https://example.com/cat.png")])
    assert "could not be decoded" in _refusal(server, [_image(data_url(png[: len(png) // 2]))])  # truncated
    assert "could not be decoded" in _refusal(server, [_image(data_url(b"not an image at all"))])
    assert "not valid base64" in _refusal(server, [_image("data:image/png;base64,%%%")])
    big = draw_png(7, size=(200, 100))
    assert f"--max_image_pixels {MAX_PIXELS}" in _refusal(server, [_image(data_url(big))])
    assert "--limit_mm_per_prompt 2" in _refusal(server, [_image(data_url(png))] * 3)
    outside = tmp_path / "outside.png"
    outside.write_bytes(png)
    assert "outside the directory" in _refusal(server, [_image(f"file://{outside}")])
    assert "outside the directory" in _refusal(server, [_image(f"file://{media}/../{outside.name}")])
    assert "cannot be read" in _refusal(server, [_image(f"file://{media / 'missing.png'}")])
    _refusal(server, [_image(data_url(png), detail="high")])  # a detail level the model cannot honour
    _refusal(server, [_image("ftp://host/cat.png")])
    marker_in_text = [{"type": "text", "text": "<image>"}, _image(data_url(png))]
    assert "2 image markers for 1 images" in _refusal(server, marker_in_text)
    tiff = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    assert "unsupported image format TIFF" in _refusal(server, [_image(data_url(tiff.getvalue()))])


def test_an_image_to_a_text_only_model_is_refused_naming_it(smol_server):
    response = requests.post(smol_server.base_url + "/v1/chat/completions", headers=smol_server.headers, timeout=30,
                             json={"model": "m", "messages": [{"role": "user", "content": [
                                 _image(data_url(draw_png(1))), {"type": "text", "text": "hi"}]}]})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "does not take images" in message and "SmolLM2" in message


def test_responses_and_anthropic_images_answer_as_chat_does(vlm):
    server, _, _, _ = vlm
    png = draw_png(8)
    b64 = base64.b64encode(png).decode()
    chat = openai_client(server).chat.completions.create(
        model="m", max_tokens=NEW_TOKENS, temperature=0, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png)}}, {"type": "text", "text": "Describe it."}]}])
    response = openai_client(server).responses.create(
        model="m", max_output_tokens=NEW_TOKENS, temperature=0, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": data_url(png), "detail": "auto"},
            {"type": "input_text", "text": "Describe it."}]}])
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    blocks = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}},
              {"type": "text", "text": "Describe it."}]
    body = {"model": "m", "max_tokens": NEW_TOKENS, "temperature": 0, "messages": [{"role": "user", "content": blocks}]}
    message = requests.post(server.base_url + "/v1/messages", json=body, timeout=60)
    assert message.status_code == 200, message.text
    assert "".join(b["text"] for b in message.json()["content"] if b["type"] == "text") == \
        chat.choices[0].message.content
    counted = requests.post(server.base_url + "/v1/messages/count_tokens", json=body, timeout=60).json()
    assert counted["input_tokens"] == chat.usage.prompt_tokens
    # the same refusals as chat, in each route's own error shape
    bad = requests.post(server.base_url + "/v1/responses", timeout=30, json={"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]})
    assert bad.status_code == 400 and "does not fetch" in bad.json()["error"]["message"]
    assert bad.json()["error"]["param"] == "input"
    body["messages"][0]["content"][0]["source"]["data"] = base64.b64encode(b"garbage").decode()
    bad = requests.post(server.base_url + "/v1/messages", json=body, timeout=30)
    assert bad.status_code == 400 and bad.json()["type"] == "error"
    assert "could not be decoded" in bad.json()["error"]["message"]


def test_native_generate_takes_multimodal_params_images(vlm):
    server, model_dir, tokenizer, _ = vlm
    png = draw_png(9)
    _, text = _expected(model_dir, tokenizer, [{"role": "user", "content": "<image>What is it?"}], [png])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "<image>What is it?"}], tokenize=False,
                                           add_generation_prompt=True)
    body = {"inputs": prompt, "parameters": {"do_sample": False, "max_new_tokens": NEW_TOKENS, "ignore_eos": True},
            "multimodal_params": {"images": [{"type": "base64", "data": base64.b64encode(png).decode()}]}}
    reply = requests.post(server.base_url + "/generate", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["generated_text"] == [text]
    stream = requests.post(server.base_url + "/generate_stream", json=body, timeout=60, stream=True)
    last = json.loads([line for line in stream.iter_lines() if line.startswith(b"data:")][-1][len(b"data:"):])
    assert last["finished"] and last["generated_text"] == text
    body["multimodal_params"]["images"] *= 2  # two images, one placeholder
    assert requests.post(server.base_url + "/generate", json=body, timeout=30).status_code == 400
    body["multimodal_params"]["images"] = [{"type": "url", "data": "https://x/y.png"}]
    assert requests.post(server.base_url + "/generate", json=body, timeout=30).status_code == 400


def test_images_across_a_conversation_equal_transformers(vlm):
    server, model_dir, tokenizer, _ = vlm
    first, second = draw_png(10), draw_png(11)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(first)}},
                                             {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "A picture."},
                {"role": "user", "content": [{"type": "text", "text": "And this one:"},
                                             {"type": "image_url", "image_url": {"url": data_url(second)}}]}]
    ids, text = _expected(model_dir, tokenizer, [{"role": "user", "content": "<image>What is this?"},
                                                 {"role": "assistant", "content": "A picture."},
                                                 {"role": "user", "content": "And this one:<image>"}], [first, second])
    reply = openai_client(server).chat.completions.create(model="m", messages=messages, **GREEDY)
    assert reply.choices[0].message.content == text and reply.usage.prompt_tokens == len(ids)
