#!/usr/bin/env bash
# Prompt-lookup speculative decoding on vs off, side by side on one box: the default model (Qwen2.5-Coder-0.5B
# Q4_K_M), single stream, greedy. Usage: bash benchmarks/speculative.sh [K] [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
K=${1:-5}
PORT=${2:-8127}
OUT=benchmarks/results
mkdir -p "$OUT"
for spec in 0 "$K" 0 "$K"; do
  $PY -m lightllm.server.api_server --model_dir qwen2.5-coder --port "$PORT" --spec_ngram_tokens "$spec" \
      > "/tmp/speculative_$spec.log" 2>&1 &
  pid=$!
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.5; done
  $PY benchmarks/speculative.py --base-url "http://127.0.0.1:$PORT" --rounds 1 --label "spec_ngram_tokens=$spec" \
      --json-out "$OUT/speculative_k$spec.json"
  kill "$pid"; wait "$pid" 2> /dev/null || true
done
