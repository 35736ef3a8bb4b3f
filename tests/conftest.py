"""Shared fixtures: one real server process per model per test session, and tiny random HF models."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackProcess:
    """A process in its own session, logged to a file, waited for until `_ready()`, stopped with its children."""

    def __init__(self, cmd: list[str], log_path: Path, timeout: float, env: dict[str, str] | None = None,
                 what: str = "server"):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})), start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(f"{what} exited early:\n{log_path.read_text()[-4000:]}")
            if self._ready():
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{what} was not ready in {timeout}s:\n{log_path.read_text()[-4000:]}")

    def _ready(self) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


class ServerProcess(LoopbackProcess):
    """`python -m lightllm.server.api_server` on loopback, stopped (with its engine) at the end."""

    def __init__(self, args: list[str], log_path: Path, timeout: float = 240.0, env: dict[str, str] | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        # the key its own requests (token_load, wait_idle) and the tests' send when it runs with one
        self.headers = {"Authorization": f"Bearer {args[args.index('--api_key') + 1]}"} if "--api_key" in args else {}
        cmd = [sys.executable, "-m", "lightllm.server.api_server", "--host", "127.0.0.1", "--port", str(self.port), *args]
        super().__init__(cmd, log_path, timeout, env)

    def _ready(self) -> bool:
        try:
            return requests.get(self.base_url + "/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def token_load(self) -> dict:
        return requests.get(self.base_url + "/token_load", headers=self.headers, timeout=5).json()

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """Wait until no request holds KV (the prefix cache may still keep finished prompts)."""
        deadline = time.time() + timeout
        load = self.token_load()
        while time.time() < deadline:
            load = self.token_load()
            if load["running"] == 0 and load["waiting"] == 0 and load["kv_used_by_requests"] == 0:
                return load
            time.sleep(0.2)
        return load


def embedded_model_path() -> str:
    """SmolLM2-135M-Instruct, the small model the tests run (installed with the package)."""
    from lightllm.models.loading.catalog import smollm2_path

    return str(smollm2_path())


@pytest.fixture(scope="session")
def smol_server(tmp_path_factory):
    """The embedded SmolLM2 model, with an API key on /v1 routes. Dense fp32 weights (`--quant_type none`):
    several tests compare token sequences exactly (against transformers, stream against non-stream under a
    seed, solo against batched), and the default int4 path's numerics shift slightly with the batch size (a
    dense bf16 GEMM takes over large batches). The default path has its own server in test_openai_api."""
    log = tmp_path_factory.mktemp("logs") / "smol_server.log"
    server = ServerProcess(["--model_dir", "smollm2", "--max_total_token_num", "30000", "--api_key", API_KEY,
                            "--max_req_total_len", "4096", "--tool_call_parser", "qwen25", "--quant_type", "none"], log)
    yield server
    server.stop()


TINY_FAMILIES = {  # family -> (transformers config class, model class, family-specific config values)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                                                          attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    # 3 layers: sliding, sliding, global (pattern 3), sliding layers with their own rope base
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, sliding_window=None)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                                moe_intermediate_size=48, norm_topk_prob=False)),
}


def build_tiny_model(path: Path, arch: str, **overrides) -> Path:
    """Save a tiny random HF model (safetensors) of the given family; returns its directory."""
    import torch
    import transformers

    config_name, model_name, family_values = TINY_FAMILIES[arch]
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
                  eos_token_id=2)
    common.update(family_values)
    common.update(overrides)
    torch.manual_seed(1234)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**common)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # norms start at ones (Gemma: zeros); make them matter
                param.normal_(float(param.mean()), 0.3)
            elif name.endswith("proj.bias"):  # Qwen2's q/k/v biases start at zero
                param.normal_(0, 0.5)
            elif name.endswith(("gate.weight",)) and "experts" not in name:
                param.normal_(0, 1.0)  # a router with clear preferences, so top-k is not decided by rounding
    model.save_pretrained(path)
    return path


def record_logits(engine) -> dict[str, list]:
    """From now on, each request's logits rows (tensors) as the sampler receives them, by request id (filled as
    the engine steps)."""
    recorded: dict[str, list] = {}
    sampler = engine.runner.sampler

    def recording_sampler(logits, seqs):
        for row, seq in zip(logits, seqs):
            recorded.setdefault(seq.rid, []).append(row.clone())
        return sampler(logits, seqs)

    engine.runner.sampler = recording_sampler
    return recorded


def run_engine_recording_logits(model_dir, prompts, steps: int = 9, cached_tokens: dict | None = None,
                                **engine_kwargs):
    """Greedy-run prompts through an Engine (the first one alone for a step, then batched), recording the
    logits each sampling step saw. Returns (engine, generated ids per rid, logits per rid); fills
    `cached_tokens` (when given) with each request's prefix-cache hit count."""
    from lightllm.engine.engine import Engine
    from lightllm.engine.protocol import AddRequest, EngineConfig, SamplingParams

    engine_kwargs.setdefault("max_total_token_num", 1024)
    engine_kwargs.setdefault("kv_cache_dtype", "fp32")  # exact comparisons; fp16 KV has its own quality test
    engine_kwargs.setdefault("quant_type", "none")  # the checkpoint's own weights unless a test asks
    engine_kwargs.setdefault("spec_ngram_tokens", 0)  # one token per step, so each step's logits are recorded
    engine = Engine(EngineConfig(model_path=str(model_dir), **engine_kwargs))
    recorded = record_logits(engine)
    outputs: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(AddRequest(str(i), prompt, SamplingParams(max_new_tokens=steps, temperature=0.0,
                                                                     ignore_eos=True)))
        if i == 0:  # let the first request start before the others join the batch
            for out in engine.step():
                outputs.setdefault(out.rid, []).append(out.token_id)
    while engine.scheduler.has_work():
        for out in engine.step():
            outputs.setdefault(out.rid, []).append(out.token_id)
            if cached_tokens is not None:
                cached_tokens[out.rid] = out.cached_tokens
    return engine, outputs, recorded


@pytest.fixture(params=["fused_kernels", "pytorch"])
def model_path_kind(request, monkeypatch):
    """Run the model through the fused C kernels and through the pure-PyTorch path (CUDA's and the fallback)."""
    from lightllm.kernels import cpu as cpu_kernels

    if request.param == "fused_kernels":
        if cpu_kernels.load() is None:
            pytest.skip("no C compiler: fused CPU kernels unavailable")
    else:
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    return request.param
