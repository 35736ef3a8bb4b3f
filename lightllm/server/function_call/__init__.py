"""Function calling: tool-call detectors per output format, tool_choice validation and grammars."""

from lightllm.server.function_call.context import ToolContext, prepare_tool_context, response_format_grammar

__all__ = ["ToolContext", "prepare_tool_context", "response_format_grammar"]
