"""Tensor-parallel prefill and decode nodes (`--tp 2` each, gloo on CPU): every rank moves its own KV shard to
the same rank of the other node. Greedy tokens through the master equal a single server's (openai SDK, plain and
streamed); a node whose --tp differs from the other role's is refused at registration, naming both.
~35 s on the shared 2-core box (six model processes start), so in the default suite."""

from __future__ import annotations

import openai

from tests.conftest import ServerProcess, free_port
from tests.test_pd import COMMON, PROMPTS, Master, Node, model_dir  # noqa: F401  (model_dir: the shared fixture)



def _greedy(base_url: str) -> tuple[list[str], list[str]]:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    plain, streamed = [], []
    for prompt in PROMPTS:
        out = client.completions.create(model="m", prompt=prompt, max_tokens=16, temperature=0,
                                        extra_body={"ignore_eos": True})
        plain.append(out.choices[0].text)
        chunks = client.completions.create(model="m", prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        streamed.append("".join(c.choices[0].text for c in chunks if c.choices))
    return plain, streamed


def test_tp2_prefill_and_decode_nodes_match_the_single_server(model_dir, tmp_path):  # noqa: F811
    single = ServerProcess(["--model_dir", str(model_dir), *COMMON], tmp_path / "single.log")
    try:
        expected, expected_stream = _greedy(single.base_url)
    finally:
        single.stop()
    assert expected == expected_stream and all(expected)

    port = free_port()
    master = Master(model_dir, port, tmp_path / "master.log")
    tp2 = ["--tp", "2", "--nccl_host", "127.0.0.1"]
    nodes = [Node(role, model_dir, port, tmp_path / f"{role}.log",
                  [*COMMON, *tp2, "--nccl_port", str(free_port())]) for role in ("prefill", "decode")]
    try:
        master.wait_status("/readiness", {200}, 180, nodes)
        plain, streamed = _greedy(master.base_url)
        assert plain == expected and streamed == expected
        decode_log = nodes[1].log_path.read_text()
        # both ranks of the decode node formed their own pair group with the prefill node's same rank
        assert "tp rank 0" in decode_log and "tp rank 1" in decode_log, decode_log[-3000:]

        # a decode node of another --tp cannot take these shards: refused, and it says why
        odd = Node("decode", model_dir, port, tmp_path / "decode_tp1.log")
        nodes.append(odd)
        assert odd.proc.wait(180) == 1
        assert "prefill and decode nodes must shard the KV alike" in odd.log_path.read_text()
        assert master.status("/readiness") == 200
        assert _greedy(master.base_url)[0] == expected
    finally:
        master.stop()
        for node in nodes:
            node.kill()
