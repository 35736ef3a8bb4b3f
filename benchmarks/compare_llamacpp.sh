#!/usr/bin/env bash
# Side-by-side serving benchmark: lightllm vs llama.cpp's llama-server on the same GGUF, same prompts.
#   bash benchmarks/compare_llamacpp.sh [GGUF] ; env: LEVELS="1 4 16 32" OUTPUT_LEN=128 INPUT_LEN=180
#   QUANT=gguf (our --quant_type), OUT=benchmarks/results (JSON per run), NUM_PROMPTS (default: the
#   concurrency, at least 4: one wave; 2x the concurrency is two waves), CHART=0 skips the chart,
#   OURS_ARGS (extra lightllm server flags, e.g. "--spec_ngram_tokens 0")
# llama-server is built once by build_llamacpp.sh (cached outside the repo, ~20 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
GGUF="${1:-$($PY -c 'from lightllm.models.catalog import smollm2_path as p; print(p())')}"
LEVELS="${LEVELS:-1 4 16 32}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
INPUT_LEN="${INPUT_LEN:-180}"
QUANT="${QUANT:-gguf}"
OUT="${OUT:-benchmarks/results}"
PORT_OURS=18088
PORT_LLAMA=18089
mkdir -p "$OUT"
BIN=$(PYTHON=$PY bash benchmarks/build_llamacpp.sh | tail -1)
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

echo "### lightllm (--quant_type $QUANT)"
$PY -m lightllm.server.api_server --model_dir "$GGUF" --port $PORT_OURS --quant_type "$QUANT" \
  --max_total_token_num 40000 --log_level WARNING ${OURS_ARGS:-} >"$OUT/$STAMP-lightllm.log" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$PORT_OURS"
for c in $LEVELS; do bench lightllm "http://127.0.0.1:$PORT_OURS" "$c"; done
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

echo "### llama-server"
for c in $LEVELS; do
  "$BIN/llama-server" -m "$GGUF" --host 127.0.0.1 --port $PORT_LLAMA -np "$c" -t "$(nproc)" -c $(( c * 512 > 4096 ? c * 512 : 4096 )) \
    >"$OUT/$STAMP-llama-c$c.log" 2>&1 &
  pids+=($!)
  wait_ready "http://127.0.0.1:$PORT_LLAMA"
  bench llama-server "http://127.0.0.1:$PORT_LLAMA" "$c"
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
done

$PY - "$OUT" "$STAMP" $LEVELS <<'PYEOF'
import json, sys
out, stamp, levels = sys.argv[1], sys.argv[2], sys.argv[3:]
print(f"\n{'conc':>5} {'ours tok/s':>11} {'llama tok/s':>12} {'ratio':>6} {'ours TTFT p50':>14} {'llama TTFT p50':>15} {'ours ITL p50':>13} {'llama ITL p50':>14}")
for c in levels:
    a = json.load(open(f"{out}/{stamp}-lightllm-c{c}.json"))["results"][0]
    b = json.load(open(f"{out}/{stamp}-llama-server-c{c}.json"))["results"][0]
    print(f"{c:>5} {a['output_throughput']:>11.1f} {b['output_throughput']:>12.1f} {a['output_throughput'] / max(b['output_throughput'], 1e-9):>6.2f} "
          f"{a['ttft_ms']['p50']:>14.0f} {b['ttft_ms']['p50']:>15.0f} {a['itl_ms']['p50']:>13.1f} {b['itl_ms']['p50']:>14.1f}")
PYEOF

# the chart RESULTS.md links (matplotlib: `pip install -e .[bench]`)
if [ "${CHART:-1}" = 0 ]; then
  :
elif $PY -c "import matplotlib" 2>/dev/null; then
  $PY benchmarks/plot_comparison.py "$OUT" "$STAMP" "benchmarks/comparison-$(basename "$GGUF" .gguf).png" $LEVELS
else
  echo "matplotlib not installed (pip install -e .[bench]): no chart"
fi
