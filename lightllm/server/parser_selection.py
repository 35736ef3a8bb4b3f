"""Which tool-call and reasoning parser a model gets when the flags name none.

The chat template is the best witness of a model's output format: it renders past tool calls and
thinking in the very syntax the model was trained to write. So the rule reads template markers first
(most specific first, since several formats share `<tool_call>`); a template with no tool syntax gets
`DEFAULT_TOOL_PARSER` (qwen25), the syntax the server's own tool prompt teaches such models (see
function_call/prompts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightllm.server.function_call.registry import DEFAULT_TOOL_PARSER

# (marker(s) that must all appear in the template, tool parser); first match wins.
_TOOL_MARKERS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("<function=", "<parameter="), "qwen3_coder"),
    (("<arg_key>",), "glm47"),
    (("\uff5cDSML\uff5c",), "deepseekv32"),
    (("<\uff5ctool\u2581calls\u2581begin\uff5c>", "function<\uff5ctool\u2581sep\uff5c>"), "deepseekv3"),
    (("<\uff5ctool\u2581calls\u2581begin\uff5c>",), "deepseekv31"),
    (("<|tool_calls_section_begin|>",), "kimi_k2"),
    (("<tool_call>",), "qwen25"),
    (("[TOOL_CALLS]",), "mistral"),
    (("<|python_tag|>",), "llama3"),
)


@dataclass(frozen=True)
class ParserChoice:
    tool_call_parser: str
    tool_call_reason: str
    reasoning_parser: str | None
    reasoning_reason: str


def _reasoning_from_template(template: str, architecture: str) -> tuple[str | None, str]:
    arch = architecture.lower()
    if "<|channel|>" in template:
        return "gpt-oss", "chat template uses harmony channels (<|channel|>)"
    if "\u25c1think\u25b7" in template:
        return "kimi", "chat template marker \u25c1think\u25b7"
    if "<think>" not in template:
        return None, "chat template has no thinking markers"
    if "\uff5cAssistant\uff5c" in template:
        if "thinking" in template:
            return "deepseek-v3", "DeepSeek template with a `thinking` switch"
        return "deepseek-r1", "DeepSeek template with <think>"
    if "[gMASK]" in template or arch.startswith("glm"):
        return "glm45", "GLM template with <think>"
    if "<|im_assistant|>" in template or arch.startswith("kimi"):
        return "kimi_k2", "Kimi template with <think>"
    if "enable_thinking" not in template and "<think>" in template.split("add_generation_prompt")[-1]:
        return "qwen3-thinking", "template opens <think> in every generation prompt"
    return "qwen3", "chat template marker <think>"


def select_parsers(tool_flag: str | None, reasoning_flag: str | None, chat_template: str | None,
                   architecture: str = "") -> ParserChoice:
    template = chat_template or ""
    if reasoning_flag:
        reasoning, reasoning_reason = reasoning_flag, "--reasoning_parser"
    else:
        reasoning, reasoning_reason = _reasoning_from_template(template, architecture)
    if tool_flag:
        tool, tool_reason = tool_flag, "--tool_call_parser"
    elif reasoning == "gpt-oss":  # harmony calls are messages to a function, not a marker in the template
        tool, tool_reason = "gpt-oss", "the gpt-oss (harmony) reasoning parser writes calls as harmony messages"
    else:
        tool, tool_reason = DEFAULT_TOOL_PARSER, ("chat template has no tool-call syntax; the server's tool prompt "
                                                  f"teaches the {DEFAULT_TOOL_PARSER} syntax")
        for markers, name in _TOOL_MARKERS:
            if all(m in template for m in markers):
                tool, tool_reason = name, "chat template marker " + " + ".join(markers)
                break
    return ParserChoice(tool, tool_reason, reasoning, reasoning_reason)
