"""Reasoning models that call tools: harmony (gpt-oss) calls, a tool-call marker that ends the reasoning
block, and the smaller fixes around them (a Kimi-K2 section with one malformed call).

Every case is parsed whole and streamed at every chunk size, and both must agree exactly. Cases follow
the peers' tests (vLLM tests/tool_parsers/test_openai_tool_parser.py and tests/reasoning/, SGLang's
gpt-oss and kimi tests, llama.cpp tests/test-chat.cpp); where the peers disagree the comment says what
we chose."""

from __future__ import annotations

import json

import pytest

from lightllm.server.function_call.base import parse_complete
from lightllm.server.function_call.registry import detector_class
from lightllm.server.parser_selection import select_parsers
from tests.test_reasoning_parsers import output_parser, stream_message
from tests.test_tool_formats import SCHEMAS, kimi
from tests.test_tool_parsers import TOOLS, check_case

OPENAI_TOOLS = [{"type": "function", "function": {"name": name, "parameters": schema}}
                for name, schema in SCHEMAS.items()]


def check_message(reasoning_name, tool_format, text, reasoning, content, calls, tools=OPENAI_TOOLS, prompt=""):
    """Parsed whole, then streamed at every chunk size: the same reasoning, content and calls."""
    def parser():
        return output_parser(reasoning_name, tool_format, tools, prompt)

    parsed = parser().parse(text)
    assert (parsed.reasoning, parsed.content) == (reasoning, content)
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls]
    assert got == calls
    for size in range(1, len(text) + 1):
        streamed = stream_message(parser(), text, size)
        assert streamed["reasoning"] == parsed.reasoning, size
        assert streamed["content"] == (parsed.content or ""), size
        assert [(c["name"], c["arguments"]) for c in streamed["calls"]] == \
               [(c["function"]["name"], c["function"]["arguments"]) for c in parsed.tool_calls], size


# ------------------------------------------------------------------------------------ gpt-oss (harmony)

def analysis(text: str) -> str:
    return f"<|channel|>analysis<|message|>{text}<|end|>"


def call(name: str, body: str, constrain: str = " <|constrain|>json", end: str = "<|call|>") -> str:
    return f"<|start|>assistant<|channel|>commentary to=functions.{name}{constrain}<|message|>{body}{end}"


def final(text: str, end: str = "<|return|>") -> str:
    return f"<|start|>assistant<|channel|>final<|message|>{text}{end}"


W = '{"city": "Tokyo"}'
HARMONY = [
    # vLLM test_extract_tool_calls_single_tool: analysis then one call; no content
    (analysis("User asks the weather. Use get_weather.") + call("get_weather", W),
     "User asks the weather. Use get_weather.", None, [("get_weather", {"city": "Tokyo"})]),
    # ... the arguments with newlines in them are normalized JSON text
    (analysis("r") + call("get_weather", '{\n"city": "Tokyo"\n}'), "r", None, [("get_weather", {"city": "Tokyo"})]),
    # <|call|> is a stop token: the output may end right after the arguments
    (analysis("r") + call("get_weather", W, end=""), "r", None, [("get_weather", {"city": "Tokyo"})]),
    # the content type written without <|constrain|>, or not at all (vLLM assumes JSON)
    (analysis("r") + call("add", '{"a": 1}', constrain=" json"), "r", None, [("add", {"a": 1})]),
    (analysis("r") + call("add", '{"a": 1}', constrain=""), "r", None, [("add", {"a": 1})]),
    # the recipient in the role header (harmony allows both places)
    (analysis("r") + '<|start|>assistant to=functions.search<|channel|>commentary json<|message|>{"q": "x"}<|call|>',
     "r", None, [("search", {"q": "x"})]),
    # vLLM test_extract_tool_calls_multiple_tools: several calls, `{}` and an empty body are no arguments
    # (vLLM passes the empty body through as ""; we return "{}", the JSON object a client can load)
    (analysis("r") + call("get_weather", W) + call("search", '{"q": "Tokyo"}') + call("add", "{}") + call("add", ""),
     "r", None, [("get_weather", {"city": "Tokyo"}), ("search", {"q": "Tokyo"}), ("add", {}), ("add", {})]),
    # vLLM test_extract_tool_calls_with_content: a final message after the call is the content
    (analysis("r") + call("get_weather", W) + final("This tool call will get the weather."), "r",
     "This tool call will get the weather.", [("get_weather", {"city": "Tokyo"})]),
    # a preamble (commentary without a recipient) is shown to the user: content
    (analysis("r") + "<|start|>assistant<|channel|>commentary<|message|>Checking the weather.<|end|>"
     + call("get_weather", W), "r", "Checking the weather.", [("get_weather", {"city": "Tokyo"})]),
    # vLLM test_extract_tool_calls_no_tools: a final answer only
    (analysis("r") + final("This is a test"), "r", "This is a test", []),
    (final("Direct answer", end=""), None, "Direct answer", []),
    # a function the request did not offer, arguments that are no JSON object (vLLM passes "foo" through as
    # the arguments; SGLang drops the call; we keep the message as text), a built-in tool's message: text
    (analysis("r") + call("launch_rockets", "{}"), "r", call("launch_rockets", "{}"), []),
    (analysis("r") + call("add", "foo"), "r", call("add", "foo"), []),
    (analysis("r") + call("add", "[1, 2]"), "r", call("add", "[1, 2]"), []),
    (analysis("We need to browse.") + "<|start|>assistant<|channel|>analysis to=browser.search code<|message|>"
     '{"query": "x"}<|call|>', "We need to browse.{\"query\": \"x\"}", None, []),
    # a call cut by the length limit before its arguments closed is no call
    (analysis("r") + call("get_weather", '{"city": "To', end=""), "r", call("get_weather", '{"city": "To', end=""), []),
    # unterminated reasoning: no call, no content
    (analysis("still thinking")[:-len("<|end|>")], "still thinking", None, []),
    # Chinese stays readable in the arguments
    (analysis("r") + call("get_weather", '{"city": "北京"}'), "r", None, [("get_weather", {"city": "北京"})]),
]


