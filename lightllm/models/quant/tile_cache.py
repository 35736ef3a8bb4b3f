"""Packed tiles cached on disk, so that a start after the first maps them instead of packing them again.

Packing a model's weights into tiles (quant/tiled.py) is the bulk of a cold start (seconds for a 0.5B model on
a quiet 2-core box). The tiles of one model file are always the same, so the loader opens a session keyed by
the file's sha256, the tensor-parallel shard and the source of the code that decides them (the loaders and the
tile layout: an edit there packs again); TiledLinear.from_layer asks the session for each layer's parts in
load order. The first start packs and writes them (`$LIGHTLLM_CACHE_DIR/tiles/<key>/`, beside the compiled
kernels, or `--tile_cache_dir DIR/<key>/`); later starts read that file. `--no-tile_cache` turns it off. The
server's flags reach this module through configure() in the engine process; processes that load a model
directly keep LIGHTLLM_TILE_CACHE=0 and LIGHTLLM_TILE_CACHE_DIR as their switches (the flags' defaults).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from lightllm.host import cache_dir

logger = logging.getLogger("lightllm.models")

_FORMAT = 1
# the code whose output the cache holds: any change to these files keys a new cache
_SOURCES = ("quant/tiled.py", "quant/weights.py", "quant/gguf_blocks.py", "quant/gguf_decode.py",
            "quant/factory.py", "loading/gguf.py", "loading/gguf_file.py", "loading/loader.py",
            "loading/sharding.py", "quant/tile_cache.py")
_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


_settings: tuple[bool, str | None] | None = None  # (on, directory) once configure() ran; else the environment


def configure(on: bool, directory: str | None) -> None:
    """The server's --tile_cache / --tile_cache_dir for this process (before the model loads)."""
    global _settings
    _settings = (on, directory)


def enabled() -> bool:
    if _settings is not None:
        return _settings[0]
    return os.environ.get("LIGHTLLM_TILE_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def _root() -> str | None:
    return _settings[1] if _settings is not None else os.environ.get("LIGHTLLM_TILE_CACHE_DIR")


def code_key() -> str:
    models = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(str(_FORMAT).encode())
    for name in _SOURCES:
        digest.update(name.encode())
        digest.update((models / name).read_bytes())
    return digest.hexdigest()[:16]


def _read(path: Path) -> np.ndarray:
    """The file in anonymous memory (64-byte aligned). Not mapped: on a machine short of memory and without
    swap the kernel reclaims clean file pages first, and every step would read evicted tiles from disk again
    (measured: ~10x slower decode on the shared box); reading the cached file is still ~100x cheaper than
    packing."""
    data = torch.empty(path.stat().st_size, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.readinto(memoryview(data.numpy()))
    return data.numpy()


class _Session:
    """One model's load: hands out cached parts in order (hit), or records what was packed (miss)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.index: list[list[dict]] | None = None
        self.data: np.ndarray | None = None
        self.built: list[list] = []  # miss: every layer's TiledWeights, in order
        self.position = 0
        self.broken = False
        try:
            self.index = json.loads((directory / "index.json").read_text())
            self.data = _read(directory / "tiles.bin")
        except (OSError, ValueError):
            self.index = self.data = None

    @property
    def hit(self) -> bool:
        return self.index is not None

    def parts(self, build: Callable[[], list], shape: tuple[int, int], make: Callable) -> list:
        """This layer's parts: `make(q, scales, n, k, group, bits, zero)` from the cache, or `build()` (recorded
        for writing)."""
        if self.broken:
            return build()
        position, self.position = self.position, self.position + 1
        if self.hit:
            entry = self.index[position] if position < len(self.index) else None
            if entry is not None and (sum(p["n"] for p in entry), entry[0]["k"]) == tuple(shape):
                return [make(self._tensor(p["q"]), self._tensor(p["scales"]), p["n"], p["k"], p["group"],
                                     p["bits"], p["zero"]) for p in entry]
            logger.warning("tile cache %s does not match this model (layer %d); packing afresh", self.directory,
                           position)
            self.broken = True
            return build()
        parts = build()
        self.built.append(parts)
        return parts

    def _tensor(self, spec: dict) -> torch.Tensor:
        offset, shape, dtype = spec["offset"], spec["shape"], _DTYPES[spec["dtype"]]
        count = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        return torch.from_numpy(self.data[offset:offset + count]).view(dtype).view(*shape)

    def finish(self) -> None:
        if self.hit or self.broken or not self.built:
            return
        try:
            self._write()
        except OSError as exc:
            logger.warning("could not write the tile cache %s: %s", self.directory, exc)

    def _write(self) -> None:
        parent = self.directory.parent
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=self.directory.name + "."))
        try:
            index, offset = [], 0
            with open(staging / "tiles.bin", "wb") as out:
                for parts in self.built:
                    entry = []
                    for p in parts:
                        specs = {}
                        for field in ("q", "scales"):
                            tensor = getattr(p, field).contiguous()
                            raw = tensor.view(torch.uint8).numpy().tobytes()
                            specs[field] = {"offset": offset, "shape": list(tensor.shape),
                                            "dtype": str(tensor.dtype).replace("torch.", "")}
                            out.write(raw)
                            offset += len(raw)
                            pad = -offset % 64  # keep every tensor 64-byte aligned for the kernels' loads
                            out.write(b"\0" * pad)
                            offset += pad
                        entry.append({**specs, "n": p.n, "k": p.k, "group": p.group, "bits": p.bits, "zero": p.zero})
                    index.append(entry)
            (staging / "index.json").write_text(json.dumps(index))
            os.rename(staging, self.directory)  # atomic; loses harmlessly to a process that got there first
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        # older caches of this model and shard (packed by other code) go: one per model file
        digest, _, tag = self.directory.name.split("-")
        for other in parent.iterdir():
            if other != self.directory and other.name.startswith(digest + "-") and other.name.endswith("-" + tag):
                shutil.rmtree(other, ignore_errors=True)
        logger.info("packed tiles cached in %s (%.0f MB)", self.directory, offset / 1e6)


_active: _Session | None = None


@contextlib.contextmanager
def session(file_digest: str | None, tag: str = "tp1r0") -> Iterator[_Session | None]:
    """Serve the TiledLinear.from_layer calls inside from (and into) the cache of the model file whose sha256
    is `file_digest` (None, or the cache turned off: no cache); `tag` (no '-'): what else decides the tiles
    (quant type, shard)."""
    global _active
    if file_digest is None or not enabled():
        yield None
        return
    name = f"{file_digest[:16]}-{code_key()}-{tag}"
    root = _root()
    current = _Session(Path(root) / name if root else cache_dir("tiles", name))
    _active = current
    try:
        yield current
        current.finish()
    finally:
        _active = None


def cached_parts(build: Callable[[], list], shape: tuple[int, int], make: Callable) -> list:
    """A layer's tiled parts (out_features x in_features = `shape`; `make` is tiled.TiledWeights): from the
    active session, else built."""
    return build() if _active is None else _active.parts(build, shape, make)
