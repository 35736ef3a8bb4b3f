"""Messages between the API process and the engine process (pickled over zmq).

Plain dataclasses with no torch types, so the API side imports nothing heavy.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from lightllm.models.vision.layout import ImageLayout


@dataclass
class EngineConfig:
    """Everything the engine process needs to start (picklable). The server derives it from its ServerArgs
    (server/args.py), whose flags take these defaults: one home for each."""

    model_path: str
    data_type: str = "auto"
    max_total_token_num: int | None = None
    mem_fraction: float | None = None
    batch_max_tokens: int | None = None
    chunked_prefill_size: int = 512
    disable_chunked_prefill: bool = False
    running_max_req_size: int = 256
    max_req_total_len: int = 16384
    eos_id: list[int] | None = None
    disable_dynamic_prompt_cache: bool = False
    router_max_new_token_len: int = 512
    grammar_backend: str = "xgrammar"
    device: str | None = None
    seed: int = 0
    quant_type: str = "auto"
    kv_cache_dtype: str = "auto"
    # quantized linears (models/quant/policy.py), fixed per server: int8 activation levels on every call, and
    # the opt-in dense bf16 copy's row bound (0: one stored form per matrix)
    act_levels: int = 1
    dense_bf16_min_rows: int = 0
    spec_ngram_tokens: int = 5  # prompt-lookup speculative draft length (0: off)
    spec_max_decodes: int = 1  # draft only while at most this many requests decode
    # tensor parallelism (LightLLM's flags): ranks over `nnodes` machines meeting at nccl_host:nccl_port
    tp: int = 1
    nnodes: int = 1
    nccl_host: str = "127.0.0.1"
    nccl_port: int = 28765
    # applied where the engine process and worker ranks start (entry.py, distributed.py); an Engine built in
    # another process keeps that process's kernel setting
    cpu_kernels: bool = True  # the fused C kernels on CPU (False: the PyTorch path)
    tile_cache: bool = True  # packed tiles cached on disk (models/quant/tile_cache.py)
    tile_cache_dir: str | None = None  # where (None: the cache directory's tiles/)
    engine_threads: int | None = None  # cores divided among this machine's ranks (None: all of them)
    cache_capacity: int = 200  # images whose vision-encoder output is kept (LightLLM's flag; 0: none)
    mmproj: str | None = None  # llama.cpp's vision projector GGUF for a GGUF language model (models/vision/mmproj.py)
    # LoRA adapters (engine/lora.py): NAME=PATH folders served at start, adapters resident at once, largest rank
    lora_modules: list[str] = field(default_factory=list)
    max_loras: int = 4
    max_lora_rank: int = 64
    lora_dtype: str = "auto"  # adapters' storage: auto (the model's dtype), float32, bfloat16


GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar", "structural_tag", "token_ids"]


@dataclass(frozen=True)
class GrammarSpec:
    """What constrained decoding must produce (one constraint per request):
    - json_schema: a JSON value matching `schema` (`strict`: objects take no properties the schema does not
      name; `any_whitespace`: whitespace allowed between JSON tokens, else compact JSON);
    - json_object: any JSON object;
    - regex: text matching `text` (xgrammar's regex dialect: no lookaround, no backreferences);
    - choice: exactly one of `choices`;
    - grammar: text in `text`'s grammar, GBNF/EBNF with a `root` rule (llama.cpp's dialect, as xgrammar reads
      it) or Lark with a `start` rule when the text has no `::=`;
    - structural_tag: free text with tagged regions, `text` being xgrammar's structural tag JSON;
    - token_ids: every token one of `token_ids` (a logits mask, no grammar)."""

    kind: GrammarKind
    schema: dict[str, Any] | None = None
    text: str | None = None
    choices: tuple[str, ...] = ()
    token_ids: tuple[int, ...] = ()
    strict: bool = True
    any_whitespace: bool = False

    @classmethod
    def json_schema(cls, schema: dict[str, Any], strict: bool = True, any_whitespace: bool = False) -> "GrammarSpec":
        return cls("json_schema", schema=schema, strict=strict, any_whitespace=any_whitespace)

    @classmethod
    def json_object(cls) -> "GrammarSpec":
        return cls("json_object")

    @property
    def pattern(self) -> str | None:
        return self.text if self.kind == "regex" else None

    def cache_key(self) -> str:
        """The text a compiled grammar is cached under (equal keys compile to the same grammar)."""
        if self.kind == "json_schema":
            body = json.dumps(self.schema, sort_keys=True, separators=(",", ":"))
            return f"json_schema:{int(self.strict)}{int(self.any_whitespace)}:{body}"
        if self.kind == "choice":
            return "choice:" + json.dumps(list(self.choices), ensure_ascii=False)
        if self.kind == "token_ids":
            return "token_ids:" + ",".join(map(str, self.token_ids))
        return f"{self.kind}:{self.text or ''}"


@dataclass(frozen=True)
class ReasoningGate:
    """Constrained output from a thinking model: the model thinks freely and the grammar applies from the
    token after the thinking block's end tag (`end`, its token ids). `in_block`: the output starts inside the
    block (the prompt opened it); otherwise the output may open one with `start`'s tokens as its first
    tokens, or the grammar applies from the first token."""

    start: tuple[int, ...]
    end: tuple[int, ...]
    in_block: bool


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k >= 0: sampled token's logprob plus top-k alternatives
    grammar: GrammarSpec | None = None
    grammar_gate: ReasoningGate | None = None  # the grammar waits for the end of the thinking block
    lora: str | None = None  # the LoRA adapter the request runs on (engine/lora.py); None: the base model

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1


def length_problem(prompt_len: int, max_new_tokens: int | None, max_model_len: int,
                   new_tokens_param: str = "max_tokens") -> str | None:
    """The one home of the request length limits (the API checks them to answer 400, the engine again
    for requests that reach it directly): what is wrong, or None."""
    if prompt_len == 0:
        return "the prompt is empty"
    if prompt_len >= max_model_len:
        return (f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
                f"{prompt_len} tokens; reduce its length.")
    if max_new_tokens is not None and prompt_len + max_new_tokens > max_model_len:
        return (f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_len + max_new_tokens} tokens ({prompt_len} in the prompt, {max_new_tokens} for the "
                f"completion). Reduce the prompt or {new_tokens_param}.")
    return None


@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt: its encoded file (the engine decodes and preprocesses it) and the run of
    placeholder tokens whose input embeddings its vision encoder's output replaces."""

    data: bytes
    digest: str  # sha256 of `data`: tells images apart in the prefix cache and the encoder cache
    offset: int  # the first placeholder token's prompt position
    length: int  # placeholder tokens (ImageLayout.tokens_for the image's size)

    @property
    def cache_token(self) -> int:
        """What its placeholder tokens are in the prefix cache's keys: a value from the digest, negative so
        it is never a token id (SGLang's pad values from the image hash): prompts that differ only in an
        image share no KV."""
        return -1 - int(self.digest[:15], 16)


