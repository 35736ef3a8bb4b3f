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


# Tool calls that end the thinking block (see reasoning/base.py): Kimi-K2's calls section always does
# (vLLM, SGLang and llama.cpp agree); `<tool_call>` does for Qwen3 (vLLM) and GLM-4.5 (SGLang) when the
# request's tool parser reads a complete call there.
KIMI_K2_SECTION = ("<|tool_calls_section_begin|>",)
TOOL_CALL = ("<tool_call>",)


def _tags(name: str, tags: tuple[str, str], force: bool, sections: tuple[str, ...] = (),
          calls: tuple[str, ...] = ()) -> Callable[[], ReasoningDetector]:
    return lambda: ThinkTagDetector(name, tags[0], tags[1], force_reasoning=force, section_markers=sections,
                                    call_markers=calls)


REASONING_PARSERS: dict[str, Callable[[], ReasoningDetector]] = {
    "qwen3": _tags("qwen3", THINK, False, calls=TOOL_CALL),
    "qwen3-thinking": _tags("qwen3-thinking", THINK, True, calls=TOOL_CALL),
    "deepseek-r1": _tags("deepseek-r1", THINK, True),
    "deepseek-v3": _tags("deepseek-v3", THINK, False),
    "glm45": _tags("glm45", THINK, False, calls=TOOL_CALL),
    "kimi": _tags("kimi", KIMI_THINK, False),
    "kimi_k2": _tags("kimi_k2", THINK, False, sections=KIMI_K2_SECTION),
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
