"""Per-request tool handling: validate tools / tool_choice, pick the parser, build the grammar."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from lightllm.engine.protocol import GrammarSpec
from lightllm.server.errors import APIError
from lightllm.server.generation import GenerationChunk
from lightllm.server.function_call.base import ToolCallDetector, ToolStreamParser, parse_complete
from lightllm.server.function_call.constrained import NamedDetector, RequiredDetector
from lightllm.server.function_call.prompts import inline_tools
from lightllm.server.function_call.registry import DEFAULT_TOOL_PARSER, detector_class
from lightllm.server.reasoning.base import ReasoningDetector, ReasoningStreamParser

_EMPTY_PARAMS = {"type": "object", "properties": {}}


@dataclass
class ToolContext:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict[str, Any]]
    fmt: str  # prompt / parser format when the template has no tools support
    template_has_tools: bool
    detector: ToolCallDetector | None
    grammar: GrammarSpec | None = None
    max_calls: int | None = None
    template_tools: list[dict[str, Any]] | None = field(default=None)

    @property
    def parses(self) -> bool:
        return self.detector is not None

    def adapt_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.template_has_tools:
            return messages
        return inline_tools(self.fmt, messages, self.tools)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        return parse_complete(self.detector, text, self.max_calls)

    def stream_parser(self) -> ToolStreamParser:
        return ToolStreamParser(self.detector, self.max_calls)

    async def limit_repeats(self, stream: AsyncIterator[GenerationChunk],
                            reasoning: ReasoningDetector | None = None) -> AsyncIterator[GenerationChunk]:
        """End a required-mode generation as soon as it repeats a call (see RequiredDetector); leaving the
        engine stream early aborts the request there. `reasoning`: the request's reasoning detector when the
        calls follow a thinking model's reasoning (only the answer is scanned). Both parsers resume from
        their checkpoints, so a chunk costs work bounded by the call being written."""
        answer = ReasoningStreamParser(reasoning) if reasoning is not None else None
        calls, state = "", None  # the answer from the call detector's last checkpoint on, and its state there
        async for chunk in stream:
            calls += answer.feed(chunk.text)[1] if answer is not None else chunk.text
            if self.mode == "required" and not chunk.finished:
                result = self.detector.scan_from(calls, False, state)
                if result.stop:
                    chunk.finished, chunk.finish_reason = True, "stop"
                    yield chunk
                    await stream.aclose()
                    return
                if result.checkpoint is not None:
                    calls, state = calls[result.checkpoint.pos:], result.checkpoint.state
            yield chunk

    def finish_reason(self, reason: str | None) -> str | None:
        if reason == "length":
            return reason
        return "stop" if self.mode == "named" else "tool_calls"  # a named choice finishes with "stop", as OpenAI does


def _validate_schema(schema: dict[str, Any], name: str) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise APIError(400, f"invalid 'parameters' schema for tool {name!r}: {exc.message}", param="tools") from None


def required_schema(tools: list[dict[str, Any]], max_items: int | None) -> dict[str, Any]:
    """JSON array of {"name", "parameters"} objects, one alternative per tool; `$defs` hoisted to the top."""
    defs: dict[str, Any] = {}
    alternatives = []
    for tool in tools:
        fn = tool["function"]
        params = copy.deepcopy(fn.get("parameters") or _EMPTY_PARAMS)
        for key, value in params.pop("$defs", {}).items():
            if key in defs and defs[key] != value:
                raise APIError(400, f"Tool definition '{key}' has multiple schemas, which is not supported.",
                               param="tools")
            defs[key] = value
        alternatives.append({"properties": {"name": {"type": "string", "enum": [fn["name"]]}, "parameters": params},
                             "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": alternatives}}
    if max_items:
        schema["maxItems"] = max_items
    if defs:
        schema["$defs"] = defs
    return schema


def prepare_tool_context(req: Any, state: Any) -> ToolContext | None:
    choice = req.tool_choice
    if req.tools is None:
        if choice not in (None, "none"):
            raise APIError(400, "When using `tool_choice`, `tools` must be set.", param="tool_choice")
        return None
    if not req.tools:
        raise APIError(400, "`tools` must not be an empty array; omit it instead.", param="tools")
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    names = [t["function"]["name"] for t in tools]
    for tool in tools:
        if tool["function"].get("parameters") is not None:
            _validate_schema(tool["function"]["parameters"], tool["function"]["name"])
    fmt = state.tool_call_parser or DEFAULT_TOOL_PARSER
    fmt_cls = detector_class(fmt)
    schemas = {t["function"]["name"]: t["function"].get("parameters") or _EMPTY_PARAMS for t in tools}
    template = state.tokenizer.chat_template or ""
    ctx = ToolContext(mode="auto", tools=tools, fmt=fmt, template_has_tools="tools" in template, detector=None,
                      max_calls=None if req.parallel_tool_calls else 1)
    ctx.template_tools = tools if ctx.template_has_tools else None
    strict = {t["function"]["name"] for t in tools if t["function"].get("strict")}
    if choice is None or choice == "auto":
        ctx.detector = fmt_cls(set(names), schemas, strict=strict)
    elif choice == "none":
        ctx.mode = "none"
    elif choice == "required":
        ctx.mode = "required"
        # Constrained output is JSON in every format; the call ids keep the format's own style.
        ctx.detector = RequiredDetector(set(names), schemas, id_factory=fmt_cls.default_call_id)
        ctx.grammar = GrammarSpec.json_schema(required_schema(tools, ctx.max_calls))
    else:
        name = choice.function.name
        if name not in names:
            raise APIError(400, f"Tool '{name}' not found in tools list.", param="tool_choice")
        ctx.mode = "named"
        ctx.detector = NamedDetector(set(names), name, schemas, id_factory=fmt_cls.default_call_id)
        ctx.grammar = GrammarSpec.json_schema(schemas[name])
    if ctx.grammar is not None and state.args.output_constraint_mode == "none":
        raise APIError(400, "tool_choice 'required' or a named function needs constrained decoding, which this "
                            "server runs without (--output_constraint_mode none)", param="tool_choice")
    return ctx