@pytest.mark.parametrize("case", range(len(HARMONY)))
def test_gpt_oss_calls_with_the_gpt_oss_reasoning_parser(case):
    check_message("gpt-oss", "gpt-oss", *HARMONY[case])


# The tool parser alone (separate_reasoning off): the other messages stay text with their markup; SGLang's
# parser test (text, a call, text after it).
HARMONY_ALONE = [
    ("Let me search for that information.\n<|channel|>commentary to=functions.search<|constrain|>json<|message|>"
     '{"query": "rust programming", "limit": 10}<|call|>\nHere are the results...',
     "Let me search for that information.\n\nHere are the results...",
     [("search", {"query": "rust programming", "limit": 10})]),
    (analysis("r") + call("get_weather", W), analysis("r"), [("get_weather", {"city": "Tokyo"})]),
    (analysis("r") + final("hi"), analysis("r") + final("hi"), []),
    ("plain answer <|chan", "plain answer <|chan", []),
    ("<|channel|>commentary to=functions.add <|constrain|>json",
     "<|channel|>commentary to=functions.add <|constrain|>json", []),
]


@pytest.mark.parametrize("case", range(len(HARMONY_ALONE)))
def test_gpt_oss_tool_parser_alone(case):
    check_case(lambda: detector_class("gpt-oss")(TOOLS, SCHEMAS), *HARMONY_ALONE[case])


def test_gpt_oss_tool_parser_is_chosen_with_the_gpt_oss_reasoning_parser():
    harmony_template = "{{ '<|start|>assistant<|channel|>final<|message|>' }}"
    choice = select_parsers(None, None, harmony_template)
    assert (choice.tool_call_parser, choice.reasoning_parser) == ("gpt-oss", "gpt-oss")
    choice = select_parsers(None, "gpt-oss", "{{ messages }}")
    assert (choice.tool_call_parser, choice.reasoning_parser) == ("gpt-oss", "gpt-oss")
    assert select_parsers("qwen25", "gpt-oss", harmony_template).tool_call_parser == "qwen25"  # the flag wins
    assert select_parsers(None, None, "<tool_call>{{ x }}").tool_call_parser == "qwen25"


# ------------------------------------------------------------------------------------ Kimi-K2 sections

KIMI_MALFORMED = [
    # vLLM's and LightLLM's kimi parsers skip a call whose id is malformed and return the valid one after it
    (kimi(("functions.get_weather.0", '{"city": "A"}'), ("functions.get_weather:1", '{"city": "B"}')), None,
     [("get_weather", {"city": "B"})]),
    ("Both. " + kimi(("functions.nope:0", "{}"), ("functions.add:1", '{"a": 1}'), ("functions.add:2", '{"a": }')),
     "Both. ", [("add", {"a": 1})]),
    # no valid call at all: the whole output stays text
    (kimi(("functions.get_weather.0", '{"city": "A"}')), kimi(("functions.get_weather.0", '{"city": "A"}')), []),
    ("<|tool_calls_section_begin|><|tool_calls_section_end|>", "<|tool_calls_section_begin|><|tool_calls_section_end|>",
     []),
]


