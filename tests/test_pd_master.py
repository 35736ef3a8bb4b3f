"""The pd_master's routing and faults (server/pd/master.py), with nodes played by zmq sockets in the test: no
model, so each case takes well under a second. The end-to-end run with real nodes is tests/test_pd.py."""

from __future__ import annotations

import asyncio
import pickle

import pytest
import zmq
import zmq.asyncio

from lightllm.engine.pd_messages import (KVAccepted, KVPeer, KVReady, KVRefused, ReceiveKV, RegisterNode,
                                         RegisterRefused, SendKV)
from lightllm.engine.protocol import (AbortRequest, AddRequest, EngineReady, EngineStats, SamplingParams,
                                      StepOutputs, TokenOutput)
from lightllm.server.engine_client import EngineDied
from lightllm.server.pd import master as master_module
from lightllm.server.pd.master import PDMasterClient
from tests.conftest import free_port

READY = EngineReady(model_name="tiny", architecture="LlamaForCausalLM", dtype="float32", device="cpu",
                    max_total_token_num=1000, max_model_len=512, vocab_size=256, eos_token_ids=[2])
STATS = EngineStats(kv_total=1000, kv_used=0, kv_cached=0, running=0, waiting=0)


class FakeNode:
    def __init__(self, ctx: zmq.asyncio.Context, port: int, node_id: str, role: str, ready: EngineReady = READY):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, node_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.reg = RegisterNode(node_id, role, ready, KVPeer(node_id, "127.0.0.1", 1), STATS)

    async def register(self) -> None:
        await self.sock.send_pyobj(self.reg)

    async def send(self, msg: object) -> None:
        await self.sock.send_pyobj(msg)

    async def recv(self, timeout: float = 5.0) -> object:
        return await asyncio.wait_for(self.sock.recv_pyobj(), timeout)


async def _setup(n_decode: int = 1, hold_timeout: float = 5.0):
    port = free_port()
    master = PDMasterClient("127.0.0.1", port, hold_timeout)
    ctx = zmq.asyncio.Context()
    prefill = FakeNode(ctx, port, "prefill-1", "prefill")
    decodes = [FakeNode(ctx, port, f"decode-{i}", "decode") for i in range(n_decode)]
    start = asyncio.create_task(master.start())
    for node in [prefill, *decodes]:
        await node.register()
    assert (await asyncio.wait_for(start, 5)) == READY
    for _ in range(100):
        if master.alive and len(master.nodes) == 1 + n_decode:
            break
        await asyncio.sleep(0.02)
    return master, ctx, prefill, decodes


async def _teardown(master: PDMasterClient, ctx: zmq.asyncio.Context) -> None:
    await master.shutdown()
    ctx.destroy(linger=0)


async def _collect(gen) -> list[TokenOutput]:
    return [out async for out in gen]


async def _prefill_first_token(prefill: FakeNode, rid_count: int) -> list[str]:
    """The fake prefill node takes `rid_count` requests, emits each one's first token and says KVReady."""
    rids = []
    for _ in range(rid_count):
        msg = await prefill.recv()
        assert isinstance(msg, AddRequest)
        rids.append(msg.rid)
    await prefill.send(StepOutputs([TokenOutput(rid, 7, prompt_tokens=3) for rid in rids], STATS))
    for rid in rids:
        await prefill.send(KVReady(rid, 7, 3, 0, None))
    return rids


