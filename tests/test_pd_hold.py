"""A decode node without free KV, with real nodes on loopback: the master holds the requests it has no room for
and places them as running ones finish (--pd_hold_timeout), or ends them with 503 + Retry-After when none
makes room in time; /token_load sums the KV of every node (per role in `pd_nodes`); a prefill node killed
while its request is held ends that request at once with 503, and a new one registers."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import free_port
from tests.test_pd import COMMON, Master, Node, model_dir  # noqa: F401  (model_dir: the shared fixture)

pytestmark = pytest.mark.slow  # 30-55 s here: a 12 s hold timeout, a dead node's 5 s heartbeat timeout, three starts
# (the same hold / timeout / totals logic against fake nodes runs in the default suite: tests/test_pd_master.py)

HOLD_S = 12.0
# 300 KV tokens: one ~200-token prompt plus its 40 new tokens at a time (every new token reserved at admission)
SMALL = ["--max_total_token_num", "300", "--max_req_total_len", "512", "--quant_type", "none",
         "--router_max_new_token_len", "512"]


def _prompt(i: int, words: int) -> str:
    return f"Story {i}:" + " apple banana" * (words // 2)


def _complete(base_url: str, prompt: str, max_tokens: int = 40) -> requests.Response:
    return requests.post(base_url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                             "temperature": 0, "ignore_eos": True}, timeout=120)


def _wait_idle(base_url: str, timeout: float = 20) -> dict:
    deadline = time.time() + timeout
    while True:
        load = requests.get(base_url + "/token_load", timeout=5).json()
        if load["kv_used_by_requests"] == 0 or time.time() > deadline:
            return load
        time.sleep(0.2)


def test_master_holds_requests_until_a_decode_node_has_room_then_503(model_dir, tmp_path):  # noqa: F811
    port = free_port()
    master = Master(model_dir, port, tmp_path / "master.log", ["--pd_hold_timeout", str(HOLD_S)])
    nodes = [Node("prefill", model_dir, port, tmp_path / "prefill.log"),
             Node("decode", model_dir, port, tmp_path / "decode.log", SMALL)]
    try:
        master.wait_status("/readiness", {200}, 180, nodes)
        load = requests.get(master.base_url + "/token_load", timeout=5).json()
        assert load["kv_total"] == 3000 + 300, load  # every node's pool, not the first one's
        assert load["pd_nodes"]["prefill"]["kv_total"] == 3000 and load["pd_nodes"]["decode"]["kv_total"] == 300
        assert load["pd_nodes"]["prefill"]["nodes"] == load["pd_nodes"]["decode"]["nodes"] == 1

        # three ~200-token prompts at once: the decode node takes one at a time, the master holds the others
        prompts = [_prompt(i, 200) for i in range(3)]
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda p: _complete(master.base_url, p), prompts))
        for r in answers:
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 40 and 190 < r.json()["usage"]["prompt_tokens"] < 260
        assert "held: no decode node has room" in master.log_path.read_text()
        # a held request's tokens are those it gets alone
        alone = _complete(master.base_url, prompts[2])
        texts = [r.json()["choices"][0]["text"] for r in answers]
        assert alone.status_code == 200 and alone.json()["choices"][0]["text"] == texts[2]

        # a prompt no decode node can ever hold: held --pd_hold_timeout seconds, then 503 + Retry-After, and the
        # prefill node frees the KV it kept for it
        started = time.time()
        r = _complete(master.base_url, _prompt(9, 400), max_tokens=4)
        waited = time.time() - started
        assert r.status_code == 503 and "Retry-After" in r.headers, r.text
        assert "--pd_hold_timeout" in r.json()["error"]["message"] and HOLD_S - 0.5 <= waited < HOLD_S + 10, waited
        load = _wait_idle(master.base_url)
        assert load["kv_used_by_requests"] == 0 and load["pd_nodes"]["decode"]["held_requests"] == 0, load
        assert _complete(master.base_url, prompts[0], max_tokens=4).status_code == 200

        # the prefill node holding a held request's KV dies: the request ends with 503 at once, not at the timeout
        with ThreadPoolExecutor(1) as pool:
            started = time.time()
            pending = pool.submit(_complete, master.base_url, _prompt(8, 400), 4)
            deadline = time.time() + 30
            while requests.get(master.base_url + "/token_load", timeout=5).json()["pd_nodes"]["decode"][
                    "held_requests"] == 0:
                assert time.time() < deadline and not pending.done(), "the request was never held"
                time.sleep(0.1)
            nodes[0].kill()
            r = pending.result()
            waited = time.time() - started
        assert r.status_code == 503 and "prefill node lost" in r.json()["error"]["message"], r.text
        assert waited < HOLD_S, waited
        master.wait_status("/readiness", {503}, 10)
        load = requests.get(master.base_url + "/token_load", timeout=5).json()
        assert load["pd_nodes"]["prefill"]["nodes"] == 0 and load["kv_total"] == 300, load

        # a new prefill node registers and is routed to
        nodes.append(Node("prefill", model_dir, port, tmp_path / "prefill2.log"))
        master.wait_status("/readiness", {200}, 180, [nodes[1], nodes[2]])
        again = _complete(master.base_url, prompts[1])
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == texts[1]
    finally:
        master.stop()
        for node in nodes:
            node.kill()
