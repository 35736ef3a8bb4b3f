#!/usr/bin/env python3
"""Greedy-decoding agreement of serving engines with transformers on one GGUF file.

The reference is transformers loading the same GGUF (dequantized to float32) and decoding greedily
(`generate(do_sample=False)`, EOS not stopping it). Ten fixed, varied plain-text prompts (base-model style;
`--wide`: thirty),
tokenized once by the GGUF's own tokenizer (through transformers, with BOS when the file asks for it), go as
the same token ids to every engine given:

  --lightllm URL       lightllm's native POST /generate (token-id `inputs`, `return_details` for the ids)
  --llama-server URL   llama.cpp's POST /completion (token-id `prompt`, `return_tokens` for the ids)

Each may be given several times, or not at all (then only the reference runs). Per engine it reports the
generated tokens equal to the reference position by position (out of prompts x max-new-tokens), the mean
length of the agreeing prefix before the first divergence, and the prompts whose continuation is identical.
At each first divergence it also records the reference's top-1 minus top-2 logit margin there: a small
margin means a near-tie that quantized kernels may fairly break either way.

  python benchmarks/gguf_agreement.py --gguf gemma-3-270m --llama-server http://127.0.0.1:8091 \
      --lightllm http://127.0.0.1:8088 --out benchmarks/results/gemma3-agreement.json

A lightllm server started with `--quant_type none --kv_cache_dtype fp32` (dense fp32 weights dequantized from
the GGUF) should match the reference exactly; its default GGUF path (int4/int8 kernels), like llama.cpp's
quantized dot products, diverges at near-ties.

--gguf takes a path or a catalog name (lightllm.models.catalog). The reference (2-3 minutes on 2 cores) is
cached in --reference-cache (default: next to --out, else under /tmp) and reused while the file, prompts and
token count are unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import requests

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a dark forest, there lived",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which plants",
    "Ingredients:\n- 2 cups flour\n- 1 cup sugar\n",
    "Q: What is 12 times 7?\nA:",
    "La tour Eiffel est située à Paris. Elle a été construite",
    "{\"name\": \"Alice\", \"age\": 30, \"city\":",
    "The three laws of thermodynamics can be summarized as follows. First,",
    "In 1969, Neil Armstrong became the first person to",
]
# --wide adds these (30 prompts in all): one greedy flip at a near-tie costs the rest of its prompt, so 10
# prompts decide agreement by a few flips; 30 give a steadier comparison.
MORE_PROMPTS = [
    "The mitochondria is often called the powerhouse of the cell because",
    "import numpy as np\n\ndef normalize(v):\n",
    "Dear Sir or Madam,\n\nI am writing to",
    "The main causes of the French Revolution were",
    "SELECT name, COUNT(*) FROM orders",
    "Water boils at 100 degrees Celsius at sea level, but at higher altitudes",
    "Step 1: Preheat the oven to 180 degrees.\nStep 2:",
    "The quick brown fox jumps over the lazy dog. This sentence is famous because",
    "Der Rhein ist einer der längsten Flüsse Europas. Er entspringt",
    "A binary search tree is a data structure in which",
    "Q: Who wrote Romeo and Juliet?\nA:",
    "<html>\n<head>\n<title>",
    "The theory of evolution by natural selection states that",
    "In the year 2050, cities will",
    "for i in range(10):\n    if i % 2 == 0:\n",
    "The stock market fell sharply on Monday after",
    "Mount Everest, the highest mountain on Earth, is located",
    "To make a cup of tea, first",
    "The Pythagorean theorem states that in a right triangle",
    "User: Can you recommend a good book?\nAssistant:",
]
EOG_NAMES = ("<eos>", "<end_of_turn>", "</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")


def resolve_gguf(spec: str) -> Path:
    if os.path.exists(spec):
        return Path(spec)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from lightllm.models.loading.catalog import resolve_model

    return Path(resolve_model(spec))


def file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"


def gguf_add_bos(path: Path) -> bool:
    """The file's tokenizer.ggml.add_bos_token (llama.cpp's default when absent: true for SPM vocabularies)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    if "tokenizer.ggml.add_bos_token" in fields:
        return bool(fields["tokenizer.ggml.add_bos_token"].contents())
    return fields["tokenizer.ggml.model"].contents() == "llama" if "tokenizer.ggml.model" in fields else False


