"""LightLLM's native API: POST /generate and POST /generate_stream."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ConfigDict, Field, ValidationError

from lightllm.engine.protocol import GrammarSpec, ImageInput, SamplingParams
from lightllm.server import structured
from lightllm.server.errors import APIError, stream_error_event
from lightllm.server.ids import new_id
from lightllm.server.limits import MAX_N, MAX_STOP_SEQUENCES
from lightllm.server.multimodal import check_count, encode_with_images, layout_text, load_base64_image
from lightllm.server.openai.protocol import (LogitBias, NonEmptyText, Seed, StopList, TokenId, TokenIds,
                                            _Lenient)
from lightllm.server.openapi import json_body
from lightllm.server.state import ServerState, collect_all, until_disconnect

router = APIRouter()


class GenerateParameters(_Lenient):  # unknown keys ignored, ours strictly typed (1.0 is an integer)

    do_sample: bool = False
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: Seed | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = Field(1.0, gt=0.0)
    max_new_tokens: int = Field(16, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_sequences: StopList | str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = None
    skip_special_tokens: bool = True
    add_special_tokens: bool = True
    logit_bias: LogitBias | None = None
    return_details: bool = False
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    # output constraints (one per request; lightllm/server/structured.py): LightLLM's names, then SGLang's
    guided_grammar: str | None = None  # GBNF/EBNF (or Lark)
    guided_json: str | dict[str, Any] | None = None  # a JSON schema
    regular_constraint: str | None = None  # a regex
    allowed_token_ids: list[TokenId] | None = None
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | dict[str, Any] | None = None
    structural_tag: str | dict[str, Any] | None = None


class GenerateStreamParameters(GenerateParameters):
    n: int = Field(1, ge=1, le=1)  # one sequence per stream


class NativeImage(_Lenient):
    type: Literal["base64"]  # LightLLM's other source types fetch (url) or name server files: not taken here
    data: str  # the image file, base64


class MultimodalParams(_Lenient):
    images: list[NativeImage] = Field(default_factory=list)


class GenerateRequest(_Lenient):
    # _encode_inputs' rule, in the document too: images go with text inputs (token ids hold no image marker)
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["multimodal_params"], "properties": {"multimodal_params": {
            "type": "object", "required": ["images"], "properties": {"images": {"minItems": 1}}}}},
        "then": {"properties": {"inputs": {"type": "string"}}}})

    inputs: NonEmptyText | TokenIds
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    # LightLLM's images: the text `inputs` holds the model's image marker (e.g. <image>) where each one goes
    multimodal_params: MultimodalParams | None = None
    lora: str | None = Field(None, description="the LoRA adapter to run on (a name from /v1/models; the base "
                                               "model's name or null: none); an unknown name answers 404")


class GenerateStreamRequest(GenerateRequest):
    parameters: GenerateStreamParameters = Field(default_factory=GenerateStreamParameters)


def _prepare(state: ServerState,
             req: GenerateRequest) -> tuple[list[int], SamplingParams, list[str], list[ImageInput]]:
    p = req.parameters
    # empty inputs fail validation; a text that encodes to nothing fails the length check below
    prompt_ids, images = _encode_inputs(state, req)
    stops = [p.stop_sequences] if isinstance(p.stop_sequences, str) else list(p.stop_sequences or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"at most {MAX_STOP_SEQUENCES} stop_sequences are allowed",
                       param="parameters.stop_sequences")
    if images:  # never truncated (--long_truncation_mode could cut an image's run): too long is a 400
        max_new = state.check_length(len(prompt_ids), p.max_new_tokens, "parameters.max_new_tokens", "inputs")
    else:
        prompt_ids, max_new = state.fit_length(prompt_ids, p.max_new_tokens, param="parameters.max_new_tokens",
                                               prompt_param="inputs")
    greedy = not p.do_sample or p.temperature < 1e-5
    params = SamplingParams(
        max_new_tokens=max_new, min_new_tokens=p.min_new_tokens, temperature=0.0 if greedy else p.temperature,
        top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty, seed=p.seed,
        ignore_eos=p.ignore_eos, stop_token_ids=list(p.stop_token_ids),
        logit_bias={int(k): float(v) for k, v in (p.logit_bias or {}).items()},
        logprobs=0 if p.return_details else None, grammar=_constraint(state, p),
        lora=state.adapter_for(req.lora, param="lora", strict=True))
    return prompt_ids, params, stops, images


def _encode_inputs(state: ServerState, req: GenerateRequest) -> tuple[list[int], list[ImageInput]]:
    """The prompt's token ids, with LightLLM's multimodal_params.images (checked like chat's) in their
    placeholder runs where the text holds the model's image marker."""
    sent = req.multimodal_params.images if req.multimodal_params is not None else []
    if not sent:
        if isinstance(req.inputs, str):
            return state.tokenizer.encode(req.inputs, add_special_tokens=req.parameters.add_special_tokens), []
        return list(req.inputs), []
    param = "multimodal_params.images"
    layout_text(state.engine.info, state.tokenizer, state.model_name, param)  # a text-only model: 400
    if not isinstance(req.inputs, str):
        raise APIError(400, "images need text inputs holding the model's image marker where each image goes",
                       param="inputs")
    check_count(len(sent), state.args, param)
    images = [load_base64_image(image.data, state.args, f"{param}[{i}]") for i, image in enumerate(sent)]
    special = req.parameters.add_special_tokens
    return encode_with_images(state, req.inputs, images,
                              lambda text: state.tokenizer.encode(text, add_special_tokens=special), "inputs")


def _constraint(state: ServerState, p: GenerateParameters) -> GrammarSpec | None:
    field = "parameters."
    return structured.resolve(state, [
        (field + "guided_grammar", structured.grammar(p.guided_grammar)),
        (field + "guided_json", structured.json_spec(field + "guided_json", p.guided_json)),
        (field + "regular_constraint", structured.regex(p.regular_constraint)),
        (field + "allowed_token_ids", structured.token_ids(p.allowed_token_ids)),
        (field + "regex", structured.regex(p.regex)),
        (field + "ebnf", structured.grammar(p.ebnf)),
        (field + "json_schema", structured.json_spec(field + "json_schema", p.json_schema)),
        (field + "structural_tag", structured.structural_tag(field + "structural_tag", p.structural_tag))])


def _with_seed(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th of n samples: its own, still reproducible, seed."""
    return dataclasses.replace(params, seed=None if params.seed is None else params.seed + i)


async def _parse_body(request: Request, model: type[GenerateRequest] = GenerateRequest) -> GenerateRequest:
    """LightLLM clients often post JSON without a JSON content type (curl -d): accept any."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"invalid JSON body: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


@router.post("/generate", openapi_extra=json_body(GenerateRequest))
async def generate(request: Request) -> dict[str, Any]:
    req = await _parse_body(request)
    state: ServerState = request.app.state.server
    state.check_capacity()
    prompt_ids, params, stops, images = _prepare(state, req)
    p = req.parameters

    streams = [state.stream(prompt_ids, _with_seed(params, i), stop=stops, skip_special_tokens=p.skip_special_tokens,
                            images=images) for i in range(p.n)]
    results = await until_disconnect(request, collect_all(streams))
    texts = [text for text, _ in results]
    last = [chunks[-1] for _, chunks in results]
    body: dict[str, Any] = {
        "generated_text": texts,
        "count_output_tokens": sum(c.completion_tokens for c in last),
        "finish_reason": last[0].finish_reason,
        "prompt_tokens": len(prompt_ids),
    }
    if p.return_details:
        body["tokens"] = [[{"id": t.token_id, "text": t.text, "logprob": t.logprob}
                           for c in chunks for t in c.tokens] for _, chunks in results]
        body["finish_reasons"] = [c.finish_reason for c in last]
    return body


@router.post("/generate_stream", openapi_extra=json_body(GenerateStreamRequest),
             responses={200: {"description": "SSE stream of tokens", "content": {"text/event-stream": {}}}})
async def generate_stream(request: Request) -> StreamingResponse:
    req = await _parse_body(request, GenerateStreamRequest)
    state: ServerState = request.app.state.server
    state.check_capacity()
    prompt_ids, params, stops, images = _prepare(state, req)
    params.logprobs = 0
    special = set(state.tokenizer.all_special_ids)

    async def events():
        gen = state.stream(prompt_ids, params, stop=stops, skip_special_tokens=req.parameters.skip_special_tokens,
                           rid=new_id("gen-"), images=images)
        text_so_far = []
        try:
            async for chunk in gen:
                token = chunk.tokens[0] if chunk.tokens else None
                text_so_far.append(chunk.text)
                event = {
                    "token": {"id": token.token_id if token else None, "text": chunk.text,
                              "logprob": token.logprob if token else None,
                              "special": bool(token and token.token_id in special),
                              "count_output_tokens": chunk.completion_tokens, "prompt_tokens": len(prompt_ids)},
                    "generated_text": "".join(text_so_far) if chunk.finished else None,
                    "finished": chunk.finished,
                    "finish_reason": chunk.finish_reason,
                    "details": None,
                }
                yield f"data:{json.dumps(event, ensure_ascii=False)}\n\n"
        except Exception as exc:  # the stream has begun: the error travels as its last event
            yield f"data:{json.dumps(stream_error_event(exc))}\n\n"
        finally:
            await gen.aclose()

    return StreamingResponse(events(), media_type="text/event-stream")