def test_a_request_goes_prefill_then_decode_and_two_decode_nodes_share_the_load():
    async def run():
        master, ctx, prefill, decodes = await _setup(n_decode=2)
        try:
            streams = [asyncio.create_task(_collect(master.generate(f"r{i}", [5, 6, 7], SamplingParams())))
                       for i in range(2)]
            rids = await _prefill_first_token(prefill, 2)
            got = {}
            for node in decodes:  # one request each: the second goes to the node with fewer in flight
                msg = await node.recv()
                assert isinstance(msg, ReceiveKV) and msg.prompt_ids == [5, 6, 7] and msg.ready.first_token == 7
                got[node.reg.node_id] = msg
                await node.send(KVAccepted(msg.rid))
            for _ in rids:
                send = await prefill.recv()
                assert isinstance(send, SendKV)
                assert send.target.node_id == next(k for k, m in got.items() if m.rid == send.rid)
                assert send.tag == got[send.target.node_id].tag
            for node_id, msg in got.items():
                node = next(d for d in decodes if d.reg.node_id == node_id)
                await node.send(StepOutputs([TokenOutput(msg.rid, 9), TokenOutput(msg.rid, 2, finished=True,
                                                                                 finish_reason="stop")], STATS))
            for stream in streams:
                outs = await asyncio.wait_for(stream, 5)
                assert [o.token_id for o in outs] == [7, 9, 2] and outs[-1].finished
        finally:
            await _teardown(master, ctx)
    asyncio.run(run())


def test_a_decode_node_without_room_ends_the_request_503_and_the_prefill_node_frees_it():
    async def run():
        master, ctx, prefill, (decode,) = await _setup()
        try:
            stream = asyncio.create_task(_collect(master.generate("r", [5, 6, 7], SamplingParams())))
            await _prefill_first_token(prefill, 1)
            msg = await decode.recv()
            await decode.send(StepOutputs([TokenOutput(msg.rid, None, finished=True, finish_reason="abort",
                                                       error=master_module.EngineError("unavailable", "no room"))],
                                          STATS))
            outs = await asyncio.wait_for(stream, 5)
            assert outs[-1].error.kind == "unavailable"
            assert isinstance(await prefill.recv(), AbortRequest)
        finally:
            await _teardown(master, ctx)
    asyncio.run(run())


def test_a_silent_node_is_dropped_its_requests_end_503_and_it_can_register_again(monkeypatch):
    monkeypatch.setattr(master_module, "NODE_TIMEOUT_S", 0.6)
    monkeypatch.setattr(master_module, "HEARTBEAT_S", 0.1)

    async def run():
        master, ctx, prefill, (decode,) = await _setup()
        try:
            stream = asyncio.create_task(_collect(master.generate("r", [5, 6, 7], SamplingParams())))
            await _prefill_first_token(prefill, 1)
            await decode.recv()  # then the decode node falls silent; the prefill node keeps beating
            for _ in range(10):
                await prefill.register()
                await asyncio.sleep(0.1)
            outs = await asyncio.wait_for(stream, 5)
            assert outs[-1].error.kind == "unavailable" and "decode node lost" in outs[-1].error.message
            assert not master.alive and "no decode" in master.dead_reason
            with pytest.raises(EngineDied):
                await _collect(master.generate("r2", [5], SamplingParams()))
            await decode.register()  # back again: routed to once more
            for _ in range(50):
                if master.alive:
                    break
                await asyncio.sleep(0.02)
            assert master.alive
        finally:
            await _teardown(master, ctx)
    asyncio.run(run())


def test_a_node_serving_another_model_is_refused_and_images_or_adapters_are_refused():
    async def run():
        master, ctx, prefill, _ = await _setup()
        try:
            other = FakeNode(ctx, int(master.address.rsplit(":", 1)[1]), "decode-x", "decode",
                             EngineReady("big", "Qwen2ForCausalLM", "float32", "cpu", 10, 512, 151936, [2]))
            await other.register()
            refused = await other.recv()
            assert isinstance(refused, RegisterRefused) and "Qwen2ForCausalLM" in refused.reason
            assert "decode-x" not in master.nodes
            outs = await _collect(master.generate("r", [5], SamplingParams(lora="a")))
            assert outs[-1].error.kind == "client" and "LoRA" in outs[-1].error.message
        finally:
            await _teardown(master, ctx)
    asyncio.run(run())


