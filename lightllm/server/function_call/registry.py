"""--tool_call_parser name → detector class. Adding a format means adding one module and one line here.

Names follow LightLLM's server; `qwen` and `hermes` are the names users of SGLang and vLLM type for the
same `<tool_call>{json}</tool_call>` format, and `glm45` the GLM-4.5 name of GLM's format."""

from __future__ import annotations

from lightllm.server.function_call.base import ToolCallDetector
from lightllm.server.function_call.deepseek import DeepSeekV3Detector, DeepSeekV31Detector
from lightllm.server.function_call.deepseekv32 import DeepSeekV32Detector
from lightllm.server.function_call.glm47 import Glm47Detector
from lightllm.server.function_call.gpt_oss import GptOssToolDetector
from lightllm.server.function_call.kimi_k2 import KimiK2Detector
from lightllm.server.function_call.llama3 import Llama3Detector
from lightllm.server.function_call.mistral import MistralDetector
from lightllm.server.function_call.qwen3_coder import Qwen3CoderDetector
from lightllm.server.function_call.qwen25 import Qwen25Detector

DETECTORS: dict[str, type[ToolCallDetector]] = {
    "qwen25": Qwen25Detector,
    "qwen": Qwen25Detector,
    "hermes": Qwen25Detector,
    "llama3": Llama3Detector,
    "mistral": MistralDetector,
    "qwen3_coder": Qwen3CoderDetector,
    "deepseekv3": DeepSeekV3Detector,
    "deepseekv31": DeepSeekV31Detector,
    "deepseekv32": DeepSeekV32Detector,
    "kimi_k2": KimiK2Detector,
    "glm47": Glm47Detector,
    "glm45": Glm47Detector,
    "gpt-oss": GptOssToolDetector,
}

TOOL_PARSER_NAMES = sorted(DETECTORS)
# The parser when neither the flag nor the chat template names one, and the syntax the server's own tool
# prompt (prompts.py) teaches a model whose template has no tool support.
DEFAULT_TOOL_PARSER = "qwen25"


def detector_class(name: str) -> type[ToolCallDetector]:
    try:
        return DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose from {', '.join(TOOL_PARSER_NAMES)}") from None
