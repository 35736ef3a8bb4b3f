"""Prompt-lookup speculative decoding, measured: single-stream output tokens/s and draft acceptance on
prompts whose answers copy from the prompt (code edits, tool calls that repeat given values) and on free chat.

Run it against a server started with `--spec_ngram_tokens K` and one without (same model, same box, one after
the other), e.g. `bash benchmarks/speculative.sh`. Greedy requests (drafting needs them), one at a time.
Acceptance comes from the server's /metrics (lightllm_spec_draft_tokens_total / _accepted_tokens_total).

Usage: python benchmarks/speculative.py --base-url http://127.0.0.1:8088 [--rounds 2] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import time

import requests

CODE = '''def merge_intervals(intervals):
    if not intervals:
        return []
    intervals = sorted(intervals, key=lambda pair: pair[0])
    merged = [list(intervals[0])]
    for start, end in intervals[1:]:
        last = merged[-1]
        if start <= last[1]:
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    return [tuple(pair) for pair in merged]


def total_covered(intervals):
    covered = 0
    for start, end in merge_intervals(intervals):
        covered += end - start
    return covered
'''
BOOK_MEETING = {"type": "function", "function": {
    "name": "book_meeting", "description": "Book a meeting room",
    "parameters": {"type": "object", "properties": {
        "title": {"type": "string"}, "room": {"type": "string"}, "attendees": {"type": "array", "items": {"type": "string"}},
        "start": {"type": "string"}, "end": {"type": "string"}}, "required": ["title", "room", "attendees", "start", "end"]}}}

WORKLOADS = {
    "code_edit": [
        {"messages": [{"role": "user", "content": f"Add type hints to every function below and return the whole "
                                                  f"file, unchanged otherwise.\n\n```python\n{CODE}```"}]},
        {"messages": [{"role": "user", "content": f"Rename `intervals` to `spans` everywhere in this code and "
                                                  f"return the full code.\n\n```python\n{CODE}```"}]},
    ],
    "tool_call": [
        {"messages": [{"role": "user", "content": "Book the meeting 'Quarterly planning review for the platform "
                       "team' in room 'Aurora 4.12 (north wing)' for alice.martin@example.com, "
                       "bob.nguyen@example.com and carol.de.souza@example.com from 2026-12-03T09:30:00+01:00 to "
                       "2026-12-03T11:00:00+01:00."}], "tools": [BOOK_MEETING], "tool_choice": "auto"},
        {"messages": [{"role": "user", "content": "Please book 'Incident retrospective: payment gateway timeouts' "
                       "in room 'Borealis 2.07' with dan.okafor@example.com and erin.li@example.com, "
                       "2026-12-04T14:00:00Z until 2026-12-04T15:30:00Z."}], "tools": [BOOK_MEETING], "tool_choice": "auto"},
    ],
    "free_chat": [
        {"messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper who befriends a "
                                                  "migrating bird."}]},
        {"messages": [{"role": "user", "content": "Explain how vaccines train the immune system, for a teenager."}]},
    ],
}


def spec_counters(base_url: str) -> tuple[float, float]:
    proposed = accepted = 0.0
    for line in requests.get(base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("lightllm_spec_draft_tokens_total "):
            proposed = float(line.split()[1])
        elif line.startswith("lightllm_spec_accepted_tokens_total "):
            accepted = float(line.split()[1])
    return proposed, accepted


def run(base_url: str, rounds: int, max_tokens: int) -> dict[str, dict[str, float]]:
    model = requests.get(base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
    results = {}
    for name, bodies in WORKLOADS.items():
        proposed0, accepted0 = spec_counters(base_url)
        tokens, seconds = 0, 0.0
        for _ in range(rounds):
            for body in bodies:
                started = time.perf_counter()
                reply = requests.post(base_url + "/v1/chat/completions", timeout=600, json={
                    "model": model, "temperature": 0, "max_tokens": max_tokens, **body}).json()
                seconds += time.perf_counter() - started
                tokens += reply["usage"]["completion_tokens"]
        proposed1, accepted1 = spec_counters(base_url)
        drafted = proposed1 - proposed0
        results[name] = {"output_tokens": tokens, "seconds": round(seconds, 2),
                         "tok_per_s": round(tokens / seconds, 1), "draft_tokens": drafted,
                         "acceptance": round((accepted1 - accepted0) / drafted, 3) if drafted else None,
                         "accepted_per_output_token": round((accepted1 - accepted0) / tokens, 3) if tokens else None}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8088")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--label", default="")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    results = run(args.base_url, args.rounds, args.max_tokens)
    print(f"== {args.label}")
    print(f"{'workload':>10} {'out tok':>8} {'tok/s':>7} {'drafted':>8} {'accept':>7} {'acc/out':>8}")
    for name, r in results.items():
        print(f"{name:>10} {r['output_tokens']:>8} {r['tok_per_s']:>7} {r['draft_tokens']:>8.0f} "
              f"{r['acceptance'] if r['acceptance'] is not None else '-':>7} "
              f"{r['accepted_per_output_token'] if r['accepted_per_output_token'] is not None else '-':>8}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"label": args.label, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
