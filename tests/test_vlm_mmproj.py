"""A GGUF LLaVA: the language model GGUF plus llama.cpp's mmproj GGUF (`--mmproj`), written here from a tiny random
LLaVA built with transformers the way llama.cpp's converters write them. Its logits equal the safetensors LLaVA's
and transformers' (F32 files: within 1e-4), the F16 mmproj equals the tower rounded to F16, greedy chat through
HTTP equals transformers' generate, and every mismatch is a clear start error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lightllm.engine.engine import Engine
from lightllm.engine.protocol import EngineConfig
from tests.test_numerics import _GGUF_LAYER_NAMES
from tests.test_vlm_model import IMAGE, PROMPTS, _reference, _run
from tests.vlm_models import TOKENS_PER_IMAGE, build_tiny_llava, draw_png


def _hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _strip(name: str, *prefixes: str) -> str | None:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def write_lm_gguf(model_dir: Path, out: Path, tokens: list[str], token_types: list[int] | None = None,
                  tokenizer_fields: dict | None = None) -> Path:
    """The LLaVA's language model as an F32 llama-arch GGUF (q/k rows permuted as llama.cpp's converter does),
    with `tokens` as its vocabulary and `tokenizer_fields` (tokenizer.ggml.* values) for a real tokenizer."""
    import gguf

    cfg = json.loads((model_dir / "config.json").read_text())["text_config"]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny-llava")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(cfg.get("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    fields = tokenizer_fields or {}
    writer.add_tokenizer_model(fields.get("tokenizer.ggml.model", "gpt2"))
    writer.add_token_list(tokens)
    writer.add_token_types(token_types or [3 if t.startswith("<") else 1 for t in tokens])
    if "tokenizer.ggml.pre" in fields:
        writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    if "tokenizer.ggml.merges" in fields:
        writer.add_token_merges(fields["tokenizer.ggml.merges"])
    if "tokenizer.chat_template" in fields:
        writer.add_chat_template(fields["tokenizer.chat_template"])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for name, tensor in _hf_tensors(model_dir).items():
        short = _strip(name, "language_model.model.", "model.language_model.")
        array = tensor.float().numpy()
        if name in ("language_model.lm_head.weight", "lm_head.weight"):
            gname = "output.weight"
        elif short == "embed_tokens.weight":
            gname = "token_embd.weight"
        elif short == "norm.weight":
            gname = "output_norm.weight"
        elif short is not None:
            _, idx, rest = short.split(".", 2)
            gname = f"blk.{idx}.{_GGUF_LAYER_NAMES[rest]}"
            if rest == "self_attn.q_proj.weight":
                array = permute(array, n_head)
            elif rest == "self_attn.k_proj.weight":
                array = permute(array, n_kv)
        else:
            continue  # the vision tower and projector: the mmproj file's
        writer.add_tensor(gname, np.ascontiguousarray(array))
    _finish(writer)
    return out


def write_mmproj(model_dir: Path, out: Path, matrix_type: str = "F32", legacy_ffn_names: bool = True,
                 patch_f16: bool = True, extra: dict | None = None) -> Path:
    """The tower and projector as llama.cpp's convert_image_encoder_to_gguf.py writes a LLaVA's (--llava-projector):
    general.architecture "clip", layers up to the feature layer only, no post-layernorm, the feature layer made
    non-negative, `mm.0` / `mm.2` for the projector; the patch embedding F16 (as the converter always writes it)
    and the 2-D weights as `matrix_type` (F32, F16: the converter's two; a quantized type as llama.cpp's
    quantize tool stores them). `legacy_ffn_names`: its generic renaming, which calls fc1 ffn_down and fc2
    ffn_up. `extra`: more metadata (key → a list or a string)."""
    import gguf

    cfg = json.loads((model_dir / "config.json").read_text())
    vision = cfg["vision_config"]
    layers = vision["num_hidden_layers"]
    feature_layer = cfg["vision_feature_layer"] % (layers + 1)
    writer = gguf.GGUFWriter(str(out), "clip")
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    extra = dict(extra or {})
    writer.add_string("clip.projector_type", extra.pop("clip.projector_type", "mlp"))
    writer.add_uint32("clip.vision.image_size", vision["image_size"])
    writer.add_uint32("clip.vision.patch_size", vision["patch_size"])
    writer.add_uint32("clip.vision.embedding_length", vision["hidden_size"])
    writer.add_uint32("clip.vision.feed_forward_length", vision["intermediate_size"])
    writer.add_uint32("clip.vision.projection_dim", vision["projection_dim"])
    writer.add_uint32("clip.vision.attention.head_count", vision["num_attention_heads"])
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", vision["layer_norm_eps"])
    writer.add_uint32("clip.vision.block_count", feature_layer)
    writer.add_array("clip.vision.feature_layer", [feature_layer])
    writer.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    writer.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    writer.add_bool("clip.use_gelu", vision["hidden_act"] == "gelu")
    for key, value in extra.items():
        writer.add_array(key, value) if isinstance(value, list) else writer.add_string(key, value)
    fc1, fc2 = ("ffn_down", "ffn_up") if legacy_ffn_names else ("ffn_up", "ffn_down")
    renames = [("embeddings.class_embedding", "class_embd"), ("embeddings.patch_embedding", "patch_embd"),
               ("embeddings.position_embedding", "position_embd"), ("pre_layrnorm", "pre_ln"),
               ("encoder.layers.", "blk."), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
               ("self_attn.v_proj", "attn_v"), ("self_attn.out_proj", "attn_out"), ("layer_norm1", "ln1"),
               ("layer_norm2", "ln2"), ("mlp.fc1", fc1), ("mlp.fc2", fc2)]
    for name, tensor in _hf_tensors(model_dir).items():
        array = tensor.float().numpy()
        if (short := _strip(name, "multi_modal_projector.", "model.multi_modal_projector.")) is not None:
            gname = "mm." + short.replace("linear_1", "0").replace("linear_2", "2")
        elif (short := _strip(name, "vision_tower.vision_model.", "model.vision_tower.vision_model.",
                              "model.vision_tower.", "vision_tower.")) is not None:
            if short.startswith("post_layernorm") or (
                    (m := re.match(r"encoder\.layers\.(\d+)\.", short)) and int(m.group(1)) >= feature_layer):
                continue  # the converter drops these
            gname = "v." + short
            for theirs, ours in renames:
                gname = gname.replace(theirs, ours)
        else:
            continue
        if array.ndim == 4 and patch_f16:
            array = array.astype(np.float16)
        elif array.ndim == 2 and gname.endswith(".weight") and matrix_type != "F32":
            if matrix_type == "F16":
                array = array.astype(np.float16)
            else:
                qtype = gguf.GGMLQuantizationType[matrix_type]
                writer.add_tensor(gname, gguf.quants.quantize(np.ascontiguousarray(array), qtype), raw_dtype=qtype)
                continue
        writer.add_tensor(gname, np.ascontiguousarray(array))
    _finish(writer)
    return out


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _vocab(size: int, image_token: int) -> list[str]:
    return [IMAGE_TOKEN_TEXT if i == image_token else f"t{i}" for i in range(size)]


IMAGE_TOKEN_TEXT = "<image>"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(safetensors dir, language model GGUF, F32 mmproj GGUF)."""
    root = tmp_path_factory.mktemp("mmproj")
    model_dir = build_tiny_llava(root / "model")
    lm = write_lm_gguf(model_dir, root / "tiny-llava.gguf", _vocab(300, IMAGE))
    # F32 throughout (the converter's --use-f32 keeps the patch embedding F16: F32 here too, for exact logits)
    return model_dir, lm, write_mmproj(model_dir, root / "mmproj-tiny-f32.gguf", patch_f16=False)


