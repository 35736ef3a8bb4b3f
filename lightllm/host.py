"""Facts about the host shared by the engine's start-up code: where lightllm caches derived files, and the
CPU's feature flags. Torch-free, so the API process can import it cheaply."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """$LIGHTLLM_CACHE_DIR (default ~/.cache/lightllm), joined with `parts`."""
    base = os.environ.get("LIGHTLLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lightllm")
    return Path(base).joinpath(*parts)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo ("flags" on x86, "Features" on Arm); empty when unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
