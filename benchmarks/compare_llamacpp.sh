#!/usr/bin/env bash
# Side-by-side serving benchmark: lightllm vs llama.cpp's llama-server on the same GGUF, same prompts.
#   bash benchmarks/compare_llamacpp.sh [GGUF] ; env: LEVELS="1 4 16 32" OUTPUT_LEN=128 INPUT_LEN=180
#   QUANT=gguf (our --quant_type), OUT=benchmarks/results (JSON per run), NUM_PROMPTS (default: the
#   concurrency, at least 4: one wave; 2x the concurrency is two waves), CHART=0 skips the chart,
#   OURS_ARGS (extra lightllm server flags, e.g. "--spec_ngram_tokens 0"), OLD=DIR (also runs the lightllm
#   checked out in DIR, e.g. `git worktree add /tmp/old COMMIT`, with this virtualenv: old vs new in one run),
#   LLAMA=0 (skip llama-server)
# llama-server is built once by build_llamacpp.sh (cached outside the repo, ~20 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
GGUF="${1:-$($PY -c 'from lightllm.models.loading.catalog import smollm2_path as p; print(p())')}"
LEVELS="${LEVELS:-1 4 16 32}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
INPUT_LEN="${INPUT_LEN:-180}"
QUANT="${QUANT:-gguf}"
OUT="${OUT:-benchmarks/results}"
PORT_OURS=18088
PORT_LLAMA=18089
mkdir -p "$OUT"
LLAMA="${LLAMA:-1}"
[ "$LLAMA" = 0 ] || BIN=$(PYTHON=$PY bash benchmarks/build_llamacpp.sh | tail -1)
STAMP=$(date +%Y%m%d-%H%M%S)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_ready() {  # url
  for _ in $(seq 1 300); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "server at $1 did not come up" >&2; return 1
}

bench() {  # label url concurrency
  local n=${NUM_PROMPTS:-$(( $3 > 4 ? $3 : 4 ))}
  $PY benchmarks/serving.py --base-url "$2" --label "$1" --concurrency "$3" --num-prompts "$n" \
    --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --ignore-eos --json-out "$OUT/$STAMP-$1-c$3.json" | tail -n 3
}

run_ours() {  # label root (a lightllm checkout)
  echo "### $1 (--quant_type $QUANT, $2)"
  (cd "$2" && PYTHONPATH="$2" exec "$ROOT/$PY" -m lightllm.server.api_server --model_dir "$GGUF" --port $PORT_OURS \
    --quant_type "$QUANT" --max_total_token_num 40000 --log_level WARNING ${OURS_ARGS:-}) >"$OUT/$STAMP-$1.log" 2>&1 &
  pids+=($!)
  wait_ready "http://127.0.0.1:$PORT_OURS"
  for c in $LEVELS; do bench "$1" "http://127.0.0.1:$PORT_OURS" "$c"; done
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
}
ROOT="$PWD"
run_ours lightllm "$ROOT"
[ -z "${OLD:-}" ] || run_ours lightllm-old "$OLD"

[ "$LLAMA" = 0 ] || echo "### llama-server"
[ "$LLAMA" = 0 ] || for c in $LEVELS; do
  "$BIN/llama-server" -m "$GGUF" --host 127.0.0.1 --port $PORT_LLAMA -np "$c" -t "$(nproc)" -c $(( c * 512 > 4096 ? c * 512 : 4096 )) \
    >"$OUT/$STAMP-llama-c$c.log" 2>&1 &
  pids+=($!)
  wait_ready "http://127.0.0.1:$PORT_LLAMA"
  bench llama-server "http://127.0.0.1:$PORT_LLAMA" "$c"
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
done

$PY - "$OUT" "$STAMP" $LEVELS <<'PYEOF'
import json, os, sys
out, stamp, levels = sys.argv[1], sys.argv[2], sys.argv[3:]
labels = [l for l in ("lightllm", "lightllm-old", "llama-server") if os.path.exists(f"{out}/{stamp}-{l}-c{levels[0]}.json")]
print("\nper server: output tok/s | TTFT p50 ms | ITL p50 ms; x = lightllm's tok/s over the other's")
print(f"{'conc':>5} " + " ".join(f"{l:>28}" for l in labels) + "".join(f"{'x ' + l:>16}" for l in labels[1:]))
for c in levels:
    r = {l: json.load(open(f"{out}/{stamp}-{l}-c{c}.json"))["results"][0] for l in labels}
    cells = [f"{r[l]['output_throughput']:.1f} | {r[l]['ttft_ms']['p50']:.0f} | {r[l]['itl_ms']['p50']:.1f}" for l in labels]
    ratios = [f"{r['lightllm']['output_throughput'] / max(r[l]['output_throughput'], 1e-9):>16.2f}" for l in labels[1:]]
    print(f"{c:>5} " + " ".join(f"{x:>28}" for x in cells) + "".join(ratios))
PYEOF

# the chart RESULTS.md links (matplotlib: `pip install -e .[bench]`)
if [ "${CHART:-1}" = 0 ] || [ "$LLAMA" = 0 ]; then
  :
elif $PY -c "import matplotlib" 2>/dev/null; then
  $PY benchmarks/plot_comparison.py "$OUT" "$STAMP" "benchmarks/comparison-$(basename "$GGUF" .gguf).png" $LEVELS
else
  echo "matplotlib not installed (pip install -e .[bench]): no chart"
fi
