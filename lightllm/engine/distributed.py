"""Tensor parallelism over torch.distributed (gloo on CPU, NCCL on CUDA).

Rank 0 is the engine process: it schedules, samples and talks to the API process. Every other rank is a
worker that holds its shard of the weights and of the KV cache (its KV heads) and runs the same forward
passes: rank 0 broadcasts each step's inputs (token ids, positions, attention metadata), the ranks meet in
the forward's all-reduces, and only rank 0 samples. Ranks of node 0 are started by the engine process;
with `--nnodes`, every other node runs `python -m lightllm.server.api_server ... --node_rank K`, which
starts that node's ranks only (LightLLM's flags).

Workers are plain subprocesses (the engine process is daemonic and may not own multiprocessing children);
each dies with its parent (PR_SET_PDEATHSIG), and a worker whose peer went away fails in its next
collective, so a dead engine leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from lightllm.engine.protocol import EngineConfig, Shutdown
from lightllm.host import die_with_parent

logger = logging.getLogger("lightllm.tp")

# The plan broadcast also waits while the server is idle, so it must not time out.
_IDLE_TIMEOUT = timedelta(days=365)


@dataclass
class StepInputs:
    """One forward pass, as every rank runs it."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: object  # AttentionMetadata, self-contained (no reference to rank 0's req_to_token table)
    logit_rows: torch.Tensor
    # LoRA (engine/lora.py): adapter loads/drops every rank applies first, then the step's (adapter key or
    # None, first row, rows) runs; None: no row has an adapter
    lora_ops: list = field(default_factory=list)
    lora_runs: list | None = None
    embeds: object | None = None  # InputEmbeds: the step's image rows, from rank 0's vision encoder


def local_ranks(cfg: EngineConfig, node_rank: int) -> range:
    per_node = cfg.tp // cfg.nnodes
    return range(node_rank * per_node, (node_rank + 1) * per_node)


def threads_per_rank(cfg: EngineConfig) -> int:
    """This machine's cores (or --engine_threads) divided among its ranks."""
    cores = cfg.engine_threads or os.cpu_count() or 1
    return max(1, cores // (cfg.tp // cfg.nnodes))


def init_group(cfg: EngineConfig, rank: int, device: torch.device) -> None:
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{cfg.nccl_host}:{cfg.nccl_port}", world_size=cfg.tp,
                            rank=rank, timeout=_IDLE_TIMEOUT)
    logger.info("rank %d/%d joined the %s group at %s:%d", rank, cfg.tp, backend, cfg.nccl_host, cfg.nccl_port)


def start_workers(cfg: EngineConfig, ranks: range, log_level: str) -> list[subprocess.Popen]:
    """Start worker ranks as subprocesses of this one; the config travels pickled over stdin."""
    procs = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_rank(cfg)))
    for rank in ranks:
        proc = subprocess.Popen([sys.executable, "-m", "lightllm.engine.distributed"], stdin=subprocess.PIPE, env=env)
        proc.stdin.write(pickle.dumps((cfg, rank, log_level)))
        proc.stdin.close()
        procs.append(proc)
    return procs


class StepBroadcaster:
    """Rank 0's side: send each step's inputs (or the stop signal) to the workers."""

    def send(self, step: StepInputs | Shutdown) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([step], src=0)

    def stop(self) -> None:
        self.send(Shutdown())


def _on(embeds: object | None, device: torch.device) -> object | None:
    """A step's InputEmbeds on this rank's device."""
    if embeds is None:
        return None
    return type(embeds)(embeds.rows.to(device), embeds.values.to(device))


def run_worker(cfg: EngineConfig, rank: int) -> None:
    """A worker rank: load the shard, size the KV cache as rank 0 says, then run every step rank 0 sends."""
    import torch.distributed as dist

    from lightllm.engine.model_setup import build_model, configure_process, model_config_for, pick_device
    from lightllm.engine.kv_cache import TokenKVPool
    from lightllm.engine.lora import LoraReplica, LoraSync, lora_dtype  # (this module runs as __main__ here)
    from lightllm.models.loading.sharding import TPShard

    torch.set_num_threads(threads_per_rank(cfg))
    configure_process(cfg)
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    init_group(cfg, rank, device)
    full_config = model_config_for(cfg)
    model, kv_dtype = build_model(cfg, full_config, rank, device)
    # mirrors rank 0's adapters
    lora = LoraReplica(full_config, TPShard(rank, cfg.tp), lora_dtype(cfg.lora_dtype, model.dtype))
    sizes = [None]
    dist.broadcast_object_list(sizes, src=0)  # the KV token budget rank 0 chose
    pool = TokenKVPool(sizes[0], model.config.num_layers, model.config.num_kv_heads, model.config.head_dim,
                       kv_dtype, device)
    logger.info("rank %d ready: %d KV tokens", rank, sizes[0])
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        step: StepInputs | Shutdown = message[0]
        if isinstance(step, Shutdown):
            break
        if isinstance(step, LoraSync):
            lora.apply(step.lora_ops)
            continue
        if not isinstance(step, StepInputs):  # other work every rank does in turn (engine/kv_transfer.py's PD shards)
            step.on_worker(rank, pool, device)
            continue
        lora.apply(step.lora_ops)
        model.forward(step.input_ids.to(device), step.positions.to(device), step.meta, pool.k, pool.v,
                      step.logit_rows.to(device), lora.batch(step.lora_runs), embeds=_on(step.embeds, device))
    dist.destroy_process_group()


def worker_entry() -> None:
    die_with_parent()
    cfg, rank, log_level = pickle.loads(sys.stdin.buffer.read())
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    try:
        run_worker(cfg, rank)
    except RuntimeError as exc:
        if "closed by peer" in str(exc) or "reset by peer" in str(exc):
            # rank 0 went away without a stop message (its process was killed): nothing left to serve
            logger.info("rank %d: the group's rank 0 is gone; exiting", rank)
            return
        logger.exception("rank %d failed", rank)
        sys.exit(1)
    except Exception:
        logger.exception("rank %d failed", rank)
        sys.exit(1)


if __name__ == "__main__":
    # run the imported module's code, not this __main__ copy: the messages rank 0 pickles unpickle as the
    # imported module's classes, and isinstance checks against __main__'s would never match
    from lightllm.engine.distributed import worker_entry as _entry

    _entry()
