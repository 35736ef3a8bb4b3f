"""Facts about the host shared by the engine's start-up code: where lightllm caches derived files, and the
CPU's feature flags. Torch-free, so the API process can import it cheaply."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
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


def die_with_parent() -> None:
    """Linux: this process is killed when the process that started it exits, however it exits (a SIGKILL'd
    parent runs no cleanup of its own). It must be called by the child, at start; the parent is the thread that
    started it, so children are started from long-lived threads."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)
