"""--reasoning_parser name → detector. Names follow LightLLM's server.

Each think-tag format differs only in its tags and in whether the output starts inside the block
("forced": the model's template always opens it in the prompt). Whatever the name, a prompt that ends
with the opening tag (Qwen3 and GLM with thinking on, DeepSeek-V3.1 with `thinking`) also starts the
output inside the block, and one that closes it (`enable_thinking: false`) leaves no block at all.
"""

from __future__ import annotations

from typing import Callable

from lightllm.server.reasoning.base import ReasoningDetector, ThinkTagDetector
from lightllm.server.reasoning.gpt_oss import GptOssDetector

THINK = ("<think>", "</think>")
KIMI_THINK = ("\u25c1think\u25b7", "\u25c1/think\u25b7")  # ◁think▷ … ◁/think▷ (Kimi-VL thinking)


def _tags(name: str, tags: tuple[str, str], force: bool) -> Callable[[], ReasoningDetector]:
    return lambda: ThinkTagDetector(name, tags[0], tags[1], force_reasoning=force)


REASONING_PARSERS: dict[str, Callable[[], ReasoningDetector]] = {
    "qwen3": _tags("qwen3", THINK, False),
    "qwen3-thinking": _tags("qwen3-thinking", THINK, True),
    "deepseek-r1": _tags("deepseek-r1", THINK, True),
    "deepseek-v3": _tags("deepseek-v3", THINK, False),
    "glm45": _tags("glm45", THINK, False),
    "kimi": _tags("kimi", KIMI_THINK, False),
    "kimi_k2": _tags("kimi_k2", THINK, False),
    "minimax": _tags("minimax", THINK, True),
    "step3": _tags("step3", THINK, True),
    "gpt-oss": GptOssDetector,
}

REASONING_PARSER_NAMES = sorted(REASONING_PARSERS)


def reasoning_detector(name: str) -> ReasoningDetector:
    try:
        return REASONING_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; choose from {', '.join(REASONING_PARSER_NAMES)}") from None
