"""The formats added after qwen25/llama3/mistral: qwen3_coder, deepseekv3/v31/v32, kimi_k2, glm47.

Cases follow the facts the peers' parser tests check (vLLM's and SGLang's suites: single and parallel
calls, text before a call, unicode, schema-typed values, malformed and unknown calls, unterminated
output); each is parsed whole and streamed at every chunk size, and both must agree exactly."""

from __future__ import annotations

import pytest

from lightllm.server.function_call.registry import DETECTORS, TOOL_PARSER_NAMES, detector_class
from tests.test_tool_parsers import TOOLS, check_case

SCHEMAS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                     "unit": {"type": "string", "enum": ["c", "f"]}}},
    "add": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
    "search": {"type": "object", "properties": {
        "q": {"type": "string"}, "limit": {"type": ["integer", "null"]}, "exact": {"type": "boolean"},
        "filters": {"type": "object"}, "tags": {"type": "array", "items": {"type": "string"}}}},
    "calculate": {"type": "object", "properties": {"expression": {"type": "string"}}},
    "get_current_weather": {"type": "object", "properties": {}},
}


def run(name: str, case: tuple, **kw):
    check_case(lambda: detector_class(name)(TOOLS, SCHEMAS), *case, **kw)


def coder(name: str, params: list[tuple[str, str]], wrap: bool = True) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    call = f"<function={name}>\n{body}</function>"
    return f"<tool_call>\n{call}\n</tool_call>" if wrap else call


QWEN3_CODER = [
    (coder("get_weather", [("city", "Beijing"), ("days", "3")]), None, [("get_weather", {"city": "Beijing", "days": 3})]),
    ("Let me check.\n" + coder("get_weather", [("city", "北京")]), "Let me check.\n", [("get_weather", {"city": "北京"})]),
    (coder("get_weather", [("city", "Paris")]) + "\n" + coder("add", [("a", "1.5"), ("b", "2")]), None,
     [("get_weather", {"city": "Paris"}), ("add", {"a": 1.5, "b": 2})]),
    # strings keep digits and inner newlines; typed values decode; undeclared parameters decode as JSON
    (coder("search", [("q", "123"), ("limit", "null"), ("exact", "True"), ("filters", '{"lang": "en"}'),
                      ("tags", '["a", "b"]'), ("extra", "[1, 2]")]), None,
     [("search", {"q": "123", "limit": None, "exact": True, "filters": {"lang": "en"}, "tags": ["a", "b"],
                  "extra": [1, 2]})]),
    (coder("calculate", [("expression", "def f(x):\n    return x < 3 and x > 1")]), None,
     [("calculate", {"expression": "def f(x):\n    return x < 3 and x > 1"})]),
    (coder("get_weather", [("city", "Oslo"), ("days", "three")]), None,
     [("get_weather", {"city": "Oslo", "days": "three"})]),  # not an integer: kept as written
    (coder("get_weather", [("city", "Rome")], wrap=False), None, [("get_weather", {"city": "Rome"})]),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nLima\n</function>\n</tool_call>", None,
     [("get_weather", {"city": "Lima"})]),  # last parameter left open
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nLima\n</parameter>\n</function>", None,
     [("get_weather", {"city": "Lima"})]),  # EOS before </tool_call>
    ("<tool_call>\n<function=launch>\n</function>\n</tool_call>", "<tool_call>\n<function=launch>\n</function>\n</tool_call>", []),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nLi", "<tool_call>\n<function=get_weather>\n<parameter=city>\nLi", []),
    ("<tool_call>\n{\"name\": \"add\"}\n</tool_call>", "<tool_call>\n{\"name\": \"add\"}\n</tool_call>", []),
    ("<tool_call>\n<function=get_current_weather>\n</function>\n</tool_call>", None, [("get_current_weather", {})]),
    ("No call, just <tool_", "No call, just <tool_", []),
    ("plain answer", "plain answer", []),
]

DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def ds3(*calls: tuple[str, str]) -> str:
    return DS_BEGIN + "\n".join(f"{DS_CALL}function{DS_SEP}{n}\n```json\n{a}\n```{DS_CALL_END}" for n, a in calls) + DS_END


def ds31(*calls: tuple[str, str]) -> str:
    return DS_BEGIN + "".join(f"{DS_CALL}{n}{DS_SEP}{a}{DS_CALL_END}" for n, a in calls) + DS_END


