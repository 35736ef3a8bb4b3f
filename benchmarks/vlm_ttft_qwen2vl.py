"""Time to first token for one 448x448 image and a short question on a random Qwen2-VL: our server (streamed chat
over HTTP, as benchmarks/vlm_ttft.py measures LLaVA) vs transformers' Qwen2VLForConditionalGeneration (image
processor + one-token generate) in-process, fp32 on CPU. The image processor keeps Qwen2-VL's defaults
(min_pixels 56², max_pixels 28² × 1280), so a 448x448 image is 32 × 32 patches, 256 image tokens.

    python benchmarks/vlm_ttft_qwen2vl.py --size tiny   # the tests' shape (2 blocks 32 wide, 2-layer LM 64 wide)
    python benchmarks/vlm_ttft_qwen2vl.py --size 2b     # Qwen2-VL-2B's tower (32 blocks, 1280 wide, 16 heads)
                                                        # with a SmolLM2-135M-shaped M-RoPE language model

Each image is new (another seed): no encoder-cache or prefix-cache hit; one warm-up request first; our
requests and transformers' alternate. Prints one JSON line with both sides' TTFT per request (seconds).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vlm_ttft import QUESTION, Server, image_content, png  # noqa: E402  (the LLaVA benchmark's server driver)

MARKER = "<|vision_start|><|image_pad|><|vision_end|>"
SIZES = {
    "tiny": dict(vision=dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2), mrope_section=[2, 3, 3]),
    "2b": dict(vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
               text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3), mrope_section=[8, 12, 12]),
}


def build(path: Path, size: str) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from lightllm.models.loading.catalog import smollm2_path
    from lightllm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_path()))
    tokenizer.add_tokens(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], special_tokens=True)
    start, end, pad, video = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                              "<|video_pad|>"])
    spec = SIZES[size]
    text = dict(vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, **spec["text"],
                rope_parameters={"rope_type": "default", "mrope_section": spec["mrope_section"], "rope_theta": 1e6})
    vision = dict(hidden_size=spec["text"]["hidden_size"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  **spec["vision"])
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=pad, video_token_id=video,
                           vision_start_token_id=start, vision_end_token_id=end)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    Qwen2VLImageProcessorPil().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Theirs:
    """transformers on the same checkpoint, in this process: the image processor and a one-token generate."""

    def __init__(self, model_dir: Path):
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

        self.model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.text = self.tokenizer.apply_chat_template([{"role": "user", "content": MARKER + QUESTION}],
                                                       tokenize=False, add_generation_prompt=True)

    def ttft(self, seed: int) -> float:
        from PIL import Image

        start = time.perf_counter()
        processed = self.processor(images=[Image.open(io.BytesIO(png(seed))).convert("RGB")], return_tensors="pt")
        tokens = int(processed["image_grid_thw"][0].prod()) // 4
        ids = []
        for t in self.tokenizer.encode(self.text, add_special_tokens=False):
            ids += [t] * tokens if t == self.pad else [t]
        ids_t = torch.tensor([ids])
        with torch.inference_mode():
            self.model.generate(ids_t, pixel_values=processed["pixel_values"],
                                image_grid_thw=processed["image_grid_thw"], mm_token_type_ids=(ids_t == self.pad).int(),
                                max_new_tokens=1, do_sample=False)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--requests", type=int, default=3)
    args = parser.parse_args()
    seeds = list(range(100, 101 + args.requests))  # the first is the warm-up
    ours_s, theirs_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build(Path(tmp) / "qwen2vl", args.size)
        server, theirs = Server(model_dir), Theirs(model_dir)
        try:
            for seed in seeds:  # alternating, so the shared box's load weighs on both sides alike
                start = time.perf_counter()
                server.stream(image_content(seed), max_tokens=1)
                ours_s.append(time.perf_counter() - start)
                theirs_s.append(theirs.ttft(seed))
        finally:
            server.stop()
    print(json.dumps({"size": args.size, "image": "448x448 PNG, 256 image tokens",
                      "ours_ttft_s": [round(t, 3) for t in ours_s[1:]],
                      "transformers_ttft_s": [round(t, 3) for t in theirs_s[1:]],
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
