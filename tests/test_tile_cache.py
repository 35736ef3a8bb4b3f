"""Packed tiles cached on disk: a second load maps them (no packing) and holds the same tiles; a cache that does
not match the model is ignored, and the cache can be turned off."""

from __future__ import annotations

import pytest
import torch

from lightllm.kernels import cpu as cpu_kernels
from lightllm.models.loading.catalog import smollm2_path
from lightllm.models.loading.loader import load_model_config, load_model_weights
from lightllm.models.quant import tile_cache
from lightllm.models.quant.tiled import TiledLinear, TiledWeights
from lightllm.models.quant.factory import make_linear
from lightllm.models.quant.gguf_blocks import gguf_blocks
from lightllm.models.quant.policy import LinearPolicy
from lightllm.models.quant.weights import GgufBlocks, cat_rows
from tests.test_gguf_quants import random_blocks

kernels = cpu_kernels.load()
pytestmark = pytest.mark.skipif(kernels is None or not kernels.tiled_fast,
                                reason="the tiles are the stored form only where the tiled kernel runs vectorised")


def _load():
    path = smollm2_path()
    weights = load_model_weights(path, load_model_config(path), torch.device("cpu"), torch.float32, "gguf")
    return [p for layer in weights.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)
            if isinstance(lin, TiledLinear) for p in lin.parts]


def _no_packing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("packed again instead of mapping the cache")

    for name in ("from_gguf", "from_group_quantized", "from_int8", "from_affine"):
        monkeypatch.setattr(TiledWeights, name, classmethod(refuse))


def test_a_second_load_maps_the_same_tiles(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTLLM_TILE_CACHE_DIR", str(tmp_path))
    first = _load()
    assert first, "SmolLM2's layers run on tiles here"
    (cache,) = tmp_path.iterdir()
    assert (cache / "tiles.bin").stat().st_size >= sum(p.q.numel() for p in first)
    with monkeypatch.context() as patched:
        _no_packing(patched)
        second = _load()
    assert len(second) == len(first)
    for a, b in zip(first, second):
        assert (a.n, a.k, a.group, a.bits, a.zero) == (b.n, b.k, b.group, b.bits, b.zero)
        assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales) and a.scales.dtype == b.scales.dtype
        assert b.q.data_ptr() % 64 == 0 and b.scales.data_ptr() % 64 == 0


def _count_deferred_reads(monkeypatch) -> list:
    """Shapes of the deferred GGUF blocks (fused q/k/v and gate/up, permuted q/k) whose bytes get built."""
    built = []
    original = GgufBlocks.raw

    def counting(self):
        if not self.materialized:
            built.append(tuple(self.shape))
        return original.fget(self)

    monkeypatch.setattr(GgufBlocks, "raw", property(counting))
    return built


def _fused_gguf_layer():
    """A q/k/v-like fused weight of two GGUF types, as the loader builds it (deferred joins of file blocks)."""
    parts = [("Q5_0", 32), ("Q5_0", 16), ("Q8_0", 16)]
    blocks = [gguf_blocks(random_blocks(t, n, 128, seed=i, full_range=False), t, (n, 128))
              for i, (t, n) in enumerate(parts)]
    return make_linear(cat_rows(blocks), None, "gguf", torch.device("cpu"), torch.float32, LinearPolicy())


def test_a_layer_from_the_cache_copies_no_weight_bytes_out_of_the_file(tmp_path, monkeypatch):
    """Each first touch of a mapped page is a fault: a start whose tiles are cached must not fuse or permute the
    file's blocks only to drop them (4 of the 5.4 s Qwen2.5-0.5B's load took, before)."""
    monkeypatch.setenv("LIGHTLLM_TILE_CACHE_DIR", str(tmp_path))
    x = torch.randn(3, 128)
    with monkeypatch.context() as patched:
        cold_reads = _count_deferred_reads(patched)
        with tile_cache.session("ab" * 32, "test"):
            cold = _fused_gguf_layer()
    assert isinstance(cold, TiledLinear) and cold_reads, "packing reads the fused blocks"
    with monkeypatch.context() as patched:
        _no_packing(patched)
        warm_reads = _count_deferred_reads(patched)
        with tile_cache.session("ab" * 32, "test"):
            warm = _fused_gguf_layer()
    assert warm_reads == []
    assert torch.equal(cold(x), warm(x))


def test_a_cache_that_does_not_match_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTLLM_TILE_CACHE_DIR", str(tmp_path))
    first = _load()
    (cache,) = tmp_path.iterdir()
    index = (cache / "index.json").read_text()
    (cache / "index.json").write_text(index.replace('"n": 576', '"n": 577', 1))  # a layer of another shape
    again = _load()
    assert all(torch.equal(a.q, b.q) for a, b in zip(first, again))


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTLLM_TILE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LIGHTLLM_TILE_CACHE", "0")
    assert not tile_cache.enabled()
    _load()
    assert list(tmp_path.iterdir()) == []
