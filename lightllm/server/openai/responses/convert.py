"""A Responses request → a ChatCompletionRequest: input items → messages, flat function tools → chat tools,
`text.format` → response_format, `reasoning.effort` → reasoning_effort; errors renamed to Responses fields."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from lightllm.server.errors import APIError
from lightllm.server.openai.chat import PreparedChat, prepare_chat
from lightllm.server.openai.protocol import ChatCompletionRequest
from lightllm.server.openai.responses.protocol import (FunctionCallItem, FunctionCallOutputItem, FunctionTool,
                                                       InputMessage, ReasoningItem, ResponsesRequest)
from lightllm.server.state import ServerState

_ITEM_MODELS: dict[str, type[BaseModel]] = {"message": InputMessage, "function_call": FunctionCallItem,
                                            "function_call_output": FunctionCallOutputItem,
                                            "reasoning": ReasoningItem}
# Chat-side parameter names → the Responses request's, for errors raised by the chat path.
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
           "reasoning_effort": "reasoning.effort", "response_format": "text.format"}


def _validate(model: type[BaseModel], value: Any, param: str) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise APIError(400, f"{param}{'.' + where if where else ''}: {first.get('msg', 'invalid value')}",
                       param=param, code="invalid_value") from None


def _part_text(part: Any, param: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
        return part["text"]
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return part["refusal"]
    if kind in ("input_text", "output_text", "text", "refusal"):
        raise APIError(400, f"{param}: a {kind} part needs a string 'text'", param=param)
    raise APIError(400, f"content part type {kind!r} is not supported: this server takes text parts (input_text, "
                        "output_text) and, in messages, input_image", param=f"{param}.type", code="unsupported_value")


def _content_text(content: str | list[Any], param: str) -> str:
    if isinstance(content, str):
        return content
    return "".join(_part_text(part, f"{param}[{i}]") for i, part in enumerate(content))


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "input_image"


def _image_part(part: dict[str, Any], param: str) -> dict[str, Any]:
    """An input_image part as a chat image_url part (the chat route loads and checks the image)."""
    url = part.get("image_url")
    if not isinstance(url, str):
        raise APIError(400, f"{param}: an input_image part needs an 'image_url' (file_id is not supported: this "
                            "server keeps no files)", param=f"{param}.image_url")
    return {"type": "image_url", "image_url": {"url": url, "detail": part.get("detail") or "auto"}}


def _message_content(content: str | list[Any], param: str) -> str | list[dict[str, Any]]:
    """A message's content for chat: its text, or chat content parts when it holds images."""
    if isinstance(content, str) or not any(_is_image(part) for part in content):
        return _content_text(content, param)
    return [_image_part(part, f"{param}[{i}]") if _is_image(part)
            else {"type": "text", "text": _part_text(part, f"{param}[{i}]")} for i, part in enumerate(content)]


def input_items(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's own input as a list of items (a string is one user message)."""
    if isinstance(req.input, str):
        return [{"type": "message", "role": "user", "content": req.input}]
    return list(req.input)


def to_messages(items: list[dict[str, Any]], instructions: str | None) -> list[dict[str, Any]]:
    """Input items → chat messages. Consecutive function calls (and the assistant text right before them)
    form one assistant message with `tool_calls`; a function_call_output is a `tool` message."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for i, raw in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(raw, dict):
            raise APIError(400, f"{param}: an input item must be an object", param=param)
        kind = raw["type"] if raw.get("type") is not None else ("message" if "role" in raw else None)
        model = _ITEM_MODELS.get(kind) if isinstance(kind, str) else None
        if model is None:
            raise APIError(400, f"input item type {kind!r} is not supported (supported: message, function_call, "
                                "function_call_output, reasoning)", param=f"{param}.type", code="unsupported_value")
        item = _validate(model, {**raw, "type": kind}, param)
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": _message_content(item.content, f"{param}.content")})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else _content_text(item.output, f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
        # reasoning items: not rendered (templates drop past turns' reasoning as well)
    return messages


def tools_of(req: ResponsesRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """→ (chat tools, the tools as the response echoes them)."""
    chat_tools, echo = [], []
    for i, raw in enumerate(req.tools or []):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind != "function":
            raise APIError(400, f"tool type {kind!r} is not supported: only 'function' tools are (this server "
                                "runs no built-in tools)", param=f"tools[{i}].type", code="unsupported_value")
        tool = _validate(FunctionTool, raw, f"tools[{i}]")
        strict = True if tool.strict is None else tool.strict  # the Responses API's default
        chat_tools.append({"type": "function", "function": {
            "name": tool.name, "description": tool.description, "parameters": tool.parameters, "strict": strict}})
        echo.append({"type": "function", "name": tool.name, "description": tool.description,
                     "parameters": tool.parameters, "strict": strict})
    return chat_tools, echo


def _tool_choice(req: ResponsesRequest, has_tools: bool) -> Any:
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise APIError(400, f"tool_choice type {choice.get('type')!r} is not supported: use 'auto', 'required', "
                                "'none' or {'type': 'function', 'name': ...}", param="tool_choice",
                           code="unsupported_value")
        if not isinstance(choice.get("name"), str):
            raise APIError(400, "tool_choice: a function choice needs a 'name'", param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    if not has_tools and choice in ("auto", "none"):
        return None  # no tools: nothing to choose (the chat path would refuse a choice without tools)
    return choice


def _response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise APIError(400, "text.format json_schema needs a `schema`", param="text.format")
    return {"type": "json_schema", "json_schema": {"name": fmt.name or "response", "schema": fmt.schema_,
                                                   "strict": fmt.strict, "description": fmt.description}}


def to_chat_request(req: ResponsesRequest, items: list[dict[str, Any]]) -> ChatCompletionRequest:
    if req.background:
        raise APIError(400, "background responses are not supported", param="background", code="unsupported_value")
    tools, _ = tools_of(req)
    choice = _tool_choice(req, bool(tools))
    response_format = _response_format(req)
    if response_format is not None and (choice == "required" or isinstance(choice, dict)):
        raise APIError(400, "use either text.format json or a forced tool_choice, not both", param="text.format")
    body: dict[str, Any] = {
        "model": req.model, "messages": to_messages(items, req.instructions), "temperature": req.temperature,
        "top_p": req.top_p, "max_completion_tokens": req.max_output_tokens, "tools": tools or None,
        "tool_choice": choice, "parallel_tool_calls": req.parallel_tool_calls and req.max_tool_calls != 1,
        "response_format": response_format,
        "reasoning_effort": req.reasoning.effort if req.reasoning is not None else None, "user": req.user}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        param = _PARAMS.get(loc[0], loc[0]) if loc else None
        raise APIError(400, f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid"),
                       param=param, code="invalid_value") from None


def prepare(state: ServerState, chat_req: ChatCompletionRequest) -> PreparedChat:
    try:
        return prepare_chat(state, chat_req, rid_prefix="resp-")
    except APIError as exc:
        exc.param = _PARAMS.get(exc.param, exc.param)
        if exc.param is not None and exc.param.startswith("messages["):  # an image's (chat message indices differ)
            exc.param = "input"
        raise