def test_messages_pickle_without_torch():
    ready = KVReady("r", 1, 3, 0, b"\x00\x01")
    assert pickle.loads(pickle.dumps(ready)) == ready


def test_a_prefill_node_lost_after_the_handoff_leaves_the_decoding_request_alone(monkeypatch):
    monkeypatch.setattr(master_module, "NODE_TIMEOUT_S", 0.6)
    monkeypatch.setattr(master_module, "HEARTBEAT_S", 0.1)

    async def run():
        master, ctx, prefill, (decode,) = await _setup()
        try:
            stream = asyncio.create_task(_collect(master.generate("r", [5, 6, 7], SamplingParams())))
            await _prefill_first_token(prefill, 1)
            msg = await decode.recv()
            await decode.send(KVAccepted(msg.rid))
            await prefill.recv()  # SendKV
            await decode.send(StepOutputs([TokenOutput("r", 9)], STATS))  # decoding: the KV arrived
            for _ in range(10):  # the prefill node falls silent and is dropped; the decode node beats
                await decode.register()
                await asyncio.sleep(0.1)
            assert "prefill-1" not in master.nodes and not stream.done()
            await decode.send(StepOutputs([TokenOutput("r", 2, finished=True, finish_reason="stop")], STATS))
            outs = await asyncio.wait_for(stream, 5)
            assert [o.token_id for o in outs] == [7, 9, 2] and outs[-1].error is None
        finally:
            await _teardown(master, ctx)
    asyncio.run(run())


def test_a_request_aborted_while_its_receive_is_set_up_still_completes_the_transfer():
    """A posted receive cannot be cancelled: the prefill node keeps the KV and sends it once the decode node has
    accepted, and the decode node (told to abort) drops the pages; nothing waits for a timeout."""
    async def run():
        master, ctx, prefill, (decode,) = await _setup()
        try:
            gen = master.generate("r", [5, 6, 7], SamplingParams())
            first = asyncio.create_task(gen.__anext__())
            await _prefill_first_token(prefill, 1)
            assert (await asyncio.wait_for(first, 5)).token_id == 7
            receive = await decode.recv()
            assert isinstance(receive, ReceiveKV)
            await gen.aclose()  # the client leaves
            abort = await decode.recv()
            assert isinstance(abort, AbortRequest) and abort.rid == "r"
            await decode.send(KVAccepted("r"))  # it had already posted the receive
            send = await prefill.recv()
            assert isinstance(send, SendKV) and send.rid == "r" and send.tag == receive.tag
            assert not master.unwinding and not master.flights
        finally:
            await _teardown(master, ctx)
    asyncio.run(run())


FULL = EngineStats(kv_total=1000, kv_used=999, kv_cached=0, running=1, waiting=0)


def test_a_request_no_decode_node_has_room_for_is_held_and_placed_when_one_reports_room():
    async def run():
        master, ctx, prefill, (decode,) = await _setup()
        try:
            await decode.send(StepOutputs([], FULL))  # its last report: 1 KV token free
            stream = asyncio.create_task(_collect(master.generate("r", [5, 6, 7], SamplingParams())))
            await _prefill_first_token(prefill, 1)
            with pytest.raises(asyncio.TimeoutError):  # held: the decode node is not asked
                await decode.recv(timeout=0.3)
            assert list(master.held) == ["r"] and master.kv_by_role()["decode"]["held_requests"] == 1
            await decode.send(StepOutputs([], STATS))  # a request of its finished: room again
            msg = await decode.recv()
            assert isinstance(msg, ReceiveKV) and msg.rid == "r" and not master.held
            # it had no room after all (its report was stale): held again, asked again after its next report
            await decode.send(KVRefused("r"))
            with pytest.raises(asyncio.TimeoutError):
                await decode.recv(timeout=0.8)  # the master's periodic retry does not ask a node that refused
            assert list(master.held) == ["r"]
            await decode.send(StepOutputs([], STATS))
            msg = await decode.recv()
            assert isinstance(msg, ReceiveKV) and msg.rid == "r"
            await decode.send(KVAccepted("r"))
            assert isinstance(await prefill.recv(), SendKV)
            await decode.send(StepOutputs([TokenOutput("r", 2, finished=True, finish_reason="stop")], STATS))
            outs = await asyncio.wait_for(stream, 5)
            assert [o.token_id for o in outs] == [7, 2] and outs[-1].error is None
        finally:
            await _teardown(master, ctx)
    asyncio.run(run())


