"""Pydantic request models for POST /v1/responses (OpenAI's Responses API).

`input` items, `tools` and `tool_choice` arrive as plain dicts and are validated item by item in
responses.py, so an unsupported type (an image part, a web_search tool) is refused by name instead of
with a generic union error."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lightllm.server.limits import MAX_TOOLS
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
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Lenient):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Lenient):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(_Lenient):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_tool_calls: int | None = Field(None, ge=1)  # the calls past it are dropped (1: one call, in the grammar)
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool | None = False  # null (as routers forward it) means false
    store: bool = True
    previous_response_id: str | None = None
    background: bool | None = None
    # Accepted without effect (a single-tenant server): metadata, user, service_tier, include,
    # truncation, prompt_cache_key, safety_identifier.
    metadata: dict[str, str] | None = None
    user: str | None = None
