"""Time to first token for one 448x448 image and a short question: our server (streamed chat, openai SDK
shape over HTTP) vs transformers' LlavaForConditionalGeneration (image processor + one-token generate) on the
same random LLaVA checkpoint, fp32 on CPU.

    python benchmarks/vlm_ttft.py --size tiny      # the tests' checkpoint shape (56 px, 16 image tokens)
    python benchmarks/vlm_ttft.py --size clip-l    # LLaVA 1.5's tower: CLIP ViT-L/14 at 336 px (576 image
                                                   # tokens) with a SmolLM2-135M-shaped Llama

Each image is new (a different seed), so neither the encoder cache nor the prefix cache serves it; one
warm-up request first. Prints one JSON line with both sides' TTFT per request (seconds). The script starts
and stops the server it measures.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.vlm_models import draw_png  # noqa: E402  (the tests' PNG drawing)

SIZES = {
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             image_size=56, patch_size=14),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2)),
    "clip-l": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=336, patch_size=14),
                   text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3)),
}
QUESTION = "What is in this picture?"


def build(path: Path, size: str) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from lightllm.tokenizer import load_tokenizer
    from lightllm.models.loading.catalog import smollm2_path

    tokenizer = load_tokenizer(str(smollm2_path()))
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    spec = SIZES[size]
    config = LlavaConfig(vision_config=CLIPVisionConfig(**spec["vision"]),
                         text_config=LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048,
                                                 bos_token_id=tokenizer.bos_token_id,
                                                 eos_token_id=tokenizer.eos_token_id, **spec["text"]),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    edge = spec["vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": edge}, crop_size={"height": edge, "width": edge}).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def png(seed: int) -> bytes:
    return draw_png(seed, size=(448, 448))


def ours(model_dir: Path, seeds: list[int]) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(model_dir / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lightllm.server.api_server", "--model_dir", str(model_dir),
                             "--port", str(port), "--max_total_token_num", "4096", "--quant_type", "none"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        times = []
        for seed in seeds:
            image = "data:image/png;base64," + base64.b64encode(png(seed)).decode()
            body = {"model": "m", "stream": True, "max_tokens": 2, "temperature": 0,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                              {"type": "text", "text": QUESTION}]}]}
            start = time.perf_counter()
            with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    # the first chunk carries only the role; the first token's chunk has content
                    if line.startswith(b"data: {") and b'"content": ""' not in line and b'"content"' in line:
                        break
            times.append(time.perf_counter() - start)
        return times
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


def theirs(model_dir: Path, seeds: list[int]) -> list[float]:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    tokens = model.config.vision_config.image_size // model.config.vision_config.patch_size
    text = tokenizer.apply_chat_template([{"role": "user", "content": "<image>" + QUESTION}], tokenize=False,
                                         add_generation_prompt=True)
    times = []
    for seed in seeds:
        start = time.perf_counter()
        ids = []
        for t in tokenizer.encode(text, add_special_tokens=False):
            ids += [t] * tokens ** 2 if t == image_token else [t]
        pixels = processor(images=[Image.open(io.BytesIO(png(seed))).convert("RGB")],
                           return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            model.generate(torch.tensor([ids]), pixel_values=pixels, max_new_tokens=1, do_sample=False)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--requests", type=int, default=3)
    args = parser.parse_args()
    seeds = list(range(100, 101 + args.requests))  # the first is the warm-up
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build(Path(tmp) / "llava", args.size)
        ours_s = ours(model_dir, seeds)[1:]
        theirs_s = theirs(model_dir, seeds)[1:]
    print(json.dumps({"size": args.size, "image": "448x448 PNG", "ours_ttft_s": [round(t, 3) for t in ours_s],
                      "transformers_ttft_s": [round(t, 3) for t in theirs_s], "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
