"""KV transfer bandwidth between a prefill and a decode process (engine/kv_transfer.py), as PD runs it: gather
the request's rows from the pool, send over the pair's gloo group, receive, scatter into the other pool.

    python benchmarks/pd_transfer.py --layers 24 --kv_heads 2 --head_dim 64 --tokens 3000 --repeat 5

Defaults are Qwen2.5-Coder-0.5B's KV shape (fp16, as the CPU server stores it). Prints one line per repeat
and the median: end to end (gather + transfer + scatter) and the wire part alone.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch


def _pool(args: argparse.Namespace):
    from lightllm.engine.kv_cache import TokenKVPool

    return TokenKVPool(args.tokens * 2, args.layers, args.kv_heads, args.head_dim, torch.float16, torch.device("cpu"))


def _wait(transfer):
    while True:
        done = transfer.poll()
        if done:
            return done[0]
        time.sleep(0.0002)


def decode_side(args: argparse.Namespace, port_q: mp.Queue, result_q: mp.Queue) -> None:
    from lightllm.engine.kv_transfer import KVTransfer, PairGroups, empty_pages, scatter_pages

    torch.set_num_threads(1)
    pool = _pool(args)
    groups = PairGroups("decode-bench", "127.0.0.1", hosts_store=True, device=torch.device("cpu"))
    port_q.put(groups.port)
    transfer = KVTransfer(groups)
    rows = pool.alloc(args.tokens)
    for tag in range(args.repeat + 1):  # the first forms the group: not timed
        buf = empty_pages(pool, args.tokens)
        start = time.perf_counter()
        transfer.receive(f"r{tag}", buf, "prefill-bench", tag)
        done = _wait(transfer)
        wire = time.perf_counter() - start
        scatter_pages(pool, rows, done.buf)
        result_q.put((tag, wire, time.perf_counter()))
    transfer.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=3000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    from lightllm.engine.kv_transfer import KVTransfer, PairGroups, gather_pages
    from lightllm.engine.pd_messages import KVPeer

    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    port_q, result_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=decode_side, args=(args, port_q, result_q))
    proc.start()
    target = KVPeer("decode-bench", "127.0.0.1", port_q.get(timeout=60))
    pool = _pool(args)
    for layer in range(args.layers):
        pool.k[layer].normal_()
        pool.v[layer].normal_()
    rows = pool.alloc(args.tokens)
    transfer = KVTransfer(PairGroups("prefill-bench", "127.0.0.1", hosts_store=False, device=torch.device("cpu")))
    nbytes = 2 * args.layers * args.tokens * args.kv_heads * args.head_dim * 2
    totals, wires = [], []
    for tag in range(args.repeat + 1):
        start = time.perf_counter()
        buf = gather_pages(pool, rows)
        transfer.send(f"r{tag}", buf, target, tag)
        _wait(transfer)
        _, wire, scattered = result_q.get(timeout=60)
        if tag == 0:
            continue
        totals.append(scattered - start)
        wires.append(wire)
        print(f"{args.tokens} tokens, {nbytes / 2**20:.1f} MiB: end to end {totals[-1] * 1e3:.1f} ms "
              f"({nbytes / totals[-1] / 1e9:.2f} GB/s), receive wait (gather + wire) {wire * 1e3:.1f} ms")
    transfer.stop()
    proc.join(30)
    total, wire = statistics.median(totals), statistics.median(wires)
    print(f"median: end to end {total * 1e3:.1f} ms = {nbytes / total / 1e9:.2f} GB/s "
          f"({total * 1e6 / args.tokens:.1f} us per token); receive wait (gather + wire) {wire * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
