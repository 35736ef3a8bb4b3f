"""Tiny random LLaVA checkpoints built with transformers (no weights from a hub), and PNGs drawn with PIL."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

IMAGE_SIZE, PATCH = 56, 14  # 16 patches: 16 image tokens (the class token dropped)
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2


def build_tiny_llava(path: Path, vocab_size: int = 300, image_token_id: int = 299, **text_overrides) -> Path:
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    text = LlamaConfig(**{**dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2), **text_overrides})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(4321)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # norms start at ones / zeros: make them matter
                param.normal_(float(param.mean()), 0.3)
            elif name.endswith("class_embedding") or "position_embedding" in name or "projector" in name:
                param.normal_(0, 0.5)  # image embeddings of the text model's scale, so images change the answer
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(path)
    return path


def draw_png(seed: int, size: tuple[int, int] = (80, 64)) -> bytes:
    """A small PNG with shapes and colours that depend on `seed`."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, ((seed * 70) % 256, (seed * 130 + 40) % 256, (seed * 30 + 90) % 256))
    draw = ImageDraw.Draw(image)
    for i in range(4):
        x, y = (seed * 17 + i * 23) % size[0], (seed * 29 + i * 11) % size[1]
        draw.rectangle([x, y, x + 20, y + 14], fill=((i * 90 + seed * 40) % 256, (i * 50) % 256, 255 - i * 60))
    draw.ellipse([5, 5, 30 + seed % 20, 40], outline=(255, 255, 255), width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_image_requests(engine, requests: dict, image_inputs, steps: int, together: bool = True):
    """Greedy-run requests {rid: (prompt ids, image files)} through an Engine (`image_inputs(ids, images)` lays
    out their ImageInputs), together or one after another; returns (tokens, logits per step, cached tokens) by
    rid. The engine's sampler is restored afterwards."""
    from lightllm.engine.protocol import AddRequest, SamplingParams
    from tests.conftest import record_logits

    sampler = engine.runner.sampler
    logits = record_logits(engine)
    tokens: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    try:
        for rid, (ids, images) in requests.items():
            params = SamplingParams(max_new_tokens=steps, temperature=0.0, ignore_eos=True)
            refused = engine.add_request(AddRequest(rid, ids, params, image_inputs(ids, images)))
            assert refused is None, refused.error
            if not together:
                drain(engine, tokens, cached)
        drain(engine, tokens, cached)
    finally:
        engine.runner.sampler = sampler
    return tokens, logits, cached


def drain(engine, tokens: dict[str, list[int]], cached: dict[str, int]) -> None:
    """Step until every request is done, as the engine loop does: requests join once their images are encoded."""
    while engine.scheduler.has_work() or engine.encoding:
        assert engine.admit_encoded() == []
        for out in engine.step() if engine.scheduler.has_work() else []:
            tokens.setdefault(out.rid, []).append(out.token_id)
            cached[out.rid] = out.cached_tokens


def data_url(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode()


def openai_client(server):
    """The openai SDK on a test server (no key, no retries: a refusal shows at once)."""
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)


NEW_TOKENS = 8  # the image API tests' greedy replies
GREEDY = dict(max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True})
QUESTION = "What is in this picture?"


def check_chat_with_one_image(server, png: bytes, ids: list[int], text: str) -> None:
    """QUESTION and one image through the openai SDK's chat: the greedy reply is `text`, the prompt `ids`' length,
    and /tokenize counts the same chat alike."""
    import requests

    content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": data_url(png)}}]
    reply = openai_client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                                          **GREEDY)
    assert reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens == len(ids)
    counted = requests.post(server.base_url + "/tokenize", json={"messages": [{"role": "user", "content": content}]},
                            timeout=30).json()
    assert counted["count"] == len(ids)
