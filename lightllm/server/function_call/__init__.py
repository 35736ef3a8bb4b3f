"""Function calling: tool-call detectors per output format, tool_choice validation and grammars."""

from lightllm.server.function_call.context import ToolContext, prepare_tool_context

__all__ = ["ToolContext", "prepare_tool_context"]
