"""Tool-call detectors: every case parsed whole and streamed at every chunk size must agree, and the
stream must obey OpenAI's delta invariants."""

from __future__ import annotations

import json

import pytest

from lightllm.server.function_call.base import ToolStreamParser, parse_complete
from lightllm.server.function_call.constrained import NamedDetector, RequiredDetector
from lightllm.server.function_call.registry import detector_class

TOOLS = {"get_weather", "add", "search", "calculate", "get_current_weather"}
W = '{"name": "get_weather", "arguments": {"city": "Beijing"}}'

# (text, expected content or None, expected [(name, arguments dict)])
QWEN25 = [
    (f"<tool_call>\n{W}\n</tool_call>", None, [("get_weather", {"city": "Beijing"})]),
    (f"<tool_call>{W}</tool_call>", None, [("get_weather", {"city": "Beijing"})]),
    (f"Let me check.\n<tool_call>\n{W}\n</tool_call>", "Let me check.\n", [("get_weather", {"city": "Beijing"})]),
    (f"<tool_call>\n{W}\n</tool_call>\n<tool_call>\n" + '{"name": "add", "arguments": {"a": 1, "b": 2}}' + "\n</tool_call>",
     None, [("get_weather", {"city": "Beijing"}), ("add", {"a": 1, "b": 2})]),
    (f"<tool_call>\n{W}", None, [("get_weather", {"city": "Beijing"})]),  # unterminated at EOS
    (f"<tool_call>\n{W}\n</tool_call>\nDone, see above.", None, [("get_weather", {"city": "Beijing"})]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', []),  # malformed
    ('<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>', []),  # unknown tool
    ('<tool_call>{"name": "search", "arguments": {"q": {"nested": [1, {"deep": [true, null]}]}}}</tool_call>', None,
     [("search", {"q": {"nested": [1, {"deep": [True, None]}]}})]),
    ('<tool_call>{"name": "search", "arguments": {"q": "a { b } c }} \\" } \\\\ }"}}</tool_call>', None,
     [("search", {"q": 'a { b } c }} " } \\ }'})]),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "北京", "unit": "celsius"}}</tool_call>', None,
     [("get_weather", {"city": "北京", "unit": "celsius"})]),
    ("The answer is 42. No tools needed.", "The answer is 42. No tools needed.", []),
    ("Use <tool_calls> wisely < tool", "Use <tool_calls> wisely < tool", []),
    ("I think <tool_", "I think <tool_", []),  # held-back partial marker flushed at the end
    ('<tool_call>\n{"name": "add", "parameters": {"a": 1}}\n</tool_call>', None, [("add", {"a": 1})]),
    ('<tool_call>\n{"name": "add"}\n</tool_call>', None, [("add", {})]),
    ('<tool_call>not json at all</tool_call> ok', "<tool_call>not json at all</tool_call> ok", []),
    ('```json\n{"name": "calculate", "arguments": {"expression": "25 * 4 + 10"}}\n```', None,
     [("calculate", {"expression": "25 * 4 + 10"})]),
    ('Here:\n```json\n{"answer": 1}\n```', 'Here:\n```json\n{"answer": 1}\n```', []),
    ('```python\nprint(1)\n```', '```python\nprint(1)\n```', []),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1.5e3, "b": -2, "flag": false}}\n</tool_call>', None,
     [("add", {"a": 1500.0, "b": -2, "flag": False})]),
    ('  \n<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("add", {"a": 1})]),
    ('{\n    "name": "get_weather",\n    "arguments": {"city": "北京"}\n}', None, [("get_weather", {"city": "北京"})]),
    ('{"answer": 42} is the JSON', '{"answer": 42} is the JSON', []),
    ('{"name": "get_weather", "arguments": {"city": "Oslo"}}\n<tool_call>{"name": "add", "arguments": {}}</tool_call>',
     None, [("get_weather", {"city": "Oslo"}), ("add", {})]),
    ('{"name": "get_weather", "arguments": {"city": "Oslo"', '{"name": "get_weather", "arguments": {"city": "Oslo"', []),
    ("", "", []),
]