def reference(gguf: Path, prompts: list[str], max_new: int, threads: int | None) -> dict:
    """Prompt ids and greedy continuations from transformers, with timings and per-step logit margins."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    t_model = time.perf_counter() - t0
    # EOS must not stop the reference (engines get ignore_eos): a None in gen_cfg would be filled from here.
    model.generation_config.eos_token_id = None
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new, min_new_tokens=0, eos_token_id=None,
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
                               bos_token_id=tok.bos_token_id, output_logits=True, return_dict_in_generate=True)
    eog_ids = sorted({i for i in (tok.convert_tokens_to_ids(n) for n in EOG_NAMES)
                      if isinstance(i, int) and i != tok.unk_token_id} | ({tok.eos_token_id} - {None}))
    wants_bos = gguf_add_bos(gguf)
    rows = []
    t_gen_total = 0.0
    for prompt in prompts:
        ids = tok(prompt, add_special_tokens=True).input_ids
        if wants_bos and ids[0] != tok.bos_token_id:
            raise RuntimeError(f"the GGUF asks for BOS but the tokenizer added none to {prompt!r}: {ids[:4]}")
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), generation_config=gen_cfg)
        dt = time.perf_counter() - t0
        t_gen_total += dt
        gen = out.sequences[0, len(ids):].tolist()
        margins = []
        for step_logits in out.logits:
            top2 = torch.topk(step_logits[0].float(), 2).values
            margins.append(round(float(top2[0] - top2[1]), 4))
        rows.append({"prompt": prompt, "prompt_ids": ids, "tokens": gen, "margins": margins,
                     "text": tok.decode(gen), "seconds": round(dt, 2),
                     "eog_emitted": [i for i, t in enumerate(gen) if t in eog_ids]})
        print(f"  reference {len(rows)}/{len(prompts)}: {len(gen)} tokens in {dt:.1f}s", file=sys.stderr)
    return {"engine": "transformers", "version": __import__("transformers").__version__,
            "torch": torch.__version__, "bos_token_id": tok.bos_token_id, "add_bos": wants_bos, "eog_ids": eog_ids,
            "load_seconds": {"tokenizer": round(t_tok, 1), "model": round(t_model, 1)},
            "generate_seconds": round(t_gen_total, 1), "rows": rows}


def ask_lightllm(url: str, ids: list[int], max_new: int, timeout: float) -> tuple[list[int], dict]:
    body = {"inputs": ids, "parameters": {"do_sample": False, "max_new_tokens": max_new, "ignore_eos": True,
                                          "return_details": True}}
    r = requests.post(url.rstrip("/") + "/generate", json=body, timeout=timeout)
    r.raise_for_status()
    data = r.json()
    if "tokens" not in data:
        raise RuntimeError(f"lightllm /generate answered without `tokens` (return_details): keys {sorted(data)}")
    tokens = [t["id"] for t in data["tokens"][0]]
    notes = {}
    if data.get("prompt_tokens") not in (None, len(ids)):
        notes["prompt_tokens"] = data["prompt_tokens"]
    return tokens, notes


def ask_llama_server(url: str, ids: list[int], max_new: int, timeout: float) -> tuple[list[int], dict]:
    # A token-id prompt gets no BOS added (the ids already carry it). temperature 0: greedy. cache_prompt off so
    # every prompt is evaluated afresh; ignore_eos bans end-of-generation tokens rather than just not stopping.
    body = {"prompt": ids, "n_predict": max_new, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
            "return_tokens": True, "cache_prompt": False, "repeat_penalty": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "n_probs": 0, "stream": False}
    r = requests.post(url.rstrip("/") + "/completion", json=body, timeout=timeout)
    r.raise_for_status()
    data = r.json()
    tokens = data.get("tokens")
    if not tokens and data.get("content"):
        raise RuntimeError("llama-server answered without `tokens` (is return_tokens supported by this build?)")
    notes = {}
    if data.get("tokens_evaluated") not in (None, len(ids)):
        notes["tokens_evaluated"] = data["tokens_evaluated"]
    return list(tokens or []), notes


ASKERS = {"lightllm": ask_lightllm, "llama-server": ask_llama_server}


def compare(ref: dict, engine: str, url: str, max_new: int, timeout: float) -> dict:
    ask = ASKERS[engine]
    rows, t_total = [], 0.0
    for i, r in enumerate(ref["rows"]):
        t0 = time.perf_counter()
        try:
            got, notes = ask(url, r["prompt_ids"], max_new, timeout)
        except (requests.RequestException, RuntimeError, ValueError, KeyError) as exc:
            return {"engine": engine, "url": url, "error": f"prompt {i}: {exc}"}
        dt = time.perf_counter() - t0
        t_total += dt
        want = r["tokens"]
        same = sum(1 for a, b in zip(got, want) if a == b)
        prefix = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        row = {"prompt": i, "tokens": got, "matching": same, "agreeing_prefix": prefix,
               "identical": got == want, "seconds": round(dt, 2)}
        if prefix < len(want):
            row["ref_margin_at_divergence"] = r["margins"][prefix]
        if len(got) != len(want):
            notes["length"] = len(got)
        if notes:
            row["notes"] = notes
        rows.append(row)
    n_ref = sum(len(r["tokens"]) for r in ref["rows"])
    margins = [row["ref_margin_at_divergence"] for row in rows if "ref_margin_at_divergence" in row]
    return {"engine": engine, "url": url, "matching": sum(row["matching"] for row in rows), "of": n_ref,
            "mean_agreeing_prefix": round(statistics.mean(row["agreeing_prefix"] for row in rows), 1),
            "identical": sum(row["identical"] for row in rows), "prompts": len(rows),
            "divergence_margins": margins, "seconds": round(t_total, 1), "rows": rows}


def markdown(ref: dict, results: list[dict], max_new: int) -> str:
    n = len(ref["rows"])
    lines = [f"| engine | matching tokens (of {n * max_new}) | mean agreeing prefix (of {max_new}) | "
             f"identical prompts | ref top-2 logit margin at first divergences | time |",
             "|---|---|---|---|---|---|"]
    lines.append(f"| transformers {ref['version']} (reference, fp32) | {n * max_new} | {max_new} | {n}/{n} | - | "
                 f"load {ref['load_seconds']['tokenizer'] + ref['load_seconds']['model']:.0f}s, "
                 f"generate {ref['generate_seconds']:.0f}s |")
    for res in results:
        label = f"{res['engine']} ({res['url']})"
        if "error" in res:
            lines.append(f"| {label} | error: {res['error']} | | | | |")
            continue
        margins = ", ".join(f"{m:.2f}" for m in sorted(res["divergence_margins"])) or "-"
        lines.append(f"| {label} | {res['matching']} | {res['mean_agreeing_prefix']} | "
                     f"{res['identical']}/{res['prompts']} | {margins} | {res['seconds']:.0f}s |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="GGUF path or catalog name (e.g. gemma-3-270m)")
    ap.add_argument("--lightllm", action="append", default=[], metavar="URL")
    ap.add_argument("--llama-server", action="append", default=[], metavar="URL")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", help="write JSON (reference, per-engine rows) here")
    ap.add_argument("--reference-cache", help="JSON file caching the transformers reference")
    ap.add_argument("--no-cache", action="store_true", help="recompute the reference even when cached")
    ap.add_argument("--threads", type=int, help="torch threads for the reference")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--show-text", action="store_true", help="print each reference continuation")
    ap.add_argument("--wide", action="store_true", help=f"{len(PROMPTS) + len(MORE_PROMPTS)} prompts instead of "
                                                        f"{len(PROMPTS)}")
    args = ap.parse_args()
    prompts = PROMPTS + MORE_PROMPTS if args.wide else PROMPTS

    gguf = resolve_gguf(args.gguf)
    key = hashlib.sha256(json.dumps([file_key(gguf), prompts, args.max_new_tokens]).encode()).hexdigest()[:16]
    cache = Path(args.reference_cache) if args.reference_cache else (
        Path(args.out).with_suffix(".reference.json") if args.out else Path("/tmp") / f"gguf_agreement-{key}.json")
    ref = None
    if cache.exists() and not args.no_cache:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            ref = cached["reference"]
            print(f"reference: cached in {cache}", file=sys.stderr)
    if ref is None:
        print(f"reference: transformers on {gguf} ({len(prompts)} prompts x {args.max_new_tokens} tokens)",
              file=sys.stderr)
        ref = reference(gguf, prompts, args.max_new_tokens, args.threads)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "gguf": str(gguf), "reference": ref}))
    for i, r in enumerate(ref["rows"]):
        if r["eog_emitted"]:
            print(f"note: the reference emits an end-of-generation token in prompt {i} at {r['eog_emitted']} "
                  f"(llama-server's ignore_eos bans them, so it cannot match there)", file=sys.stderr)
        if args.show_text:
            print(f"--- prompt {i}: {r['prompt']!r}\n{r['text']!r}", file=sys.stderr)

    results = []
    for engine, urls in (("lightllm", args.lightllm), ("llama-server", args.llama_server)):
        for url in urls:
            print(f"{engine} at {url} ...", file=sys.stderr)
            results.append(compare(ref, engine, url, args.max_new_tokens, args.timeout))
    print(f"GGUF: {gguf}  ({len(prompts)} prompts x {args.max_new_tokens} greedy tokens, same prompt ids everywhere)")
    print(markdown(ref, results, args.max_new_tokens))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"gguf": str(gguf), "max_new_tokens": args.max_new_tokens,
                                              "reference": ref, "engines": results}, indent=1))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