def _engine(model_path, **kwargs) -> Engine:
    kwargs.setdefault("max_total_token_num", 2048)
    return Engine(EngineConfig(model_path=str(model_path), kv_cache_dtype="fp32", quant_type="none",
                               spec_ngram_tokens=0, **kwargs))


def test_gguf_pair_logits_equal_safetensors_and_transformers_through_chunked_images(llava):
    model_dir, lm, mmproj = llava
    engine = _engine(lm, mmproj=str(mmproj), chunked_prefill_size=7, batch_max_tokens=14)
    # (the engine refuses a prompt whose placeholder token or run length is not the model's: the image token
    # comes from the GGUF's vocabulary, the run from the mmproj's sizes)
    assert engine.images.encoder.encode(draw_png(1)).shape == (TOKENS_PER_IMAGE, 64)
    tokens, logits, _ = _run(engine, PROMPTS)
    st_tokens, st_logits, _ = _run(_engine(model_dir, chunked_prefill_size=7, batch_max_tokens=14), PROMPTS)
    for rid, (ids, images) in PROMPTS.items():
        ref_tokens, ref_logits = _reference(model_dir, ids, images)
        assert tokens[rid] == st_tokens[rid] == ref_tokens, rid
        for ours, safetensors, theirs in zip(logits[rid], st_logits[rid], ref_logits, strict=True):
            torch.testing.assert_close(ours, safetensors, atol=1e-4, rtol=0)
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def _stored(value: torch.Tensor, matrix_type: str) -> torch.Tensor:
    """A 2-D weight as the file holds it, decoded."""
    import gguf

    if matrix_type == "F16":
        return value.half().float()
    qtype = gguf.GGMLQuantizationType[matrix_type]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(value.numpy(), qtype), qtype)).float()