LLAMA3 = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "add", "parameters": {}};{"name": "search", "parameters": {"q": "x"}}', None,
     [("add", {}), ("search", {"q": "x"})]),
    ('{"name": "add", "parameters": {"a": 1}}; {"name": "add", "parameters": {"a": 2}} ; {"name": "search", "parameters": {}}',
     None, [("add", {"a": 1}), ("add", {"a": 2}), ("search", {})]),
    ('<|python_tag|>{"name": "add", "parameters": {}}<|python_tag|>{"name": "search", "parameters": {}}', None,
     [("add", {}), ("search", {})]),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('Sure.<|python_tag|>{"name": "add", "parameters": {"a": 1}}', "Sure.", [("add", {"a": 1})]),
    ("Hello there, no tools here.", "Hello there, no tools here.", []),
    ('Sure: {"name": "add", "parameters": {}}', 'Sure: {"name": "add", "parameters": {}}', []),  # must start with {
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"name": "nope", "parameters": {}}', '{"name": "nope", "parameters": {}}', []),
    ('{"name": "add", "parameters": {"a": }', '{"name": "add", "parameters": {"a": }', []),
    ('{"name": "search", "parameters": {"q": "a } b { c \\" d"}}', None, [("search", {"q": 'a } b { c " d'})]),
    ('{"name": "search", "parameters": {"q": "上海天气"}}', None, [("search", {"q": "上海天气"})]),
    ('{"name": "search", "parameters": {"filters": {"tags": ["a", "b"], "range": {"lo": 1, "hi": [2, 3]}}}}', None,
     [("search", {"filters": {"tags": ["a", "b"], "range": {"lo": 1, "hi": [2, 3]}}})]),
    ('  {"name": "add", "parameters": {"x": true}}  ', None, [("add", {"x": True})]),
    ('{"name": "add", "parameters": {}} trailing words', None, [("add", {})]),
    ("I will use <|python", "I will use <|python", []),
    ('<|python_tag|>brave_search.call(query="x")', '<|python_tag|>brave_search.call(query="x")', []),
    ('{"name": "add", "parameters": {"a": null}}', None, [("add", {"a": None})]),
    ("", "", []),
]

MISTRAL = [
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 3.5, "b": 4}}]', None, [("add", {"a": 3.5, "b": 4})]),
    ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}]', None, [("add", {"a": 1})]),
    ('[TOOL_CALLS] [{"arguments": {"a": 1}, "name": "add"}]', None, [("add", {"a": 1})]),
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}, {"name": "search", "arguments": {"q": "[City Name]"}}]',
     None, [("add", {"a": 1}), ("search", {"q": "[City Name]"})]),
    ('Hello[TOOL_CALLS] [{"name": "add", "arguments": {}}]', "Hello", [("add", {})]),
    ('hi{hi[TOOL_CALLS]search{"q": "x"}', "hi{hi", [("search", {"q": "x"})]),
    ('[TOOL_CALLS]add{"a": 3.5, "b": 4}[TOOL_CALLS]search{"q": "y"}', None, [("add", {"a": 3.5, "b": 4}), ("search", {"q": "y"})]),
    ('[TOOL_CALLS]add[ARGS]{"a": 1}', None, [("add", {"a": 1})]),
    ('[TOOL_CALLS]add[CALL_ID]abc123XYZ[ARGS]{"a": 1}', None, [("add", {"a": 1})]),
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}]\nextra trailing data', None, [("add", {"a": 1})]),
    ("[TOOL_CALLS] not json at all", "[TOOL_CALLS] not json at all", []),
    ("Just text.", "Just text.", []),
    ('[TOOL_CALLS] [{"name": "unknown_fn", "arguments": {}}]', '[TOOL_CALLS] [{"name": "unknown_fn", "arguments": {}}]', []),
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": }}]', '[TOOL_CALLS] [{"name": "add", "arguments": {"a": }}]', []),
    ('[TOOL_CALLS]  [ {"name":"add" , "arguments" : {"a": 1} } ]', None, [("add", {"a": 1})]),
    ('[TOOL_CALLS] [{"name": "search", "arguments": {"q": "北京 } ] \\" ["}}]', None, [("search", {"q": '北京 } ] " ['})]),
    ('[TOOL_CALLS] [{"name": "search", "arguments": {"deep": {"list": [[1], [2, {"x": []}]]}}}]', None,
     [("search", {"deep": {"list": [[1], [2, {"x": []}]]}})]),
    ("Partial [TOOL_", "Partial [TOOL_", []),
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}', '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}', []),
    ('[TOOL_CALLS]get_weather{"city": "Paris", "unit": "celsius"}', None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    ("", "", []),
]


def stream(detector, text: str, size: int, max_calls=None) -> list[dict]:
    parser = ToolStreamParser(detector, max_calls)
    deltas = []
    for i in range(0, len(text), size):
        deltas += parser.feed(text[i:i + size])
    return deltas + parser.finish()


def reassemble(deltas: list[dict]) -> tuple[str, list[dict]]:
    """Check the OpenAI delta invariants while rebuilding content and calls."""
    content, calls = "", []
    for delta in deltas:
        assert ("content" in delta) != ("tool_calls" in delta), delta
        if "content" in delta:
            assert delta["content"], "empty content delta"
            content += delta["content"]
            continue
        assert len(delta["tool_calls"]) == 1
        tc = delta["tool_calls"][0]
        assert "name" in tc["function"], "every tool-call delta must carry function.name (documented client)"
        if tc["index"] == len(calls):  # first delta of a call
            assert tc["id"] and tc["type"] == "function" and tc["function"]["name"]
            calls.append({"id": tc["id"], "name": tc["function"]["name"], "arguments": tc["function"]["arguments"]})
        else:
            assert tc["index"] == len(calls) - 1, "indexes must go 0, 1, 2 in order"
            assert "id" not in tc and tc["function"]["name"] is None
            calls[-1]["arguments"] += tc["function"]["arguments"]
    assert len({c["id"] for c in calls}) == len(calls)
    return content, calls


