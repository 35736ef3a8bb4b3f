from __future__ import annotations
from typing import Any


class ToolContext:
    parses = False


def prepare_tool_context(req: Any, state: Any) -> ToolContext | None:
    return None


def response_format_grammar(fmt: Any) -> dict[str, Any]:
    return {}