DEEPSEEKV3 = [
    (ds3(("get_weather", '{"city": "Tokyo"}')), None, [("get_weather", {"city": "Tokyo"})]),
    ("Checking." + ds3(("get_weather", '{"city": "东京"}'), ("add", '{"a": 1, "b": 2}')), "Checking.",
     [("get_weather", {"city": "东京"}), ("add", {"a": 1, "b": 2})]),
    (ds3(("search", '{"q": "a ``` b"}')), None, [("search", {"q": "a ``` b"})]),
    (ds3(("get_weather", '{"city": }')), ds3(("get_weather", '{"city": }')), []),
    (ds3(("nope", "{}")), ds3(("nope", "{}")), []),
    (DS_BEGIN + f"{DS_CALL}function{DS_SEP}add\n```json\n" + '{"a": 1}', DS_BEGIN + f"{DS_CALL}function{DS_SEP}add\n```json\n" + '{"a": 1}', []),
    ("Just text", "Just text", []),
]

DEEPSEEKV31 = [
    (ds31(("get_weather", '{"city": "Tokyo"}')), None, [("get_weather", {"city": "Tokyo"})]),
    ("Sure." + ds31(("add", '{"a": 1}'), ("search", '{"q": "北京"}')), "Sure.", [("add", {"a": 1}), ("search", {"q": "北京"})]),
    (ds31(("add", '{"a": 1}'))[:-len(DS_END)], None, [("add", {"a": 1})]),  # EOS before the section end
    (DS_BEGIN + DS_CALL + "add" + DS_SEP + '{"a": 1}', None, [("add", {"a": 1})]),  # and before the call end
    (ds31(("add", '{"a": ')), ds31(("add", '{"a": ')), []),
    (ds31(("add", '{"a": 1}'), ("add", "broken")), None, [("add", {"a": 1})]),  # malformed last call dropped
    ("half a marker <｜tool▁ca", "half a marker <｜tool▁ca", []),
]

DSML = "｜DSML｜"


def dsml(*invokes: tuple[str, list[tuple[str, str, str]]]) -> str:
    out = f"<{DSML}function_calls>\n"
    for name, params in invokes:
        out += f'<{DSML}invoke name="{name}">\n'
        out += "".join(f'<{DSML}parameter name="{k}" string="{s}">{v}</{DSML}parameter>\n' for k, s, v in params)
        out += f"</{DSML}invoke>\n"
    return out + f"</{DSML}function_calls>"


DEEPSEEKV32 = [
    (dsml(("get_weather", [("city", "true", "Hangzhou"), ("days", "false", "3")])), None,
     [("get_weather", {"city": "Hangzhou", "days": 3})]),
    ("让我查一下。" + dsml(("get_weather", [("city", "true", "杭州")]), ("search", [("filters", "false", '{"a": [1]}')])),
     "让我查一下。", [("get_weather", {"city": "杭州"}), ("search", {"filters": {"a": [1]}})]),
    (dsml(("search", [("q", "true", "123"), ("exact", "false", "true")])), None, [("search", {"q": "123", "exact": True})]),
    (dsml(("add", [])), None, [("add", {})]),
    (dsml(("nope", [])), dsml(("nope", [])), []),
    ("no calls", "no calls", []),
]


def kimi(*calls: tuple[str, str]) -> str:
    return ("<|tool_calls_section_begin|>" + "".join(
        f"<|tool_call_begin|>{cid}<|tool_call_argument_begin|>{args}<|tool_call_end|>" for cid, args in calls)
        + "<|tool_calls_section_end|>")


KIMI_K2 = [
    (kimi(("functions.get_weather:0", '{"city": "Beijing"}')), None, [("get_weather", {"city": "Beijing"})]),
    ("I'll check both." + kimi(("functions.get_weather:0", '{"city": "北京"}'), ("functions.add:1", '{"a": 1, "b": 2}')),
     "I'll check both.", [("get_weather", {"city": "北京"}), ("add", {"a": 1, "b": 2})]),
    (kimi(("functions.search:0", '{"q": "a <|tool_call_end|"}')), None, [("search", {"q": "a <|tool_call_end|"})]),
    (kimi(("functions.nope:0", "{}")), kimi(("functions.nope:0", "{}")), []),
    (kimi(("functions.add:0", '{"a": }')), kimi(("functions.add:0", '{"a": }')), []),
    ("text <|tool_calls_sec", "text <|tool_calls_sec", []),
]


