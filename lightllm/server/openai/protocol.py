"""Pydantic request models for the OpenAI-compatible routes (responses are built as plain dicts so
their shape, nulls included, matches OpenAI's exactly)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from lightllm.server.limits import (IMAGE_URL_PATTERN, MAX_MESSAGES, MAX_N, MAX_STOP_SEQUENCES, MAX_TOOL_SCHEMA_BYTES,
                                    MAX_TOOLS)
from lightllm.server.openapi import integral_floats_as_ints


class _Lenient(BaseModel):
    # OpenAI clients send fields we do not use (metadata, store, ...): ignore them, but type-check ours
    # strictly, as the OpenAPI document says ("1" is not an integer, false is not a token id; 1.0 is one).
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _json_integers(cls, data: Any) -> Any:
        return integral_floats_as_ints(cls, data)


TokenId = Annotated[int, Field(ge=0)]
# Any integer: the engine seeds with it modulo 2**64. (Bounds at OpenAI's int64 cannot be documented exactly:
# validators compare numbers that large as doubles, so 2**63 + 191 passes a maximum of 2**63 - 1.)
Seed = int


def _check_logit_bias(value: dict[str, float]) -> dict[str, float]:
    for key, bias in value.items():
        if not key.isdigit():
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        if not -100 <= bias <= 100:
            raise ValueError("logit_bias values must be between -100 and 100")
    return value


def _check_schema_size(value: dict[str, Any]) -> dict[str, Any]:
    if len(json.dumps(value)) > MAX_TOOL_SCHEMA_BYTES:
        raise ValueError(f"the tool's schema is larger than {MAX_TOOL_SCHEMA_BYTES} bytes")
    return value


# A tool's JSON schema (chat `parameters`, Anthropic `input_schema`), bounded in size.
ToolSchema = Annotated[dict[str, Any], AfterValidator(_check_schema_size)]

# {"token id": bias}; the engine checks the ids against the vocabulary. The document says other keys are refused
# (patternProperties alone would let them through).
LogitBias = Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]+$")], Annotated[float, Field(ge=-100, le=100)]],
                      AfterValidator(_check_logit_bias), Field(json_schema_extra={"additionalProperties": False})]
NonEmptyText = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    # data:image/...;base64, inline, or file:// under --allowed_local_media_path; http(s) is refused (no fetching)
    url: Annotated[str, Field(pattern=IMAGE_URL_PATTERN)]
    detail: Literal["auto"] = "auto"  # the model's fixed resolution: no low/high choice to honour


class ImageURLPart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImageURLPart, Field(discriminator="type")]


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self, image_text: str = "") -> str:
        """The content as text, each image as `image_text` (the model's image marker) where it stands."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text if isinstance(part, TextPart) else image_text for part in self.content)

    def image_urls(self) -> list[str]:
        return [] if isinstance(self.content, str) or self.content is None else [
            part.image_url.url for part in self.content if isinstance(part, ImageURLPart)]


class FunctionDefinition(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: ToolSchema | None = None
    strict: bool | None = None  # auto mode: a call whose arguments break the schema is not a call


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoiceFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


class StreamOptions(_Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaSpec(_Lenient):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaSpec | None = None
    # type structural_tag (SGLang, vLLM): xgrammar's `format`, or the legacy `structures` + `triggers`
    format: dict[str, Any] | None = None
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: one of json / regex / choice / grammar / json_object / structural_tag, and
    its options (an unknown key is refused, not ignored)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_any_whitespace: bool | None = None  # None: compact JSON (ours); false: whitespace allowed (vLLM's)
    disable_additional_properties: bool | None = None  # False: objects may carry properties the schema omits
    disable_fallback: bool | None = None  # there is no fallback backend: always honoured
    whitespace_pattern: str | None = None  # refused when set


class ConstraintFields(_Lenient):
    """Output constraints in the peers' extra-body shapes (lightllm/server/structured.py reads them)."""

    structured_outputs: StructuredOutputs | None = None  # vLLM
    guided_json: str | dict[str, Any] | None = None  # vLLM (older fields)
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None  # refused when set
    regex: str | None = None  # SGLang
    ebnf: str | None = None
    json_schema: str | dict[str, Any] | None = None
    allowed_token_ids: list[TokenId] | None = None  # vLLM


# A list of stop sequences: the routes check the limit themselves (their own messages); the document states it
StopList = Annotated[list[str], WithJsonSchema({"type": "array", "items": {"type": "string"},
                                                "maxItems": MAX_STOP_SEQUENCES})]


# chat.py's "continue_final_message needs add_generation_prompt false" (which defaults to true, so it must be sent)
CONTINUE_FINAL_MESSAGE_RULE = {
    "if": {"required": ["continue_final_message"], "properties": {"continue_final_message": {"const": True}}},
    "then": {"required": ["add_generation_prompt"], "properties": {"add_generation_prompt": {"const": False}}}}
# SamplingFields' "stream_options only with stream: true" (OpenAI's and vLLM's rule), as the document states it
STREAM_OPTIONS_RULE = {"if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
                       "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}}


class SamplingFields(ConstraintFields):
    """Fields shared by chat and text completions."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | StopList | None = None
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: LogitBias | None = None
    seed: Seed | None = None
    user: str | None = None
    # Common extensions (vLLM / LightLLM)
    top_k: int = -1
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    stop_token_ids: list[TokenId] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_limit(cls, value: str | list[str] | None):
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)  # OpenAI's too: [] is refused
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM's: the reply continues the last (assistant) message, a prefill
    # Reasoning models: split the thinking into `reasoning_content` (false: leave it in `content`), and
    # the effort setting for templates that take one (gpt-oss).
    separate_reasoning: bool = True
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None

    # Rules across fields, in the document too: _check_logprobs's, function_call/context.py's "a tool_choice
    # other than none needs tools", and chat.py's "continue_final_message needs add_generation_prompt false"
    # (which defaults to true, so it must be sent)
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
         "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}},
        {"if": {"required": ["tool_choice"],
                "properties": {"tool_choice": {"not": {"anyOf": [{"type": "null"}, {"const": "none"}]}}}},
         "then": {"required": ["tools"], "properties": {"tools": {"type": "array"}}}},
        CONTINUE_FINAL_MESSAGE_RULE,
        STREAM_OPTIONS_RULE,
    ]})

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


class CompletionRequest(SamplingFields):
    prompt: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1)]
    # completions.py refuses echo with stream, and the document says so (and SamplingFields' stream_options rule)
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"required": ["echo"], "properties": {"echo": {"const": True}}},
         "then": {"properties": {"stream": {"const": False}}}},
        STREAM_OPTIONS_RULE,
    ]})

    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    # not supported: only empty or null (completions.py refuses a suffix), and the document says so
    suffix: Annotated[str | None, WithJsonSchema({"anyOf": [{"type": "string", "maxLength": 0},
                                                            {"type": "null"}]})] = None
    best_of: int | None = None
    add_special_tokens: bool = True
