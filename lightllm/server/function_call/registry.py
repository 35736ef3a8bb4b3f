"""--tool_call_parser name → detector class. Adding a format means adding one module and one line here."""

from __future__ import annotations

from lightllm.server.function_call.base import ToolCallDetector
from lightllm.server.function_call.llama3 import Llama3Detector
from lightllm.server.function_call.mistral import MistralDetector
from lightllm.server.function_call.qwen25 import Qwen25Detector

DETECTORS: dict[str, type[ToolCallDetector]] = {
    "qwen25": Qwen25Detector,
    "llama3": Llama3Detector,
    "mistral": MistralDetector,
}


def detector_class(name: str) -> type[ToolCallDetector]:
    try:
        return DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose from {sorted(DETECTORS)}") from None
