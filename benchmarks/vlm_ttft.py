"""Time to first token for one 448x448 image and a short question: our server (streamed chat, openai SDK
shape over HTTP) vs transformers' LlavaForConditionalGeneration (image processor + one-token generate) on the
same random LLaVA checkpoint, fp32 on CPU.

    python benchmarks/vlm_ttft.py --size tiny      # the tests' checkpoint shape (56 px, 16 image tokens)
    python benchmarks/vlm_ttft.py --size clip-l    # LLaVA 1.5's tower: CLIP ViT-L/14 at 336 px (576 image
                                                   # tokens) with a SmolLM2-135M-shaped Llama

Each image is new (a different seed), so neither the encoder cache nor the prefix cache serves it; one
warm-up request first. Prints one JSON line with both sides' TTFT per request (seconds). The script starts
and stops the server it measures.

    python benchmarks/vlm_ttft.py --size clip-l --interference

instead streams one text-only chat (greedy, ignore_eos) and sends an image request while it runs: the text
stream's inter-token gaps before the image arrives and while it is encoded and prefilled, and the longest.
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
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

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


class Server:
    """Our server on the checkpoint, on loopback, stopped at the end."""

    def __init__(self, model_dir: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = open(model_dir / "server.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lightllm.server.api_server", "--model_dir",
                                      str(model_dir), "--port", str(port), "--max_total_token_num", "4096",
                                      "--quant_type", "none", "--spec_ngram_tokens", "0"],
                                     cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.5)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()

    def stream(self, content, max_tokens: int) -> list[float]:
        """Arrival times of the streamed tokens (the first chunk carries only the role)."""
        body = {"model": "m", "stream": True, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": content}]}
        times = []
        with requests.post(self.url + "/v1/chat/completions", json=body, stream=True, timeout=900) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith(b"data: {") and b'"content": ""' not in line and b'"content"' in line:
                    times.append(time.perf_counter())
        return times


def image_content(seed: int) -> list[dict]:
    image = "data:image/png;base64," + base64.b64encode(png(seed)).decode()
    return [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": QUESTION}]


def ours(model_dir: Path, seeds: list[int]) -> list[float]:
    server = Server(model_dir)
    try:
        times = []
        for seed in seeds:
            start = time.perf_counter()
            server.stream(image_content(seed), max_tokens=1)
            times.append(time.perf_counter() - start)
        return times
    finally:
        server.stop()


def interference(model_dir: Path) -> dict:
    """A text stream's token gaps before and while an image request is served."""
    import statistics
    import threading

    server = Server(model_dir)
    try:
        server.stream(image_content(1), max_tokens=1)  # warm-up
        text_times: list[float] = []
        thread = threading.Thread(target=lambda: text_times.extend(server.stream("Tell me a long story.", 1500)))
        thread.start()
        time.sleep(8)
        sent = time.perf_counter()
        image_ttft = server.stream(image_content(2), max_tokens=1)[0] - sent
        answered = time.perf_counter()
        thread.join()
    finally:
        server.stop()
    gaps = [(b, b - a) for a, b in zip(text_times, text_times[1:])]
    before = [g for t, g in gaps if t < sent]
    during = [g for t, g in gaps if sent <= t <= answered]
    return {"image_ttft_s": round(image_ttft, 2),
            "text_gap_ms_before": {"p50": round(1000 * statistics.median(before), 1), "n": len(before)},
            "text_gap_ms_during_image": {"p50": round(1000 * statistics.median(during), 1) if during else None,
                                         "max": round(1000 * max(during), 1) if during else None,
                                         "n": len(during)}}


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
    parser.add_argument("--interference", action="store_true", help="a text stream's gaps while an image is served")
    args = parser.parse_args()
    seeds = list(range(100, 101 + args.requests))  # the first is the warm-up
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build(Path(tmp) / "llava", args.size)
        if args.interference:
            print(json.dumps({"size": args.size, **interference(model_dir)}))
            return
        ours_s = ours(model_dir, seeds)[1:]
        theirs_s = theirs(model_dir, seeds)[1:]
    print(json.dumps({"size": args.size, "image": "448x448 PNG", "ours_ttft_s": [round(t, 3) for t in ours_s],
                      "transformers_ttft_s": [round(t, 3) for t in theirs_s],
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
