"""The engine process: loads the model, owns the KV cache and runs the continuous-batching loop."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future

import torch
import zmq

from lightllm.engine.faults import FaultInjector
from lightllm.engine.grammar import AllowedTokens, GrammarFactory
from lightllm.engine.image_embedder import ImageEmbedder
from lightllm.engine.kv_cache import ReqToTokenTable, TokenKVPool
from lightllm.engine.lora import LoraManager, lora_dtype
from lightllm.engine.memory import (MemoryBreakdown, activation_bytes, process_rss_bytes, release_free_heap,
                                    tensor_bytes)
from lightllm.engine.model_setup import (build_model, build_vision, kv_budget_for, model_config_for, pick_device,
                                        pick_dtype)
from lightllm.models.loading.loader import resolve_quant_type
from lightllm.models.loading.sharding import TPShard, shard_config
from lightllm.engine.model_runner import ModelRunner
from lightllm.engine.prefix_cache import PrefixCache
from lightllm.engine.reasoning_gate import GatedGrammar
from lightllm.engine.distributed import StepBroadcaster, init_group, local_ranks, start_workers, threads_per_rank
from lightllm.engine.protocol import (AbortRequest, AddRequest, CacheFlushed, EngineConfig, EngineError, EngineFailed,
                                      EngineReady, EngineStats, ErrorKind, FlushCache, LoadLora, LoraReply, Shutdown,
                                      StepOutputs, TokenOutput, UnloadLora, length_problem, parse_lora_modules)
from lightllm.engine.sampler import Sampler
from lightllm.engine.scheduler import Scheduler
from lightllm.engine.sequence import Sequence
from lightllm.engine.speculative import SpeculativeConfig

logger = logging.getLogger("lightllm.engine")

class Engine:
    def __init__(self, cfg: EngineConfig, log_level: str = "INFO"):
        self.cfg = cfg
        runtime_bytes = process_rss_bytes()  # interpreter, PyTorch and kernels, before any weight
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)  # unseeded sampling is reproducible for a given request order
        self.dtype = pick_dtype(cfg.data_type, self.device)
        model_cfg = model_config_for(cfg)
        self.model_config = model_cfg
        self.workers = []
        broadcaster = None
        if cfg.tp > 1:
            shard_config(model_cfg, cfg.tp)  # fail before starting any worker when the model cannot split
            # node 0's other ranks load their shards while this one loads its own
            self.workers = start_workers(cfg, local_ranks(cfg, 0)[1:], log_level)
            init_group(cfg, 0, self.device)
            broadcaster = StepBroadcaster()
        self.grammars = None
        self.compiling: dict[str, tuple[Sequence, Future]] = {}  # requests waiting for their grammar
        self.encoding: dict[str, tuple[Sequence, Future]] = {}  # requests waiting for their images' encoding
        if cfg.grammar_backend != "none":
            # builds its tokenizer info on a thread the first constrained request starts: the build holds the
            # GIL for seconds (transformers' import), which would stall the first steps of every server
            self.grammars = GrammarFactory(cfg.model_path, model_cfg.vocab_size)
        self.max_model_len = min(model_cfg.max_position_embeddings, cfg.max_req_total_len)
        self.quant_type = resolve_quant_type(cfg.quant_type, cfg.model_path, self.device)
        self.model, self.kv_dtype = build_model(cfg, model_cfg, 0, self.device)
        # the vision tower (vision-language models) loads before the KV budget takes what memory is left
        self.images = ImageEmbedder(build_vision(cfg, model_cfg, self.device, self.dtype), model_cfg.name,
                                    cfg.cache_capacity)
        rank_cfg = self.model.config  # this rank's heads
        elem = torch.tensor([], dtype=self.kv_dtype).element_size()
        self.kv_budget = kv_budget_for(cfg, self.max_model_len, rank_cfg.kv_bytes_per_token(elem), self.device)
        self.kv_tokens = self.kv_budget.tokens
        if broadcaster is not None:
            import torch.distributed as dist

            dist.broadcast_object_list([self.kv_tokens], src=0)  # every rank sizes its KV shard alike
        self.pool = TokenKVPool(self.kv_tokens, rank_cfg.num_layers, rank_cfg.num_kv_heads, rank_cfg.head_dim,
                                self.kv_dtype, self.device)
        self.table = ReqToTokenTable(cfg.running_max_req_size, self.max_model_len, self.device)
        self.prefix_cache = None if cfg.disable_dynamic_prompt_cache else PrefixCache(self.pool)
        self.lora = self._start_lora(cfg, model_cfg)
        batch_max_tokens = cfg.batch_max_tokens or max(cfg.chunked_prefill_size, 2048)
        if cfg.disable_chunked_prefill:
            batch_max_tokens = max(batch_max_tokens, self.max_model_len)
        self.scheduler = Scheduler(
            self.pool, self.table, batch_max_tokens=batch_max_tokens,
            chunked_prefill_size=min(cfg.chunked_prefill_size, batch_max_tokens),
            chunked_prefill=not cfg.disable_chunked_prefill, running_max_req_size=cfg.running_max_req_size,
            max_model_len=self.max_model_len, eos_token_ids=model_cfg.eos_token_ids,
            new_token_estimate=cfg.router_max_new_token_len, prefix_cache=self.prefix_cache,
            speculative=SpeculativeConfig(cfg.spec_ngram_tokens, cfg.spec_max_decodes), lora=self.lora,
            whole_image_runs=self.model.bidirectional_images)
        self.memory = MemoryBreakdown(
            weights=tensor_bytes([self.model.weights, self.images.encoder]), kv_cache=tensor_bytes([self.pool.k, self.pool.v, self.table.table]),
            activations=activation_bytes(rank_cfg, batch_max_tokens, cfg.running_max_req_size), runtime=runtime_bytes)
        logger.info("KV cache: %s", self.kv_budget.rule)
        logger.info("memory: %s", self.memory.describe())
        self.sampler = Sampler(model_cfg.vocab_size, model_cfg.eos_token_ids, self.device)
        self.runner = ModelRunner(self.model, self.pool, self.table, self.sampler, broadcaster, self.images)
        self.runner.lora_outbox = self.lora.outbox  # tp > 1: the other ranks mirror the adapters
        self.runner.sync_lora()
        self.faults = FaultInjector.from_env()

    def _start_lora(self, cfg: EngineConfig, model_cfg) -> LoraManager:
        """The adapter registry with --lora_modules registered (a bad adapter fails the start, naming it);
        under tensor parallelism this rank holds its shard of each adapter (models/lora/adapter.py)."""
        modules = parse_lora_modules(cfg.lora_modules)
        moe = any(lw.gate_up is None for lw in self.model.weights.layers)
        manager = LoraManager(model_cfg, cfg.max_loras, cfg.max_lora_rank, moe_layers=moe,
                              shard=TPShard(0, cfg.tp) if cfg.tp > 1 else None,
                              dtype=lora_dtype(cfg.lora_dtype, self.dtype))
        for name, path in modules.items():
            manager.register(name, path)
        return manager

    def load_lora(self, msg: LoadLora) -> LoraReply:
        try:
            self.lora.register(msg.name, msg.path)
        except ValueError as exc:  # AdapterError: what does not fit, or the name is taken
            return LoraReply(msg.token, str(exc))
        self.runner.sync_lora()
        return LoraReply(msg.token)

    def unload_lora(self, msg: UnloadLora) -> LoraReply:
        try:
            self.lora.unregister(msg.name)
        except KeyError:
            return LoraReply(msg.token, f"no LoRA adapter named {msg.name!r} is loaded", not_found=True)
        return LoraReply(msg.token)

    def shutdown(self) -> None:
        """Stop the worker ranks (they exit after the stop message) and leave the group."""
        if self.runner.broadcaster is not None:
            import torch.distributed as dist

            self.runner.broadcaster.stop()
            for proc in self.workers:
                proc.wait(timeout=30)
            dist.destroy_process_group()
            self.runner.broadcaster = None

    def ready_message(self) -> EngineReady:
        return EngineReady(model_name=self.model_config.name, architecture=self.model_config.architecture,
                           dtype=str(self.dtype).replace("torch.", ""), device=str(self.device),
                           max_total_token_num=self.kv_tokens, max_model_len=self.max_model_len,
                           vocab_size=self.model_config.vocab_size, eos_token_ids=self.model_config.eos_token_ids,
                           memory=self.memory.as_dict(), kv_cache_rule=self.kv_budget.rule,
                           image_layout=self.images.layout)

    def stats(self) -> EngineStats:
        cached = self.prefix_cache.evictable() if self.prefix_cache else 0
        return EngineStats(kv_total=self.pool.size, kv_used=self.pool.num_used, kv_cached=cached,
                           running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                           draft_tokens=self.scheduler.draft_stats["proposed"],
                           draft_accepted=self.scheduler.draft_stats["accepted"],
                           grammar_compiled=self.grammars.stats["compiled"] if self.grammars else 0,
                           grammar_cache_hits=self.grammars.stats["cache_hits"] if self.grammars else 0,
                           lora_resident=len(self.lora.resident),
                           lora_resident_bytes=sum(a.nbytes for a in self.lora.resident.values()),
                           lora_loads=self.lora.loads, lora_evictions=self.lora.evictions)

    # ------------------------------------------------------------------------------------ requests

    def add_request(self, req: AddRequest) -> TokenOutput | None:
        """Queue a request; returns an error output instead when it cannot be served."""
        n = len(req.prompt_ids)

        def refuse(message: str, kind: ErrorKind = "client") -> TokenOutput:
            return TokenOutput(req.rid, None, finished=True, finish_reason="abort", prompt_tokens=n,
                               error=EngineError(kind, message))

        problem = length_problem(n, req.params.max_new_tokens, self.max_model_len)
        if problem is not None:
            return refuse(problem)
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in req.prompt_ids):
            return refuse(f"prompt holds token ids outside the vocabulary (0..{vocab - 1})")
        params = req.params
        if any(t < 0 or t >= vocab for t in list(params.logit_bias) + list(params.stop_token_ids)):
            return refuse(f"logit_bias / stop_token_ids name token ids outside the vocabulary (0..{vocab - 1})")
        if (problem := self.images.problem(req.prompt_ids, req.images)) is not None:
            return refuse(problem)
        seq = Sequence(req.rid, list(req.prompt_ids), params, images=list(req.images))
        if params.lora is not None:
            if params.lora not in self.lora.registered:
                return refuse(f"LoRA adapter {params.lora!r} is not loaded")
            seq.lora_name, seq.lora_uid = params.lora, self.lora.uid(params.lora)
        if params.seed is not None:
            # any integer is a valid seed: folded into the 64 bits torch takes
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)
        if params.grammar is not None:
            if params.grammar.kind == "token_ids":  # a plain logits mask: no grammar engine needed
                if any(t < 0 or t >= vocab for t in params.grammar.token_ids):
                    return refuse(f"allowed_token_ids name token ids outside the vocabulary (0..{vocab - 1})")
                seq.grammar = AllowedTokens(params.grammar.token_ids, vocab)
                self._enqueue(seq)
                return None
            try:
                compiled = self._grammar_factory().compile(params.grammar)
            except (ValueError, RuntimeError) as exc:
                return self._grammar_refusal(seq, exc)
            if not compiled.done():  # compiles on the grammar thread; the request waits outside the scheduler
                self.compiling[req.rid] = (seq, compiled)
                return None
            return self._admit_constrained(seq, compiled)
        self._enqueue(seq)
        return None

    def _enqueue(self, seq: Sequence) -> None:
        """Into the scheduler; a request with images first waits outside it while the vision encoder runs on its
        own thread (engine/image_embedder.py), so the running requests' steps go on meanwhile."""
        if seq.images:
            self.encoding[seq.rid] = (seq, self.images.prepare_async(seq.images))
        else:
            self.scheduler.add(seq)

    def admit_waiting(self) -> list[TokenOutput]:
        """Queue the requests that were waiting outside the scheduler (for their grammar to compile or their
        images to be encoded) and are now ready; the refusals of those whose preparation failed."""
        return (self.admit_compiled() if self.compiling else []) + (self.admit_encoded() if self.encoding else [])

    def admit_encoded(self) -> list[TokenOutput]:
        """Queue the waiting requests whose images are encoded; the refusals of those whose images failed."""
        outputs = []
        for rid, (seq, encoded) in list(self.encoding.items()):
            if not encoded.done():
                continue
            del self.encoding[rid]
            failure = encoded.exception()
            problem = f"the vision encoder failed: {failure}" if failure is not None else encoded.result()
            if problem is None:
                self.scheduler.add(seq)
            else:
                outputs.append(TokenOutput(rid, None, finished=True, finish_reason="abort",
                                           prompt_tokens=len(seq.prompt_ids),
                                           error=EngineError("server" if failure else "client", problem)))
        return outputs

    def _grammar_factory(self):
        if self.grammars is None:
            raise ValueError("constrained decoding is off (--output_constraint_mode none)")
        return self.grammars

    def _grammar_refusal(self, seq: Sequence, exc: BaseException) -> TokenOutput:
        kind: ErrorKind = "client"
        message = f"invalid grammar: {exc}"  # a spec the grammar engine rejects
        if self.grammars is not None and self.grammars.failed:  # the grammar engine itself is broken
            kind, message = "server", f"constrained decoding unavailable: {exc}"
        return TokenOutput(seq.rid, None, finished=True, finish_reason="abort", prompt_tokens=len(seq.prompt_ids),
                           error=EngineError(kind, message))

    def _admit_constrained(self, seq: Sequence, compiled) -> TokenOutput | None:
        """Queue a request whose grammar compilation is done (its refusal when it failed)."""
        try:
            seq.grammar = self.grammars.matcher(seq.params.grammar, compiled.result())
            if not seq.grammar.can_start():
                raise ValueError("no token of this model's vocabulary can start text that the constraint accepts")
            if seq.params.grammar_gate is not None:  # a thinking model: the grammar starts after the thinking
                seq.grammar = GatedGrammar(seq.grammar, seq.params.grammar_gate)
        except (ValueError, RuntimeError) as exc:
            return self._grammar_refusal(seq, exc)
        self._enqueue(seq)
        return None

    def admit_compiled(self) -> list[TokenOutput]:
        """Queue the waiting requests whose grammar is now compiled; the refusals of those that failed."""
        if not self.compiling:
            return []
        self.grammars.collect()
        outputs = []
        for rid, (seq, compiled) in list(self.compiling.items()):
            if compiled.done():
                del self.compiling[rid]
                refusal = self._admit_constrained(seq, compiled)
                if refusal is not None:
                    outputs.append(refusal)
        return outputs

    def abort(self, rid: str) -> None:
        if self.compiling.pop(rid, None) is None and self.encoding.pop(rid, None) is None:
            self.scheduler.abort(rid)

    def step(self) -> list[TokenOutput]:
        plan = self.scheduler.schedule()
        if not plan:
            return self.scheduler.process_results([], {})
        try:
            if self.faults is not None:
                self.faults.before_step()
            sampled = self.runner.execute(plan)
        except Exception as exc:  # fail this step's requests, keep the engine alive for the others
            logger.exception("step failed for requests %s", [c.seq.rid for c in plan])
            return self.scheduler.fail_step(plan, EngineError("server", f"model step failed: {type(exc).__name__}: {exc}"))
        return self.scheduler.process_results(plan, sampled)