def check_case(detector_factory, text, content, expected, id_len=None):
    got_content, got_calls = parse_complete(detector_factory(), text)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == expected
    for call in got_calls:
        assert "\\u" not in call["function"]["arguments"]  # Chinese stays readable
        if id_len:
            assert len(call["id"]) == id_len and call["id"].isalnum()
    for size in range(1, max(len(text), 1) + 1):
        s_content, s_calls = reassemble(stream(detector_factory(), text, size))
        assert s_content == (content or ""), (size, s_content)
        assert [(c["name"], c["arguments"]) for c in s_calls] == \
               [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls], size


@pytest.mark.parametrize("case", range(len(QWEN25)))
def test_qwen25(case):
    check_case(lambda: detector_class("qwen25")(TOOLS), *QWEN25[case])


@pytest.mark.parametrize("case", range(len(LLAMA3)))
def test_llama3(case):
    check_case(lambda: detector_class("llama3")(TOOLS), *LLAMA3[case])


@pytest.mark.parametrize("case", range(len(MISTRAL)))
def test_mistral(case):
    check_case(lambda: detector_class("mistral")(TOOLS), *MISTRAL[case], id_len=9)


CONSTRAINED_REQUIRED = [
    ('[{"name": "add", "parameters": {"a": 1, "b": 2}}]', [("add", {"a": 1, "b": 2})]),
    ('[{"name": "add", "parameters": {"a": 1}}, {"name": "search", "parameters": {"q": "x ] }"}}]',
     [("add", {"a": 1}), ("search", {"q": "x ] }"})]),
    ('[{"name": "search", "parameters": {"q": "天气"}}]', [("search", {"q": "天气"})]),
]


@pytest.mark.parametrize("case", range(len(CONSTRAINED_REQUIRED)))
def test_required_mode_streams_arguments_incrementally(case):
    text, expected = CONSTRAINED_REQUIRED[case]
    check_case(lambda: RequiredDetector(TOOLS), text, None, expected)
    deltas = stream(RequiredDetector(TOOLS), text, 1)
    assert sum(1 for d in deltas if d.get("tool_calls") and d["tool_calls"][0]["index"] == 0) > 3


def test_named_mode_and_parallel_limit():
    check_case(lambda: NamedDetector(TOOLS, "add"), '{"a": 1, "b": {"c": [1, 2]}}', None, [("add", {"a": 1, "b": {"c": [1, 2]}})])
    text = f"<tool_call>{W}</tool_call><tool_call>" + '{"name": "add", "arguments": {}}' + "</tool_call>"
    _, calls = parse_complete(detector_class("qwen25")(TOOLS), text, max_calls=1)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    _, s_calls = reassemble(stream(detector_class("qwen25")(TOOLS), text, 3, max_calls=1))
    assert [c["name"] for c in s_calls] == ["get_weather"]


def test_required_mode_drops_a_repeated_call_and_asks_to_stop():
    one = '{"name": "add", "parameters": {"a": 1}}'
    other = '{"name": "add", "parameters": {"a": 2}}'
    looping = f"[{one}, {other}, {one}, {one}, {one}"
    check_case(lambda: RequiredDetector(TOOLS), looping, None, [("add", {"a": 1}), ("add", {"a": 2})])
    assert RequiredDetector(TOOLS).scan(f"[{one}, {other}, {one}", final=False).stop
    assert not RequiredDetector(TOOLS).scan(f"[{one}, {other}", final=False).stop
    # same arguments in another key order are the same call
    assert RequiredDetector(TOOLS).scan('[{"name": "add", "parameters": {"a": 1, "b": 2}}, '
                                        '{"name": "add", "parameters": {"b": 2, "a": 1}}', final=False).stop


def test_a_call_cut_by_the_length_limit_is_not_returned():
    first = '{"name": "add", "parameters": {"a": 1}}'
    # A later call still open at the end was never streamed and is not returned.
    check_case(lambda: RequiredDetector(TOOLS), f'[{first}, {{"name": "search", "parameters": {{"q": "un', None,
               [("add", {"a": 1})])
    # The first call streams as it grows; cut off, it is not a call in the non-streamed response (its
    # arguments are not JSON), which then returns the raw output as text.
    text = '[{"name": "search", "parameters": {"q": "unfinish'
    content, calls = parse_complete(RequiredDetector(TOOLS), text)
    assert calls == [] and content == text
