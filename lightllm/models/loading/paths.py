"""Locating model files; kept free of torch so the API process can import it cheaply."""

from __future__ import annotations

from pathlib import Path


def find_gguf_file(model_path: str | Path) -> Path | None:
    """The GGUF file `model_path` names, or the single one inside a directory without config.json."""
    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise ValueError(f"{path} holds several .gguf files; pass one of them as --model_dir (a vision "
                             "projector, llama.cpp's mmproj file, goes with --mmproj)")
    return None