@dataclass
class AddRequest:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    images: list[ImageInput] = field(default_factory=list)  # in prompt order, their token runs apart


LORA_NAME_PATTERN = r"^[A-Za-z0-9_.:@+/-]+$"  # an adapter's name (the same in JSON Schema's and Python's regex)


def parse_lora_modules(specs: list[str]) -> dict[str, str]:
    """--lora_modules' NAME=PATH items as {name: path} (ValueError says which item is malformed)."""
    modules: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not re.match(LORA_NAME_PATTERN, name) or not path:
            raise ValueError(f"--lora_modules item {spec!r} is not NAME=PATH (NAME: letters, digits and . _ : @ + / -)")
        if name in modules:
            raise ValueError(f"--lora_modules names {name!r} twice")
        modules[name] = path
    return modules


@dataclass
class LoadLora:
    """Register the PEFT adapter folder `path` as `name` (vLLM's /v1/load_lora_adapter)."""

    token: int  # pairs the reply with the call
    name: str
    path: str


@dataclass
class UnloadLora:
    """Forget adapter `name`; requests running on it finish on the weights they hold."""

    token: int
    name: str


@dataclass
class LoraReply:
    token: int
    error: str | None = None  # why the load / unload was refused; None: done
    not_found: bool = False  # the refusal is an unknown adapter name


@dataclass
class AbortRequest:
    rid: str


@dataclass
class FlushCache:
    """Drop every prefix-cache entry no running request uses (SGLang's /flush_cache)."""

    token: int  # pairs the reply with the call


@dataclass
class CacheFlushed:
    token: int
    freed_tokens: int  # KV tokens returned to the pool


@dataclass
class Shutdown:
    """The API process is stopping: the engine ends its loop and exits."""


ErrorKind = Literal["client", "server", "unavailable"]


@dataclass(frozen=True)
class EngineError:
    """Why the engine ended a request abnormally. `client`: the request cannot be served as sent (the API
    answers 400); `server`: a fault on our side (500); `unavailable`: overloaded or the engine is down,
    retry later (503)."""

    kind: ErrorKind
    message: str


@dataclass
class TokenOutput:
    rid: str
    token_id: int | None  # None for an output that only reports an error or abort
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: EngineError | None = None
    stop_token: bool = False  # the sampled token is the stop/EOS token that ended the request (not text)


@dataclass
class EngineStats:
    kv_total: int
    kv_used: int
    kv_cached: int  # tokens held only by the prefix cache
    running: int
    waiting: int
    draft_tokens: int = 0  # speculative tokens proposed since start
    draft_accepted: int = 0  # of those, verified and kept
    grammar_compiled: int = 0  # grammars compiled since start (constrained decoding)
    grammar_cache_hits: int = 0  # constrained requests served by an already compiled (or compiling) grammar
    lora_resident: int = 0  # LoRA adapters held in memory (at most --max_loras)
    lora_resident_bytes: int = 0  # their float32 weights
    lora_loads: int = 0  # adapter folders read since start (registrations and reloads after eviction)
    lora_evictions: int = 0  # resident adapters dropped for another (least recently used)

    @property
    def kv_held_by_requests(self) -> int:
        """KV tokens in use by requests (what the prefix cache alone keeps is evictable)."""
        return self.kv_used - self.kv_cached


@dataclass
class StepOutputs:
    outputs: list[TokenOutput]
    stats: EngineStats


@dataclass
class EngineReady:
    model_name: str
    architecture: str
    dtype: str
    device: str
    max_total_token_num: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    # start-up memory breakdown in bytes (engine/memory.py): weights, kv_cache, activations, runtime, total
    memory: dict[str, int] = field(default_factory=dict)
    kv_cache_rule: str = ""  # how the KV pool's size was reached
    # a vision-language model: where its images go in a prompt (None: a text-only model)
    image_layout: ImageLayout | None = None


@dataclass
class EngineFailed:
    error: str