def test_a_held_request_ends_503_after_the_hold_timeout_and_the_prefill_node_frees_it(monkeypatch):
    monkeypatch.setattr(master_module, "HEARTBEAT_S", 0.1)

    async def run():
        master, ctx, prefill, (decode,) = await _setup(hold_timeout=0.5)
        try:
            await decode.send(StepOutputs([], FULL))
            started = asyncio.get_running_loop().time()
            stream = asyncio.create_task(_collect(master.generate("r", [5, 6, 7], SamplingParams())))
            await _prefill_first_token(prefill, 1)
            outs = await asyncio.wait_for(stream, 5)
            assert asyncio.get_running_loop().time() - started >= 0.5
            assert outs[-1].error.kind == "unavailable" and "--pd_hold_timeout 0.5s" in outs[-1].error.message
            abort = await prefill.recv()
            assert isinstance(abort, AbortRequest) and abort.rid == "r" and not master.held
        finally:
            await _teardown(master, ctx)
    asyncio.run(run())


def test_a_request_larger_than_every_decode_pool_ends_at_once_as_the_clients_and_is_not_held():
    async def run():
        master, ctx, prefill, (decode,) = await _setup(hold_timeout=30.0)
        try:
            stream = asyncio.create_task(_collect(master.generate("r", [5, 6, 7], SamplingParams())))
            msg = await prefill.recv()
            await prefill.send(StepOutputs([TokenOutput(msg.rid, 7, prompt_tokens=1500)], STATS))
            await prefill.send(KVReady(msg.rid, 7, 1500, 0, None))  # the decode node's pool holds 1000
            outs = await asyncio.wait_for(stream, 5)  # not the 30 s hold
            assert outs[-1].error.kind == "client" and "largest: 1000 tokens" in outs[-1].error.message
            assert isinstance(await prefill.recv(), AbortRequest) and not master.held
        finally:
            await _teardown(master, ctx)
    asyncio.run(run())


def test_kv_totals_sum_every_registered_node_per_role():
    async def run():
        master, ctx, prefill, decodes = await _setup(n_decode=2)
        try:
            assert master.info.max_total_token_num == 3000 and master.info.max_model_len == 512
            await decodes[0].send(StepOutputs([], FULL))
            for _ in range(50):
                if master.nodes["decode-0"].reg.stats == FULL:
                    break
                await asyncio.sleep(0.02)
            by_role = master.kv_by_role()
            assert by_role["prefill"] == {"nodes": 1, "kv_total": 1000, "kv_used": 0, "kv_cached": 0}
            assert by_role["decode"] == {"nodes": 2, "kv_total": 2000, "kv_used": 999, "kv_cached": 0,
                                         "held_requests": 0}
            assert master.stats.kv_total == 3000 and master.stats.kv_used == 999
        finally:
            await _teardown(master, ctx)
    asyncio.run(run())


def test_a_node_whose_tp_differs_from_the_other_roles_is_refused():
    async def run():
        master, ctx, prefill, _ = await _setup()
        try:
            other = FakeNode(ctx, int(master.address.rsplit(":", 1)[1]), "decode-tp2", "decode")
            other.reg.tp = 2
            await other.register()
            refused = await other.recv()
            assert isinstance(refused, RegisterRefused) and "--tp 2" in refused.reason and "--tp 1" in refused.reason
            assert "decode-tp2" not in master.nodes
        finally:
            await _teardown(master, ctx)
    asyncio.run(run())
