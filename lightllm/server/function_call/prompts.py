"""Tools for chat templates that know nothing about tools (the embedded SmolLM2, for instance).

The tool list and the call syntax of the selected parser go into the system prompt, and past tool calls
and tool results are rewritten as plain turns in that same syntax, so `auto` has a chance and constrained
modes know what the tools mean.
"""

from __future__ import annotations

import json
from typing import Any


def _tool_lines(tools: list[dict[str, Any]]) -> str:
    return "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)


def tools_system_prompt(fmt: str, tools: list[dict[str, Any]]) -> str:
    if fmt == "llama3":
        listing = "\n\n".join(json.dumps(t, ensure_ascii=False, indent=4) for t in tools)
        return ("You can call these functions. To call one, answer only with JSON in the form "
                '{"name": function name, "parameters": dictionary of argument name and its value}. '
                "Do not use variables.\n\n" + listing)
    if fmt == "mistral":
        return ("[AVAILABLE_TOOLS] " + json.dumps(tools, ensure_ascii=False) + "[/AVAILABLE_TOOLS]\n"
                'To call tools, answer with [TOOL_CALLS] followed by a JSON array of {"name": ..., "arguments": {...}} '
                "objects.")
    return ("# Tools\n\nYou may call one or more functions to help with the user's request.\n\n"
            "The functions are described inside <tools></tools> tags:\n<tools>\n" + _tool_lines(tools) + "\n</tools>\n\n"
            "To call a function, answer with a JSON object holding its name and arguments inside "
            "<tool_call></tool_call> tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def render_call(fmt: str, call: dict[str, Any]) -> str:
    name, args = call["function"]["name"], call["function"]["arguments"]
    if fmt == "llama3":
        return json.dumps({"name": name, "parameters": args}, ensure_ascii=False)
    if fmt == "mistral":
        return json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + "\n</tool_call>"


def render_tool_result(fmt: str, message: dict[str, Any]) -> str:
    content = message.get("content", "")
    if fmt == "llama3":
        return json.dumps({"output": content}, ensure_ascii=False)
    if fmt == "mistral":
        return ("[TOOL_RESULTS] " + json.dumps({"content": content, "call_id": (message.get("tool_call_id") or "")[-9:]},
                                               ensure_ascii=False) + "[/TOOL_RESULTS]")
    return "<tool_response>\n" + content + "\n</tool_response>"


def inline_tools(fmt: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rewrite messages so a tool-unaware template still shows tools, calls and results."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            calls = [render_call(fmt, c) for c in msg["tool_calls"]]
            if fmt == "mistral":
                body = "[TOOL_CALLS] [" + ", ".join(calls) + "]"
            else:
                body = ("; " if fmt == "llama3" else "\n").join(calls)
            text = (msg.get("content") or "")
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + body})
        elif msg["role"] == "tool":
            result = render_tool_result(fmt, msg)
            if out and out[-1].get("_tool_results"):  # consecutive results share one user turn
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "_tool_results": True})
        else:
            out.append(dict(msg))
    for msg in out:
        msg.pop("_tool_results", None)
    if tools:
        prompt = tools_system_prompt(fmt, tools)
        if out and out[0]["role"] == "system":
            out[0] = dict(out[0], content=out[0]["content"] + "\n\n" + prompt)
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
