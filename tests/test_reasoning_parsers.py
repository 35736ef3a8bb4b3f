"""Reasoning parsers: each case split whole and streamed at every chunk size must agree exactly, and
the chained reasoning → tool-call parsing of a chat output must stream to its non-streamed message."""

from __future__ import annotations

import json

import pytest

from lightllm.server.function_call.context import ToolContext
from lightllm.server.function_call.registry import detector_class
from lightllm.server.openai.chat_output import ChatOutputParser
from lightllm.server.reasoning.base import ReasoningStreamParser
from lightllm.server.reasoning.registry import REASONING_PARSER_NAMES, reasoning_detector

# (parser, prompt tail, output, expected reasoning, expected content)
THINK_CASES = [
    ("qwen3", "", "<think>\nLet me think.\n</think>\n\nThe answer is 4.", "Let me think.", "The answer is 4."),
    ("qwen3", "", "The answer is 4.", "", "The answer is 4."),  # thinking off / no block
    ("qwen3", "", "  <think>a</think>b", "a", "b"),
    ("qwen3", "", "<think>\nstill thinking when max_tokens hit", "still thinking when max_tokens hit", ""),
    ("qwen3", "", "<think>x</think>", "x", ""),
    ("qwen3", "", "<think></think>\n\nDirect.", "", "Direct."),
    ("qwen3", "", "Use <think> tags like this </think> ok", "", "Use <think> tags like this </think> ok"),
    ("qwen3", "", "<thin", "", "<thin"),  # a partial tag that never completes is text
    ("qwen3", "", "<think>a</thi", "a</thi", ""),  # unterminated: the partial end tag is reasoning
    ("qwen3", "", "", "", ""),
    ("qwen3", "", "<think>\n多步推理：2+2=4\n</think>\n\n答案是 4。", "多步推理：2+2=4", "答案是 4。"),
    ("qwen3", "<|im_start|>assistant\n<think>\n", "reasoning from the prompt's tag</think>\n\nAnswer",
     "reasoning from the prompt's tag", "Answer"),
    ("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n", "Answer without thinking", "", "Answer without thinking"),
    ("qwen3-thinking", "", "step 1, step 2\n</think>\n\nDone.", "step 1, step 2", "Done."),
    ("qwen3-thinking", "", "<think>\nrepeated open tag\n</think>\nDone.", "repeated open tag", "Done."),
    ("qwen3-thinking", "", "no end tag at all", "no end tag at all", ""),
    ("deepseek-r1", "<｜Assistant｜><think>\n", "Hmm.\n</think>\n\nParis.", "Hmm.", "Paris."),
    ("deepseek-r1", "<｜Assistant｜>", "<think>\nHmm.\n</think>Paris.", "Hmm.", "Paris."),
    ("deepseek-v3", "<｜Assistant｜></think>", "Plain answer.", "", "Plain answer."),
    ("deepseek-v3", "<｜Assistant｜><think>", "Thinking...</think>Answer.", "Thinking...", "Answer."),
    ("glm45", "<|assistant|>", "<think>glm thinks</think>\nreply", "glm thinks", "reply"),
    ("glm45", "<|assistant|>\n<think></think>", "\nreply", "", "\nreply"),
    ("kimi", "", "◁think▷kimi thinks◁/think▷answer", "kimi thinks", "answer"),
    ("kimi", "", "answer only", "", "answer only"),
    ("kimi_k2", "", "<think>k2 thinks</think>answer", "k2 thinks", "answer"),
]

HARMONY_CASES = [
    ("<|channel|>analysis<|message|>User asks 2+2. Easy.<|end|><|start|>assistant<|channel|>final<|message|>4",
     "User asks 2+2. Easy.", "4"),
    ("<|channel|>analysis<|message|>Thinking still", "Thinking still", ""),
    ("<|channel|>final<|message|>Direct answer", "", "Direct answer"),
    ("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>analysis<|message|>b<|end|>"
     "<|start|>assistant<|channel|>final<|message|>c", "ab", "c"),
    ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather "
     "<|constrain|>json<|message|>{\"city\": \"SF\"}<|call|>", "Need weather.",
     "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"SF\"}<|call|>"),
    ("No harmony markup", "", "No harmony markup"),
    ("", "", ""),
]


def stream_split(detector, text: str, size: int) -> tuple[str, str]:
    parser = ReasoningStreamParser(detector)
    reasoning = content = ""
    for i in range(0, len(text), size):
        r, c = parser.feed(text[i:i + size])
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    return reasoning + r, content + c


