"""Chart of one `compare_llamacpp.sh` run: output tokens/s and TTFT p50 against concurrency, lightllm and
llama-server side by side (PNG).

Usage: python benchmarks/plot_comparison.py RESULTS_DIR STAMP OUT.png LEVEL [LEVEL ...]
(RESULTS_DIR/STAMP-lightllm-cC.json and STAMP-llama-server-cC.json, as compare_llamacpp.sh writes them.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

SERVERS = {"lightllm": "lightllm", "llama-server": "llama.cpp llama-server"}


def load(results: Path, stamp: str, server: str, levels: list[int]) -> tuple[list[float], list[float]]:
    throughput, ttft = [], []
    for c in levels:
        result = json.loads((results / f"{stamp}-{server}-c{c}.json").read_text())["results"][0]
        throughput.append(result["output_throughput"])
        ttft.append(result["ttft_ms"]["p50"] / 1000)
    return throughput, ttft


def main() -> None:
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    results, stamp, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    levels = [int(c) for c in sys.argv[4:]]
    fig, (ax_tps, ax_ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for server, label in SERVERS.items():
        throughput, ttft = load(results, stamp, server, levels)
        ax_tps.plot(levels, throughput, marker="o", label=label)
        ax_ttft.plot(levels, ttft, marker="o", label=label)
    for ax, title in ((ax_tps, "output tokens/s (higher is better)"), (ax_ttft, "TTFT p50, s (lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"lightllm vs llama-server, same GGUF, same prompts ({stamp})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"chart: {out}")


if __name__ == "__main__":
    main()