@pytest.mark.parametrize("case", range(len(KIMI_MALFORMED)))
def test_kimi_section_keeps_the_valid_calls_after_a_malformed_one(case):
    check_case(lambda: detector_class("kimi_k2")(TOOLS, SCHEMAS), *KIMI_MALFORMED[case])


def test_kimi_valid_call_after_a_malformed_one_keeps_its_own_id():
    text = kimi(("functions.get_weather.0", '{"city": "A"}'), ("functions.get_weather:1", '{"city": "B"}'))
    _, calls = parse_complete(detector_class("kimi_k2")(TOOLS, SCHEMAS), text)
    assert [c["id"] for c in calls] == ["functions.get_weather:1"]


# ------------------------------------------------------------------------------------ calls that end the reasoning

QCALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
QCALL2 = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
PARIS = [("get_weather", {"city": "Paris"})]
KCALL = kimi(("functions.get_weather:0", '{"city": "Paris"}'))
GCALL = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"

# (reasoning parser, tool parser or None (no tools / tool_choice none), output, reasoning, content, calls)
ENDS_REASONING = [
    # Kimi-K2: the calls section ends the block, with or without tools (vLLM, SGLang, llama.cpp)
    ("kimi_k2", "kimi_k2", "<think>Let me read the file." + KCALL, "Let me read the file.", None, PARIS),
    ("kimi_k2", None, "<think>Let me read the file." + KCALL, "Let me read the file.", KCALL, []),
    ("kimi_k2", "kimi_k2", "<think>Thinking.</think>" + KCALL, "Thinking.", None, PARIS),
    ("kimi_k2", "kimi_k2", "<think>still thinking <|tool_calls_sec", "still thinking <|tool_calls_sec", None, []),
    # Qwen3 / Hermes-style calls: `<tool_call>` ends the block when a complete call of an offered tool starts there
    ("qwen3", "qwen25", "<think>I need the weather" + QCALL, "I need the weather", None, PARIS),
    ("qwen3", "qwen25", "<think>I need the weather\n" + QCALL + "\n" + QCALL2, "I need the weather", None,
     PARIS + [("add", {"a": 1, "b": 2})]),
    ("qwen3-thinking", "qwen25", "I need the weather.\n\n" + QCALL, "I need the weather.", None, PARIS),
    ("qwen3", None, "<think>I need the weather" + QCALL, "I need the weather" + QCALL, None, []),  # no tools
    # a marker that starts no call leaves the reasoning as it is
    ("qwen3", "qwen25", "<think>Use <tool_call> tags.</think>Sure.", "Use <tool_call> tags.", "Sure.", []),
    ("qwen3", "qwen25", "<think>Try <tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call> no.</think>Sure.",
     "Try <tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call> no.", "Sure.", []),
    ("qwen3", "qwen25", "<think>Broken <tool_call>{\"name\": \"get_weather\", \"arguments\": {</tool_call>",
     "Broken <tool_call>{\"name\": \"get_weather\", \"arguments\": {</tool_call>", None, []),
    ("qwen3", "qwen25", "<think>Unterminated <tool_call>{\"name\": \"get_weather\"",
     "Unterminated <tool_call>{\"name\": \"get_weather\"", None, []),
    # the end tag inside a call's arguments does not end the block before the call
    ("qwen3", "qwen25", '<think>x <tool_call>{"name": "get_weather", "arguments": {"city": "</think>"}}</tool_call>',
     'x <tool_call>{"name": "get_weather", "arguments": {"city": "', '"}}</tool_call>', []),
    # a not-a-call marker, then a real call later in the same block
    ("qwen3", "qwen25", "<think>Use <tool_call> tags: <tool_call>.\n" + QCALL, "Use <tool_call> tags: <tool_call>.",
     None, PARIS),
    # GLM-4.5: its own call syntax after `<tool_call>` (SGLang's glm45 reasoning parser)
    ("glm45", "glm45", "<think>I need the weather" + GCALL, "I need the weather", None, PARIS),
    ("glm45", None, "<think>I need the weather" + GCALL, "I need the weather" + GCALL, None, []),
    # llama.cpp test-chat.cpp layouts: reasoning closed, then the call
    ("qwen3", "qwen25", "<think>I'm\nthinking</think>\n\n" + QCALL, "I'm\nthinking", None, PARIS),
    ("glm45", "glm45", "\n<think>I'm\nthinking</think>\n" + GCALL, "I'm\nthinking", None, PARIS),
]


@pytest.mark.parametrize("case", range(len(ENDS_REASONING)))
def test_a_tool_call_ends_the_reasoning_block(case):
    check_message(*ENDS_REASONING[case])


XCALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
OPENED = "<|im_start|>assistant\n<think>\n"  # a prompt that opens the block (Qwen3.5, Kimi-K2.5)
# Peer reasoning-parser cases (vLLM tests/reasoning/test_qwen3_tool_call_recovery.py and
# test_kimi_k2_reasoning_parser.py): (reasoning parser, tool parser, prompt, output, reasoning, content, calls)
PEER_REASONING = [
    # a Qwen3.5 XML call inside the block, the end tag after it: the call is returned
    ("qwen3", "qwen3_coder", "", "<think>The verification confirms my solution:\n- t = 24 minutes\n\n" + XCALL
     + "\n</think>", "The verification confirms my solution:\n- t = 24 minutes", None, PARIS),
    # ... with answer text after the end tag: vLLM moves that text before the promoted call and keeps it; we
    # end the reasoning at the call, and text after a call is dropped (as in every format), so it is lost
    ("qwen3", "qwen3_coder", "", "<think>verify result\n" + XCALL + "</think>Here is the answer.", "verify result",
     None, PARIS),
    # truncated before the end tag, the prompt having opened the block: the call is still returned
    ("qwen3", "qwen3_coder", OPENED, "verify result\n" + XCALL, "verify result", None, PARIS),
    ("qwen3", "qwen3_coder", "", "<think>some reasoning</think>plain response text", "some reasoning",
     "plain response text", []),
    # Kimi-K2.5: the prompt opens the block; the calls section ends it (here no tools: the section is text)
    ("kimi_k2", None, OPENED, "some reasoning<|tool_calls_section_begin|>tool call data", "some reasoning",
     "<|tool_calls_section_begin|>tool call data", []),
    ("kimi_k2", None, OPENED, "step by step reasoning</think>final answer", "step by step reasoning",
     "final answer", []),
    ("kimi_k2", None, "", "<think></think>final answer", None, "final answer", []),
    # vLLM treats Kimi output with no tags as reasoning whatever the prompt; we do when the prompt opened the
    # block (the K2.5 template), else it is the answer (a K2 prompt with thinking off)
    ("kimi_k2", None, OPENED, "implicit reasoning with no tags", "implicit reasoning with no tags", None, []),
    ("kimi_k2", None, "", "an answer with no tags", None, "an answer with no tags", []),
]


@pytest.mark.parametrize("case", range(len(PEER_REASONING)))
def test_peer_reasoning_cases(case):
    name, fmt, prompt, text, reasoning, content, calls = PEER_REASONING[case]
    check_message(name, fmt, text, reasoning, content, calls, prompt=prompt)


# ------------------------------------------------------------------------------------ grammar after the thinking

class RecordingMatcher:
    """A grammar that allows only token 7, recording what it accepted."""

    def __init__(self):
        self.accepted: list[int] = []

    def apply_mask(self, row):
        keep = row[7].clone()
        row.fill_(float("-inf"))
        row[7] = keep

    def accept_token(self, token_id):
        self.accepted.append(token_id)

    def is_terminated(self):
        return len(self.accepted) >= 2


def allowed(gate) -> list[int]:
    import torch

    row = torch.zeros(10)
    gate.apply_mask(row)
    return [i for i in range(10) if row[i] > float("-inf")]


def test_the_grammar_starts_after_the_end_tag():
    from lightllm.engine.protocol import ReasoningGate
    from lightllm.engine.reasoning_gate import GatedGrammar

    # inside the block (the prompt opened it): free until the end tag's tokens (8, 9), then the grammar
    inner = RecordingMatcher()
    gate = GatedGrammar(inner, ReasoningGate(start=(5,), end=(8, 9), in_block=True))
    for token in (1, 8, 2, 8, 9):
        assert allowed(gate) == list(range(10)) and not gate.is_terminated()
        gate.accept_token(token)
    assert allowed(gate) == [7] and inner.accepted == []
    gate.accept_token(7)
    gate.accept_token(7)
    assert inner.accepted == [7, 7] and gate.is_terminated()
    # the output may open a block: its first token is the start tag's or the grammar's
    inner = RecordingMatcher()
    gate = GatedGrammar(inner, ReasoningGate(start=(5, 6), end=(8,), in_block=False))
    assert allowed(gate) == [5, 7]
    gate.accept_token(5)
    assert allowed(gate) == [6]  # the rest of the start tag
    gate.accept_token(6)
    assert allowed(gate) == list(range(10))
    gate.accept_token(8)
    assert allowed(gate) == [7] and inner.accepted == []
    # ... or the grammar's first token: the grammar runs from there
    inner = RecordingMatcher()
    gate = GatedGrammar(inner, ReasoningGate(start=(5, 6), end=(8,), in_block=False))
    gate.accept_token(7)
    assert allowed(gate) == [7] and inner.accepted == [7]