def glm(name: str, args: list[tuple[str, str]], newlines: bool) -> str:
    sep = "\n" if newlines else ""
    return f"<tool_call>{name}{sep}" + "".join(f"<arg_key>{k}</arg_key>{sep}<arg_value>{v}</arg_value>{sep}"
                                               for k, v in args) + "</tool_call>"


GLM47 = [
    (glm("get_weather", [("city", "Beijing"), ("days", "2")], False), None, [("get_weather", {"city": "Beijing", "days": 2})]),
    (glm("get_weather", [("city", "Beijing"), ("days", "2")], True), None, [("get_weather", {"city": "Beijing", "days": 2})]),
    ("好的。\n" + glm("get_weather", [("city", "北京")], True) + "\n" + glm("add", [("a", "1"), ("b", "2.5")], True),
     "好的。\n", [("get_weather", {"city": "北京"}), ("add", {"a": 1, "b": 2.5})]),
    (glm("search", [("q", "42"), ("tags", '["x"]'), ("exact", "false")], False), None,
     [("search", {"q": "42", "tags": ["x"], "exact": False})]),
    (glm("get_current_weather", [], False), None, [("get_current_weather", {})]),
    (glm("nope", [("a", "1")], True), glm("nope", [("a", "1")], True), []),
    ("<tool_call>add\n<arg_key>a</arg_key>\n", "<tool_call>add\n<arg_key>a</arg_key>\n", []),
    ("Nothing to call.", "Nothing to call.", []),
]

FORMATS = {"qwen3_coder": QWEN3_CODER, "deepseekv3": DEEPSEEKV3, "deepseekv31": DEEPSEEKV31,
           "deepseekv32": DEEPSEEKV32, "kimi_k2": KIMI_K2, "glm47": GLM47}


@pytest.mark.parametrize("name,case", [(n, i) for n, cases in FORMATS.items() for i in range(len(cases))])
def test_format(name, case):
    run(name, FORMATS[name][case])


def test_kimi_call_ids_are_the_models_own():
    from lightllm.server.function_call.base import parse_complete

    text = kimi(("functions.get_weather:0", '{"city": "A"}'), ("functions.add:1", '{"a": 1}'))
    _, calls = parse_complete(detector_class("kimi_k2")(TOOLS, SCHEMAS), text)
    assert [c["id"] for c in calls] == ["functions.get_weather:0", "functions.add:1"]


def test_lightllm_parser_names_and_aliases():
    # Exactly these names, in this order, are what --tool_call_parser offers and what an unknown name's error lists.
    names = ["deepseekv3", "deepseekv31", "deepseekv32", "glm45", "glm47", "gpt-oss", "hermes", "kimi_k2", "llama3", "mistral",
             "qwen", "qwen25", "qwen3_coder"]
    assert TOOL_PARSER_NAMES == names and set(DETECTORS) == set(names)
    assert DETECTORS["qwen"] is DETECTORS["hermes"] is DETECTORS["qwen25"]
    assert DETECTORS["glm45"] is DETECTORS["glm47"]
    with pytest.raises(ValueError) as err:
        detector_class("nonsense")
    assert str(err.value) == f"unknown tool call parser 'nonsense'; choose from {', '.join(names)}"


def test_strict_tools_only_yield_calls_that_satisfy_their_schema():
    strict_schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                     "additionalProperties": False}
    good = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    bad = '<tool_call>{"name": "get_weather", "arguments": {"town": "Oslo"}}</tool_call>'
    for text, expected in ((good, [("get_weather", {"city": "Oslo"})]), (bad, [])):
        content = None if expected else text
        check_case(lambda: detector_class("qwen25")(TOOLS, {"get_weather": strict_schema}, strict={"get_weather"}),
                   text, content, expected)
    # not strict: the same call is returned as the model wrote it
    check_case(lambda: detector_class("qwen25")(TOOLS, {"get_weather": strict_schema}), bad, None,
               [("get_weather", {"town": "Oslo"})])
    xml = "<tool_call>\n<function=get_weather>\n<parameter=town>\nOslo\n</parameter>\n</function>\n</tool_call>"
    check_case(lambda: detector_class("qwen3_coder")(TOOLS, {"get_weather": strict_schema}, strict={"get_weather"}),
               xml, xml, [])