@pytest.mark.parametrize("matrix_type, legacy_ffn_names", [("F16", True), ("F16", False), ("Q8_0", True)])
def test_f16_and_quantized_mmproj_equal_the_tower_rounded_alike(llava, tmp_path, matrix_type, legacy_ffn_names):
    """The converter's default F16 file (2-D weights and the patch embedding in F16), under either name of the
    MLP's linears, encodes an image as the safetensors tower does with those weights rounded to F16; a Q8_0
    file as the tower with its weights through Q8_0 (the reader decodes every type it knows)."""
    from lightllm.models.loading.loader import load_model_config
    from lightllm.models.vision.llava import load_llava_vision
    from lightllm.models.vision.mmproj import load_mmproj_vision

    model_dir, lm, _ = llava
    mmproj = write_mmproj(model_dir, tmp_path / "mmproj.gguf", matrix_type, legacy_ffn_names=legacy_ffn_names)
    ours = load_mmproj_vision(mmproj, lm, load_model_config(lm), torch.device("cpu"), torch.float32)
    reference = load_llava_vision(model_dir, torch.device("cpu"), torch.float32)
    for tensors in (reference.clip.t, reference.projector):
        for name, value in tensors.items():
            if value.dim() == 4:
                tensors[name] = value.half().float()
            elif value.dim() == 2 and name.endswith("weight"):
                tensors[name] = _stored(value, matrix_type)
    assert set(ours.clip.t) < set(reference.clip.t)  # the layers above the feature layer are not in the file
    for seed, size in ((3, (80, 64)), (4, (56, 56)), (5, (40, 90))):
        png = draw_png(seed, size)
        torch.testing.assert_close(ours.encode(png), reference.encode(png), atol=1e-5, rtol=0)


def test_a_gguf_llava_without_mmproj_is_refused_saying_it_needs_one(llava):
    _, lm, _ = llava
    with pytest.raises(ValueError, match=r"LLaVA's language model .*<image>.*--mmproj FILE"):
        _engine(lm)


def test_mmproj_start_errors(llava, tmp_path):
    from tests.conftest import build_tiny_model

    model_dir, lm, mmproj = llava
    text_dir = build_tiny_model(tmp_path / "text", "llama", vocab_size=300)
    text_gguf = write_lm_gguf(model_dir, tmp_path / "no-image-token.gguf", [f"t{i}" for i in range(300)])
    other = build_tiny_llava(tmp_path / "wide", hidden_size=96, intermediate_size=128)
    other_lm = write_lm_gguf(other, tmp_path / "wide.gguf", _vocab(300, IMAGE))
    cases = [
        (text_gguf, mmproj, r"vocabulary has no <image> token"),  # a text-only GGUF
        (text_dir, mmproj, r"goes with a GGUF language model"),
        (model_dir, mmproj, r"goes with a GGUF language model"),  # the HF LLaVA holds its own tower
        (other_lm, mmproj, r"does not match the language model: its projector gives 64-wide embeddings, the "
                           r"model's hidden size is 96"),
        (lm, lm, r"not a vision projector .*'llama'"),
        (lm, write_mmproj(model_dir, tmp_path / "next.gguf", extra={"clip.vision.image_grid_pinpoints": [56, 112]}),
         r"LLaVA-NeXT projector .* not supported"),
        (lm, write_mmproj(model_dir, tmp_path / "ldp.gguf", extra={"clip.projector_type": "ldp"}),
         r"projector type 'ldp' is not supported"),
        (lm, tmp_path / "absent.gguf", r"no such file"),
    ]
    for model_path, projector, message in cases:
        with pytest.raises(ValueError, match=message):
            _engine(model_path, mmproj=str(projector))


