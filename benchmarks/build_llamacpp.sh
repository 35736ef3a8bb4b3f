#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-bench from the source the llama-cpp-python sdist on PyPI
# carries (vendor/llama.cpp). Cached outside the repo; ~15-25 min on 2 cores the first time.
set -euo pipefail
DIR="${LLAMACPP_DIR:-$HOME/.cache/lightllm/llamacpp}"
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
if [ -x "$DIR/build/bin/llama-server" ] && [ -x "$DIR/build/bin/llama-bench" ]; then
  echo "$DIR/build/bin"; exit 0
fi
cd "$DIR"
ls llama_cpp_python-*.tar.gz >/dev/null 2>&1 || "$PY" -m pip download -q --no-deps --no-binary :all: llama-cpp-python -d .
SDIST=$(ls llama_cpp_python-*.tar.gz | sort -V | tail -1)
rm -rf src && mkdir src && tar -xzf "$SDIST" -C src --strip-components=1
cmake -S src/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >build.log 2>&1
cmake --build build --target llama-server llama-bench -j "$(nproc)" >>build.log 2>&1
echo "$DIR/build/bin"
