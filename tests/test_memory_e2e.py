"""The start-up memory breakdown and the KV rule, through a real server: /get_server_info and /metrics; packed
tiles cached on disk serve a second start with the same answers."""

from __future__ import annotations

import re

import pytest
import requests

from lightllm.models.loading.loader import load_model_config
from tests.conftest import ServerProcess, embedded_model_path

ARGS = ["--model_dir", "smollm2", "--running_max_req_size", "4", "--max_req_total_len", "2048"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory")
    proc = ServerProcess([*ARGS, "--tile_cache_dir", str(tmp / "tiles")], tmp / "server.log")
    proc.tile_dir = tmp / "tiles"  # its own: the first start packs the tiles and caches them there
    yield proc
    proc.stop()


def test_server_info_and_metrics_show_the_breakdown(server):
    cfg = load_model_config(embedded_model_path())
    info = requests.get(server.base_url + "/get_server_info", timeout=10).json()
    memory = info["memory"]
    assert set(memory) == {"weights", "kv_cache", "activations", "runtime", "total"}
    # the rule: a full context (2048) for each of the 4 running requests, far under the memory cap
    assert info["max_total_token_num"] == 2048 * 4
    assert "max_model_len 2048 x running_max_req_size 4 = 8192" in info["kv_cache_rule"]
    # K and V of every layer in fp16, plus the request-to-token table (int64)
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    assert memory["kv_cache"] == 8192 * per_token + 4 * 2048 * 8
    # weights: in the file's quantization (the 4-bit file holds ~100 MB), no float32 embedding table
    assert 40e6 < memory["weights"] < 200e6
    assert memory["activations"] > 0 and memory["runtime"] > 50e6
    assert memory["total"] == sum(memory[k] for k in ("weights", "kv_cache", "activations", "runtime"))
    metrics = requests.get(server.base_url + "/metrics", timeout=10).text
    for part, value in memory.items():
        match = re.search(rf"^lightllm_memory_{part}_bytes (\S+)$", metrics, re.M)
        assert match and float(match.group(1)) == value, part


def _greedy(base_url: str) -> list[int]:
    body = {"inputs": "def fibonacci(n):", "parameters": {"do_sample": False, "max_new_tokens": 12,
                                                           "ignore_eos": True, "return_details": True}}
    response = requests.post(base_url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["tokens"][0]]


@pytest.mark.slow
def test_a_second_start_maps_the_cached_tiles_and_answers_alike(server, tmp_path):
    first = _greedy(server.base_url)
    tiles = list(server.tile_dir.glob("*/tiles.bin"))
    assert len(tiles) == 1, "the first start wrote no tile cache"
    mtime = tiles[0].stat().st_mtime_ns
    again = ServerProcess([*ARGS, "--tile_cache_dir", str(server.tile_dir)], tmp_path / "again.log")
    try:
        assert _greedy(again.base_url) == first
    finally:
        again.stop()
    assert tiles[0].stat().st_mtime_ns == mtime  # read, not written again
