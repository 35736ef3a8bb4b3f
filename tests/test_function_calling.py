"""Function calling end to end: grammar-guaranteed calls on the embedded model, the documented tool
programs and a multi-turn exchange on Qwen2.5-Coder-0.5B-Instruct."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import openai
import pytest
import requests

from scripts.check_documented_programs import TOOLS_PLAIN, TOOLS_STREAM
from tests.conftest import API_KEY, REPO, ServerProcess
from tests.model_fetch import model_unavailable

WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city name", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
        "additionalProperties": False}}}
CALCULATE = {"type": "function", "function": {
    "name": "calculate", "description": "Evaluate a math expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 60}},
                   "required": ["expression"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search_flights", "description": "Find flights",
    "parameters": {"type": "object", "properties": {
        "origin": {"type": "string", "maxLength": 30}, "destination": {"type": "string", "maxLength": 30},
        "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
        "nonstop": {"type": "boolean"}}, "required": ["origin", "destination", "passengers"],
        "additionalProperties": False}}}
TOOLS = [WEATHER, CALCULATE, SEARCH]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

QUESTIONS = ["What's the weather in Paris?", "北京今天天气怎么样？", "How warm is it in Tokyo in fahrenheit?",
             "Compute 17 * 23.", "请计算 25 * 4 + 10 的结果", "Find me a flight from Berlin to Rome for 2 people.",
             "Is it raining in London?", "What is 2 to the power of 10?", "Book a nonstop flight NYC to LA for 1.",
             "Weather in Sydney please"]


@pytest.fixture(scope="module")
def client(smol_server):
    return openai.OpenAI(base_url=smol_server.base_url + "/v1", api_key=API_KEY)


def assert_valid_calls(calls, allowed: set[str]):
    assert calls, "expected at least one tool call"
    for call in calls:
        assert call.type == "function" and call.function.name in allowed and len(call.id) >= 9
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def stream_calls(stream):
    calls, finish = {}, []
    for chunk in stream:
        for choice in chunk.choices:
            if choice.finish_reason:
                finish.append(choice.finish_reason)
            for tc in choice.delta.tool_calls or []:
                if tc.index not in calls:
                    assert tc.id and tc.function.name
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or ""}
                else:
                    assert tc.id is None and not tc.function.name
                    calls[tc.index]["arguments"] += tc.function.arguments or ""
    return list(calls.values()), finish


@pytest.mark.parametrize("i", range(10))
def test_required_always_returns_schema_valid_calls(client, i):
    """Even numbers ask for a single call; odd ones allow parallel calls (a tiny model may repeat calls until
    max_tokens, in which case only the cut-off last call may be incomplete)."""
    question = QUESTIONS[i]
    kwargs = dict(model="m", messages=[{"role": "user", "content": question}], tools=TOOLS, tool_choice="required",
                  max_tokens=300, temperature=0.8, seed=i, parallel_tool_calls=i % 2 == 1)
    r = client.chat.completions.create(**kwargs)
    calls = r.choices[0].message.tool_calls
    if i % 2 == 0:
        assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    if r.choices[0].finish_reason == "length":
        calls = calls[:-1]
    assert_valid_calls(calls, set(SCHEMAS))
    s_calls, finish = stream_calls(client.chat.completions.create(**kwargs, stream=True))
    assert finish == [r.choices[0].finish_reason]
    assert [(c["name"], c["arguments"]) for c in s_calls] == \
           [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]


@pytest.mark.parametrize("i", range(10))
def test_named_choice_always_returns_that_call(client, i):
    tool = TOOLS[i % 3]
    name = tool["function"]["name"]
    choice = {"type": "function", "function": {"name": name}}
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTIONS[i]}], tools=TOOLS,
                                       tool_choice=choice, max_tokens=150, temperature=0.7, seed=100 + i)
    assert_valid_calls(r.choices[0].message.tool_calls, {name})
    calls, finish = stream_calls(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": QUESTIONS[i]}], tools=TOOLS, tool_choice=choice,
        max_tokens=150, temperature=0.7, seed=100 + i, stream=True))
    assert len(calls) == 1 and calls[0]["name"] == name and finish == ["stop"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS[name])


def test_response_format_json_schema_and_object(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer"}, "capital": {"type": "boolean"}},
              "required": ["city", "population", "capital"], "additionalProperties": False}
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Describe Paris as JSON."}],
                                       max_tokens=120, temperature=0,
                                       response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Give me a JSON object."}],
                                       max_tokens=200, temperature=0, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_tool_validation_errors(smol_server):
    url = smol_server.base_url + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        {"messages": msgs, "tools": []},
        {"messages": msgs, "tool_choice": "required"},
        {"messages": msgs, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"messages": msgs, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "banana"}}}]},
        {"messages": msgs, "tools": TOOLS, "tool_choice": "sometimes"},
        {"messages": msgs, "tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
    ]
    for body in cases:
        r = requests.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_tool_choice_none_and_multi_turn_history_render(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello"}], tools=TOOLS,
                                       tool_choice="none", max_tokens=10, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    history = [{"role": "user", "content": "What's the weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_abc123456", "type": "function",
                "function": {"name": "get_current_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_abc123456", "content": '{"temperature": 21}'}]
    r = client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=30, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ------------------------------------------------------------------------------------- Qwen2.5-Coder


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory):
    fetched = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_qwen25_coder.py")], capture_output=True,
                             text=True)
    if fetched.returncode != 0:
        model_unavailable(f"Qwen2.5-Coder GGUF could not be fetched: {fetched.stderr[-500:]}")
    path = fetched.stdout.strip().splitlines()[-1]
    # No parser flag: the server picks qwen25 from the template's <tool_call>, as `make serve` does.
    server = ServerProcess(["--model_dir", path, "--max_total_token_num", "20000", "--max_req_total_len", "8192"],
                           tmp_path_factory.mktemp("logs") / "qwen.log")
    yield server
    server.stop()


def run_doc_program(script: str, base_url: str) -> str:
    out = subprocess.run([sys.executable, "-c", script, base_url], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


# The function-calling programs of the docs, unchanged (tool_choice auto, temperature 0.7); the same text
# scripts/check_documented_programs.py runs against fresh default servers.
DOC_PLAIN, DOC_STREAM = TOOLS_PLAIN, TOOLS_STREAM


@pytest.mark.qwen
def test_documented_tool_programs_on_qwen(qwen_server):
    info = requests.get(qwen_server.base_url + "/get_server_info", timeout=10).json()
    assert info["tool_call_parser"] == "qwen25" and info["reasoning_parser"] is None
    plain = run_doc_program(DOC_PLAIN, qwen_server.base_url)
    assert "NAME get_current_weather" in plain
    args = json.loads(next(l[5:] for l in plain.splitlines() if l.startswith("ARGS ")))
    assert "北京" in args["city"]
    streamed = run_doc_program(DOC_STREAM, qwen_server.base_url)
    assert "NAME calculate" in streamed
    args = "".join(l[5:] for l in streamed.splitlines() if l.startswith("ARGS ") and l != "ARGS None")
    assert "25" in json.loads(args)["expression"]


@pytest.mark.qwen
def test_multi_turn_with_tool_result_on_qwen(qwen_server):
    client = openai.OpenAI(base_url=qwen_server.base_url + "/v1", api_key="unused")
    messages = [{"role": "system", "content": "You are a helpful assistant. Once a tool has answered, reply to the "
                                              "user in plain words using its result."},
                {"role": "user", "content": "What's the weather like in Paris today? Use celsius."}]
    first = client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER], temperature=0, max_tokens=100)
    calls = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls" and calls[0].function.name == "get_current_weather"
    assert "Paris" in json.loads(calls[0].function.arguments)["city"]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps({"temperature": 22, "sky": "sunny"})})
    # The 0.5B model tends to call the tool again; "none" asks for the answer, tools still in the prompt.
    final = client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER], tool_choice="none",
                                           temperature=0, max_tokens=80)
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.tool_calls is None
    assert "22" in final.choices[0].message.content


@pytest.mark.qwen
def test_constraints_apply_from_the_first_token_without_a_reasoning_parser_on_qwen(qwen_server):
    """No reasoning parser (Qwen2.5-Coder): forced calls and response_format constrain the whole output as
    before; a token the grammar never allows (the values are enums) stays out even when biased far above
    every other."""
    unit = {"type": "function", "function": {"name": "set_unit", "parameters": {
        "type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"],
        "additionalProperties": False}}}
    hmm = requests.post(qwen_server.base_url + "/tokenize", json={"prompt": " Hmm"}, timeout=30).json()["tokens"]
    base = {"messages": [{"role": "user", "content": "Which unit for Paris?"}], "temperature": 0,
            "max_tokens": 60, "logit_bias": {str(hmm[-1]): 100}}
    for extra in ({"tools": [unit], "tool_choice": "required"},
                  {"tools": [unit], "tool_choice": {"type": "function", "function": {"name": "set_unit"}}},
                  {"response_format": {"type": "json_schema", "json_schema": {
                      "name": "u", "schema": unit["function"]["parameters"]}}}):
        r = requests.post(qwen_server.base_url + "/v1/chat/completions", json={**base, **extra}, timeout=120).json()
        message = r["choices"][0]["message"]
        assert "reasoning_content" not in message and "Hmm" not in json.dumps(message), extra
        if "tools" in extra:
            call = message["tool_calls"][0]["function"]
            assert call["name"] == "set_unit" and json.loads(call["arguments"])["unit"] in ("celsius", "fahrenheit")
        else:
            assert json.loads(message["content"])["unit"] in ("celsius", "fahrenheit")