def check_split(detector_factory, text: str, reasoning: str, content: str) -> None:
    split = detector_factory().split(text, final=True)
    assert (split.reasoning, split.content) == (reasoning, content)
    for size in range(1, max(len(text), 1) + 1):
        assert stream_split(detector_factory(), text, size) == (reasoning, content), size


@pytest.mark.parametrize("case", range(len(THINK_CASES)))
def test_think_tag_formats(case):
    name, prompt, text, reasoning, content = THINK_CASES[case]
    check_split(lambda: reasoning_detector(name).for_prompt("<|im_start|>user\nhi<|im_end|>\n" + prompt),
                text, reasoning, content)


@pytest.mark.parametrize("case", range(len(HARMONY_CASES)))
def test_gpt_oss_harmony(case):
    text, reasoning, content = HARMONY_CASES[case]
    check_split(lambda: reasoning_detector("gpt-oss").for_prompt("<|start|>assistant"), text, reasoning, content)


def test_every_lightllm_name_exists_and_unknown_names_list_the_valid_ones():
    for name in ("qwen3", "qwen3-thinking", "deepseek-r1", "deepseek-v3", "glm45", "gpt-oss", "kimi", "kimi_k2"):
        assert name in REASONING_PARSER_NAMES
    with pytest.raises(ValueError, match="deepseek-r1"):
        reasoning_detector("nope")


# ---------------------------------------------------------------- reasoning followed by tool calls

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def output_parser(reasoning: str | None, tool_format: str | None, tools: list[dict] | None = None,
                  prompt: str = "") -> ChatOutputParser:
    tools = tools or TOOLS
    context = None
    if tool_format:
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        detector = detector_class(tool_format)(set(schemas), schemas)
        context = ToolContext(mode="auto", tools=tools, fmt=tool_format, template_has_tools=True, detector=detector)
    return ChatOutputParser(reasoning_detector(reasoning).for_prompt(prompt) if reasoning else None, context)


def stream_message(parser: ChatOutputParser, text: str, size: int) -> dict:
    stream = parser.stream()
    deltas = []
    for i in range(0, len(text), size):
        deltas += stream.feed(text[i:i + size])
    deltas += stream.finish()
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    seen_content = False
    for d in deltas:  # reasoning deltas all come before the answer's
        seen_content |= "content" in d or "tool_calls" in d
        assert not (seen_content and "reasoning_content" in d)
    calls: list[dict] = []
    for d in deltas:
        for tc in d.get("tool_calls", []):
            if tc["index"] == len(calls):
                calls.append({"name": tc["function"]["name"], "arguments": tc["function"]["arguments"]})
            else:
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    return {"reasoning": reasoning or None, "content": content, "calls": calls}


CHAINED = [
    ("qwen3", "qwen25", f"<think>I should call the tool.</think>\n\n{CALL}", "I should call the tool.", None, ["get_weather"]),
    # a complete call inside the block ends it (see test_reasoning_tools.py); text after the call is dropped
    ("qwen3", "qwen25", f"<think>Maybe {CALL} no.</think>\n\nIt is sunny.", "Maybe", None, ["get_weather"]),
    ("qwen3", "qwen25", f"<think>Drafting {CALL}", "Drafting", None, ["get_weather"]),
    ("qwen3", None, f"<think>Drafting {CALL}", f"Drafting {CALL}", None, []),  # no tools: it stays reasoning
    ("qwen3", "qwen25", f"Sure.\n{CALL}", None, "Sure.\n", ["get_weather"]),
    ("qwen3", None, "<think>r</think>answer", "r", "answer", []),
    (None, "qwen25", f"<think>r</think>{CALL}", None, "<think>r</think>", ["get_weather"]),  # separate_reasoning off
    ("gpt-oss", None, "<|channel|>analysis<|message|>r<|end|><|start|>assistant<|channel|>final<|message|>a", "r", "a", []),
]


@pytest.mark.parametrize("case", range(len(CHAINED)))
def test_reasoning_then_tool_calls_stream_equals_whole(case):
    reasoning_name, tool_format, text, reasoning, content, names = CHAINED[case]
    parsed = output_parser(reasoning_name, tool_format).parse(text)
    assert parsed.reasoning == reasoning
    assert parsed.content == content
    assert [c["function"]["name"] for c in parsed.tool_calls] == names
    for size in range(1, len(text) + 1):
        streamed = stream_message(output_parser(reasoning_name, tool_format), text, size)
        assert streamed["reasoning"] == parsed.reasoning, size
        assert streamed["content"] == (parsed.content or ""), size
        assert [(c["name"], json.loads(c["arguments"])) for c in streamed["calls"]] == \
               [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls], size