def test_an_mmproj_given_as_the_model_points_to_the_flag(llava):
    from lightllm.models.loading.loader import load_model_config

    with pytest.raises(ValueError, match="vision projector .*--mmproj"):
        load_model_config(llava[2])
    with pytest.raises(ValueError, match="several .gguf files.*mmproj file, goes with --mmproj"):
        load_model_config(llava[1].parent)  # the directory holding both files


@pytest.fixture(scope="module")
def gguf_server(tmp_path_factory):
    """A GGUF LLaVA behind a real server: SmolLM2's GGUF vocabulary with an added `<image>` token (and its chat
    template) in the language model GGUF, the tower and projector in the mmproj."""
    from lightllm.models.loading.gguf_file import GgufFile
    from lightllm.tokenizer import load_tokenizer
    from tests.conftest import ServerProcess, embedded_model_path

    root = tmp_path_factory.mktemp("gguf_vlm")
    smol = GgufFile(embedded_model_path()).fields
    fields = {k: f.contents() for k, f in smol.items() if k.startswith("tokenizer.")}
    tokens = fields["tokenizer.ggml.tokens"] + [IMAGE_TOKEN_TEXT]
    model_dir = build_tiny_llava(root / "model", vocab_size=len(tokens), image_token_id=len(tokens) - 1,
                                 bos_token_id=fields["tokenizer.ggml.bos_token_id"],
                                 eos_token_id=fields["tokenizer.ggml.eos_token_id"])
    lm = write_lm_gguf(model_dir, root / "tiny-llava.gguf", tokens, fields["tokenizer.ggml.token_type"] + [3], fields)
    mmproj = write_mmproj(model_dir, root / "mmproj.gguf", patch_f16=False)
    tokenizer = load_tokenizer(lm)  # the server's own: the GGUF vocabulary converted
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN_TEXT) == len(tokens) - 1
    server = ServerProcess(["--model_dir", str(lm), "--mmproj", str(mmproj), "--max_total_token_num", "4000",
                            "--quant_type", "none", "--kv_cache_dtype", "fp32"], root / "server.log")
    yield server, model_dir, tokenizer
    server.stop()


@pytest.mark.slow
def test_chat_with_images_through_http_equals_transformers(gguf_server):
    from tests.test_vlm_api import _expected
    from tests.vlm_models import GREEDY, QUESTION, check_chat_with_one_image, data_url, openai_client as _client

    server, model_dir, tokenizer = gguf_server
    png = draw_png(3)
    ids, text = _expected(model_dir, tokenizer, [{"role": "user", "content": QUESTION + "<image>"}], [png])
    assert text
    check_chat_with_one_image(server, png, ids, text)
    first, second = draw_png(4), draw_png(5, size=(100, 90))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(first)}},
                                             {"type": "text", "text": "and"},
                                             {"type": "image_url", "image_url": {"url": data_url(second)}},
                                             {"type": "text", "text": "differ how?"}]}]
    _, text = _expected(model_dir, tokenizer, [{"role": "user", "content": "<image>and<image>differ how?"}],
                        [first, second])
    stream = _client(server).chat.completions.create(model="m", messages=messages, stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


@pytest.mark.slow
def test_the_server_says_at_start_that_a_gguf_llava_needs_its_mmproj(llava):
    import subprocess
    import sys

    from tests.conftest import REPO, free_port

    out = subprocess.run([sys.executable, "-m", "lightllm.server.api_server", "--model_dir", str(llava[1]),
                          "--port", str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode != 0
    assert "is a LLaVA's language model" in out.stdout + out.stderr and "--mmproj FILE" in out.stdout + out.stderr