def run_engine(cfg: EngineConfig, in_addr: str, out_addr: str, log_level: str = "INFO") -> None:
    """Entry point of the engine process."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = threads_per_rank(cfg)
    torch.set_num_threads(threads)
    if cfg.tp > 1:  # the fused kernels' OpenMP pool too (read when they load), so ranks do not oversubscribe
        os.environ["OMP_NUM_THREADS"] = str(threads)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(in_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(out_addr)
    try:
        start = time.perf_counter()
        # Ready before the grammar engine is built: the first constrained request starts it (engine/grammar.py).
        engine = Engine(cfg, log_level)
        logger.info("model loaded in %.1fs (quant_type=%s, kv_cache_dtype=%s, fused CPU kernels %s)",
                    time.perf_counter() - start, engine.quant_type, str(engine.kv_dtype).replace("torch.", ""),
                    "on" if engine.model.kernels is not None else "off")
    except Exception as exc:
        logger.exception("engine failed to start")
        outbox.send_pyobj(EngineFailed(f"{type(exc).__name__}: {exc}"))
        return
    outbox.send_pyobj(engine.ready_message())
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    busy = False  # steps ran since the engine was last idle
    while True:
        if busy and not engine.scheduler.has_work():  # just went idle: return what the steps freed to the OS
            release_free_heap()
            busy = False
        # requests waiting for a grammar: look again every few ms (compilation runs on its own thread)
        timeout = 0 if engine.scheduler.has_work() else (5 if engine.compiling or engine.encoding else None)
        outputs: list[TokenOutput] = []
        changed = False
        while poller.poll(timeout):
            msg = inbox.recv_pyobj()
            changed = True
            if isinstance(msg, AddRequest):
                try:
                    error = engine.add_request(msg)
                except Exception as exc:  # one bad request must not take the engine (and everyone's work) down
                    logger.exception("could not queue request %s", msg.rid)
                    engine.scheduler.abort(msg.rid)
                    error = TokenOutput(msg.rid, None, finished=True, finish_reason="abort",
                                        error=EngineError("server", f"could not queue the request: {exc}"))
                if error is not None:
                    outputs.append(error)
            elif isinstance(msg, AbortRequest):
                engine.abort(msg.rid)
            elif isinstance(msg, FlushCache):
                freed = engine.prefix_cache.clear() if engine.prefix_cache is not None else 0
                logger.info("prefix cache flushed: %d KV tokens freed", freed)
                outbox.send_pyobj(CacheFlushed(msg.token, freed))
            elif isinstance(msg, LoadLora):
                outbox.send_pyobj(engine.load_lora(msg))
            elif isinstance(msg, UnloadLora):
                outbox.send_pyobj(engine.unload_lora(msg))
            elif isinstance(msg, Shutdown):
                engine.shutdown()
                return
            else:  # a message this engine does not know: say so instead of dropping it silently
                logger.error("ignoring unknown message %s from the API process", type(msg).__name__)
            timeout = 0
        refused = engine.admit_waiting()
        outputs.extend(refused)
        changed = changed or bool(refused)
        if engine.scheduler.has_work():
            outputs.extend(engine.step())
            changed = busy = True
        if changed:
            outbox.send_pyobj(StepOutputs(outputs, engine.stats()))
