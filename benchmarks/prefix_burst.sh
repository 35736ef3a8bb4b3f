#!/usr/bin/env bash
# Requests that arrive together with one long shared system prompt (agents, tool definitions):
# TTFT of a single cold request, then of a 32-request burst, with the prefix cache on (default) and off
# (--disable_dynamic_prompt_cache), on the embedded SmolLM2 model. Prompts: ~2,400-token shared prefix
# (1,990 words) + ~24 distinct tokens, 16 output tokens. Usage: bash benchmarks/prefix_burst.sh [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PORT=${1:-8123}
OUT=benchmarks/results
mkdir -p "$OUT"

run() {  # $1 label, rest: extra server flags
  local label=$1; shift
  $PY -m lightllm.server.api_server --model_dir smollm2 --port "$PORT" --max_total_token_num 100000 "$@" \
      > "/tmp/prefix_burst_$label.log" 2>&1 &
  local pid=$!
  for _ in $(seq 240); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.5; done
  for c in 1 32; do  # each level draws a fresh shared prefix: the burst starts cold
    $PY benchmarks/serving.py --base-url "http://127.0.0.1:$PORT" --label "$label" --concurrency "$c" \
        --num-prompts "$c" --shared-prefix-len 1990 --input-len 20 --output-len 16 --ignore-eos \
        --json-out "$OUT/prefix_burst_${label}_c$c.json" | tail -3
  done
  kill "$pid"; wait "$pid" 2> /dev/null || true
}

run cache_on
run cache_off --disable_dynamic_prompt_cache
