"""Pydantic request models for POST /v1/responses (OpenAI's Responses API).

`input` items, `tools` and `tool_choice` arrive as plain dicts and are validated item by item in
responses.py, so an unsupported type (a file part, a web_search tool) is refused by name instead of
with a generic union error."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, WithJsonSchema

from lightllm.server.limits import IMAGE_URL_PATTERN, MAX_TOOLS
from lightllm.server.openai.protocol import _Lenient


class InputMessage(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[dict[str, Any]]


class FunctionCallItem(_Lenient):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None


class FunctionCallOutputItem(_Lenient):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[dict[str, Any]]


class ReasoningItem(_Lenient):
    """A reasoning item passed back from an earlier output: it is not rendered into the prompt (chat
    templates drop past reasoning too)."""

    type: Literal["reasoning"]


class FunctionTool(_Lenient):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # OpenAI's default for the Responses API is true


class TextFormat(_Lenient):
    model_config = ConfigDict(json_schema_extra={  # a json_schema format carries its schema (convert.py)
        "if": {"required": ["type"], "properties": {"type": {"const": "json_schema"}}},
        "then": {"required": ["schema"], "properties": {"schema": {"type": "object"}}}})

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Lenient):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Lenient):
    effort: Literal["minimal", "low", "medium", "high"] | None = None  # chat's reasoning_effort takes these
    summary: str | None = None


# The document's view of what convert.py checks item by item (the fields stay plain dicts, so its messages
# name the item): input items, their text parts, function tools and the tool choice.
_STRING_OR_NULL = {"type": ["string", "null"]}
_TEXT_PARTS = {"type": "array", "items": {"anyOf": [
    {"type": "object", "required": ["type", "text"],
     "properties": {"type": {"enum": ["input_text", "output_text", "text"]}, "text": {"type": "string"}}},
    {"type": "object", "required": ["type", "refusal"],
     "properties": {"type": {"const": "refusal"}, "refusal": {"type": "string"}}}]}}
# an image in a message: chat's image_url rules (data: or file:// URL; http(s) is refused: no fetching)
_IMAGE_PART = {"type": "object", "required": ["type", "image_url"], "properties": {
    "type": {"const": "input_image"}, "image_url": {"type": "string", "pattern": IMAGE_URL_PATTERN},
    "detail": {"enum": ["auto", None]}}}
_MESSAGE_PARTS = {"type": "array", "items": {"anyOf": [*_TEXT_PARTS["items"]["anyOf"], _IMAGE_PART]}}
_INPUT_ITEM = {"anyOf": [
    {"type": "object", "required": ["role", "content"], "properties": {
        "type": {"enum": ["message", None]}, "role": {"enum": ["user", "system", "developer", "assistant"]},
        "content": {"anyOf": [{"type": "string"}, _MESSAGE_PARTS]}}},
    {"type": "object", "required": ["type", "call_id", "name", "arguments"], "properties": {
        "type": {"const": "function_call"}, "call_id": {"type": "string"}, "name": {"type": "string"},
        "arguments": {"type": "string"}, "id": _STRING_OR_NULL}},
    {"type": "object", "required": ["type", "call_id", "output"], "properties": {
        "type": {"const": "function_call_output"}, "call_id": {"type": "string"},
        "output": {"anyOf": [{"type": "string"}, _TEXT_PARTS]}}},
    {"type": "object", "required": ["type"], "properties": {"type": {"const": "reasoning"}}}]}
_INPUT = {"anyOf": [{"type": "string"}, {"type": "array", "items": _INPUT_ITEM}]}
_FUNCTION_TOOL = {"type": "object", "required": ["type", "name"], "properties": {
    "type": {"const": "function"}, "name": {"type": "string", "minLength": 1, "maxLength": 64},
    "description": _STRING_OR_NULL, "parameters": {"type": ["object", "null"]},
    "strict": {"type": ["boolean", "null"]}}}
_TOOLS = {"anyOf": [{"type": "array", "maxItems": MAX_TOOLS, "items": _FUNCTION_TOOL}, {"type": "null"}]}
_TOOL_CHOICE = {"anyOf": [{"enum": ["none", "auto", "required", None]}, {
    "type": "object", "required": ["type", "name"],
    "properties": {"type": {"const": "function"}, "name": {"type": "string"}}}]}
_REQUEST_RULES = {"allOf": [
    # A forced choice needs tools to choose from.
    {"if": {"required": ["tool_choice"], "properties": {"tool_choice": {"anyOf": [{"const": "required"},
                                                                                  {"type": "object"}]}}},
     "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}},
    # A JSON text format or a forced tool call, not both (convert.py's to_chat_request).
    {"if": {"required": ["text"], "properties": {"text": {"type": "object", "required": ["format"], "properties": {
        "format": {"type": "object", "required": ["type"],
                   "properties": {"type": {"enum": ["json_object", "json_schema"]}}}}}}},
     "then": {"properties": {"tool_choice": {"not": {"anyOf": [{"const": "required"}, {"type": "object"}]}}}}},
    # Without instructions the input holds a message, a call or a call's output (reasoning is not rendered).
    {"if": {"required": ["instructions"], "properties": {"instructions": {"type": "string", "minLength": 1}}},
     "else": {"properties": {"input": {"anyOf": [{"type": "string"}, {"type": "array", "contains": {
         "not": {"type": "object", "required": ["type"], "properties": {"type": {"const": "reasoning"}}}}}]}}}}]}


class ResponsesRequest(_Lenient):
    model_config = ConfigDict(json_schema_extra=_REQUEST_RULES)

    model: str | None = None
    input: Annotated[str | list[dict[str, Any]], WithJsonSchema(_INPUT)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: Annotated[list[dict[str, Any]] | None, WithJsonSchema(_TOOLS)] = Field(None, max_length=MAX_TOOLS)
    tool_choice: Annotated[Literal["none", "auto", "required"] | dict[str, Any] | None,
                           WithJsonSchema(_TOOL_CHOICE)] = None
    parallel_tool_calls: bool = True
    max_tool_calls: int | None = Field(None, ge=1)  # the calls past it are dropped (1: one call, in the grammar)
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool | None = False  # null (as routers forward it) means false
    store: bool = True
    previous_response_id: str | None = None
    # Only false: background responses are refused with a message (convert.py), and the document says so.
    background: Annotated[bool | None, WithJsonSchema({"enum": [False, None], "description": "Background "
                                                       "responses are not supported: false or omitted."})] = None
    # Accepted without effect (a single-tenant server): metadata, user, service_tier, include,
    # truncation, prompt_cache_key, safety_identifier.
    metadata: dict[str, str] | None = None
    user: str | None = None
