"""Pydantic request models for the Anthropic Messages API (`/v1/messages`, `/v1/messages/count_tokens`).

Responses are built as plain dicts (lightllm.server.anthropic.convert); the models at the end document
the token count and the error shape in the OpenAPI document. Unknown fields are ignored, as on
the OpenAI routes: Claude clients send newer ones (`thinking`, `service_tier`, `cache_control` on blocks).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from lightllm.server.limits import IMAGE_URL_PATTERN, MAX_MESSAGES, MAX_STOP_SEQUENCES, MAX_TOOLS
from lightllm.server.openai.protocol import ToolSchema, _Lenient


class TextBlock(_Lenient):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Lenient):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(_Lenient):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(block.text for block in self.content)


class ThinkingBlock(_Lenient):
    """An earlier turn's thinking, sent back by clients; not rendered (as Anthropic drops earlier turns')."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Lenient):
    type: Literal["redacted_thinking"]
    data: str = ""


class Base64ImageSource(_Lenient):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class URLImageSource(_Lenient):
    type: Literal["url"]
    url: Annotated[str, Field(pattern=IMAGE_URL_PATTERN)]  # as chat's image_url: http(s) is refused (no fetching)


class ImageBlock(_Lenient):
    type: Literal["image"]
    source: Annotated[Union[Base64ImageSource, URLImageSource], Field(discriminator="type")]

    def url(self) -> str:
        """The image as a chat image URL (the chat route loads and checks it)."""
        if isinstance(self.source, URLImageSource):
            return self.source.url
        return f"data:{self.source.media_type};base64,{self.source.data}"


UserBlock = Annotated[Union[TextBlock, ImageBlock, ToolResultBlock], Field(discriminator="type")]
AssistantBlock = Annotated[Union[TextBlock, ToolUseBlock, ThinkingBlock, RedactedThinkingBlock],
                           Field(discriminator="type")]


class UserMessage(_Lenient):
    role: Literal["user"]
    content: str | list[UserBlock]


class AssistantMessage(_Lenient):
    role: Literal["assistant"]
    content: str | list[AssistantBlock]


Message = Annotated[Union[UserMessage, AssistantMessage], Field(discriminator="role")]


class ToolDefinition(_Lenient):
    """A client tool. Anthropic's server tools (web search, bash, ...) have other `type`s: refused."""

    type: Literal["custom"] | None = None
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    input_schema: ToolSchema


class ToolChoiceAuto(_Lenient):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(_Lenient):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(_Lenient):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(_Lenient):
    type: Literal["none"]


ToolChoice = Annotated[Union[ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool, ToolChoiceNone],
                       Field(discriminator="type")]


# Forcing a tool (`any`, `tool`) needs tools to choose from (Anthropic's rule); `auto` and `none` need none.
_FORCED_CHOICE_NEEDS_TOOLS = {
    "if": {"required": ["tool_choice"], "properties": {"tool_choice": {
        "type": "object", "required": ["type"], "properties": {"type": {"enum": ["any", "tool"]}}}}},
    "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}}


class CountTokensRequest(_Lenient):
    """What shapes the prompt: `POST /v1/messages/count_tokens` takes exactly this."""

    model_config = ConfigDict(json_schema_extra=_FORCED_CHOICE_NEEDS_TOOLS)

    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None

    def system_text(self) -> str | None:
        if self.system is None or isinstance(self.system, str):
            return self.system
        return "\n".join(block.text for block in self.system)


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    metadata: dict[str, Any] | None = None  # accepted (user_id), no effect


class TokenCount(BaseModel):
    input_tokens: int


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"]
    error: AnthropicErrorDetail
