"""The Anthropic Messages API (/v1/messages, /v1/messages/count_tokens) end to end with the official
`anthropic` SDK against the SmolLM2 server, plus the SSE event mapping (thinking, text, tool_use blocks)
on recorded outputs, which the small model cannot produce by itself."""

from __future__ import annotations

import asyncio
import json

import anthropic
import jsonschema
import pytest
import requests

from fastapi import FastAPI
from fastapi.testclient import TestClient

from lightllm.server.anthropic.convert import content_blocks
from lightllm.server.anthropic.stream import message_events
from lightllm.server.function_call.context import ToolContext
from lightllm.server.function_call.registry import detector_class
from lightllm.server.errors import APIError, install_error_handlers
from lightllm.server.generation import GenerationChunk, StopStringMatcher
from lightllm.server.openai.chat_output import ChatOutputParser
from lightllm.server.reasoning.registry import reasoning_detector
from tests.conftest import API_KEY, embedded_model_path

WEATHER = {"name": "get_current_weather", "description": "Get the current weather in a given city",
           "input_schema": {"type": "object", "properties": {
               "city": {"type": "string", "description": "The city name", "maxLength": 30},
               "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"], "additionalProperties": False}}
CALCULATE = {"name": "calculate", "description": "Evaluate a math expression",
             "input_schema": {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 30}},
                              "required": ["expression"], "additionalProperties": False}}
TOOLS = [WEATHER, CALCULATE]
SCHEMAS = {t["name"]: t["input_schema"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]
# This SDK has no sampling arguments (newer Claude models fix them); the server takes them from the body.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(smol_server):
    return anthropic.Anthropic(base_url=smol_server.base_url, api_key=API_KEY, max_retries=0)


def text_of(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


# ------------------------------------------------------------------------------------------ plain


def test_create_plain_with_system_string_and_blocks(client):
    r = client.messages.create(model="smol", max_tokens=12, extra_body=GREEDY, system="You are a helpful assistant.",
                               messages=[{"role": "user", "content": "Name a color."}], metadata={"user_id": "u1"})
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.stop_reason in ("end_turn", "max_tokens") and r.stop_sequence is None
    assert [b.type for b in r.content] == ["text"] and r.content[0].text
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 12
    # the system prompt as text blocks renders the same prompt, so greedy gives the same answer
    blocks = client.messages.create(model="smol", max_tokens=12, extra_body=GREEDY,
                                    system=[{"type": "text", "text": "You are a helpful assistant."}],
                                    messages=[{"role": "user", "content": [{"type": "text", "text": "Name a color."}]}])
    assert text_of(blocks) == text_of(r) and blocks.usage.input_tokens == r.usage.input_tokens


def test_max_tokens_and_stop_sequences(client):
    kwargs = dict(model="smol", extra_body=GREEDY, messages=[{"role": "user", "content": "Tell me about the sea."}])
    full = client.messages.create(max_tokens=5, **kwargs)
    assert full.stop_reason == "max_tokens" and full.stop_sequence is None and full.usage.output_tokens == 5
    full = client.messages.create(max_tokens=30, **kwargs)
    text = text_of(full)
    # a word of the answer that first occurs after some text: the answer stops right before it
    word = next(w for w in text.split()[1:] if len(w) >= 3 and text.index(w) > 0)
    stopped = client.messages.create(max_tokens=30, stop_sequences=["@@never@@", word], **kwargs)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert text_of(stopped) == text[:text.index(word)]
    with client.messages.stream(max_tokens=30, stop_sequences=[word], **kwargs) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text[:text.index(word)] and final.stop_reason == "stop_sequence" and final.stop_sequence == word


def test_a_final_assistant_turn_is_continued(client, smol_server):
    """A prefill: the reply continues the last assistant turn (without repeating it), as the chat route's
    continue_final_message does; the prompt ends with the prefill's text, not a new assistant header."""
    from lightllm.tokenizer import load_tokenizer

    prefill = "The capital of France is"
    messages = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": prefill}]
    r = client.messages.create(model="smol", max_tokens=8, extra_body=GREEDY, messages=messages)
    chat = requests.post(smol_server.base_url + "/v1/chat/completions", headers={"x-api-key": API_KEY}, timeout=60,
                         json={"messages": messages, "max_tokens": 8, "temperature": 0,
                               "add_generation_prompt": False, "continue_final_message": True}).json()
    assert text_of(r) == chat["choices"][0]["message"]["content"] and not text_of(r).startswith(prefill)
    tokenizer = load_tokenizer(embedded_model_path())
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert prompt.endswith(prefill)
    assert r.usage.input_tokens == chat["usage"]["prompt_tokens"] == \
        len(tokenizer.encode(prompt, add_special_tokens=False))
    # Block content is continued the same way; a new turn after the prefill's text would be a longer prompt.
    blocks = client.messages.create(model="smol", max_tokens=8, extra_body=GREEDY, messages=[
        messages[0], {"role": "assistant", "content": [{"type": "text", "text": prefill}]}])
    assert text_of(blocks) == text_of(r) and blocks.usage.input_tokens == r.usage.input_tokens
    fresh = client.messages.create(model="smol", max_tokens=1, extra_body=GREEDY, messages=messages[:1])
    assert fresh.usage.input_tokens < r.usage.input_tokens
    both = requests.post(smol_server.base_url + "/v1/chat/completions", headers={"x-api-key": API_KEY}, timeout=60,
                         json={"messages": messages, "max_tokens": 2, "continue_final_message": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"
    not_assistant = requests.post(smol_server.base_url + "/v1/chat/completions", headers={"x-api-key": API_KEY},
                                  timeout=60, json={"messages": messages[:1], "max_tokens": 2,
                                                    "add_generation_prompt": False, "continue_final_message": True})
    assert not_assistant.status_code == 400 and not_assistant.json()["error"]["param"] == "messages"


# ------------------------------------------------------------------------------------------ stream


def test_stream_text_equals_plain(client):
    kwargs = dict(model="smol", max_tokens=20, extra_body=GREEDY, system="Answer briefly.",
                  messages=[{"role": "user", "content": "What is the capital of France?"}])
    plain = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == text_of(plain)
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in plain.content]
    assert (final.stop_reason, final.stop_sequence) == (plain.stop_reason, plain.stop_sequence)
    assert (final.usage.input_tokens, final.usage.output_tokens) == \
        (plain.usage.input_tokens, plain.usage.output_tokens)
    # the raw events: message_start, ping, then the blocks, message_delta, message_stop
    with client.messages.create(stream=True, **kwargs) as raw:
        events = [e.type for e in raw]
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    assert events[1:3] == ["content_block_start", "content_block_delta"] and "content_block_stop" in events


def test_raw_sse_has_event_lines_and_ping(smol_server):
    body = {"model": "smol", "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    r = requests.post(smol_server.base_url + "/v1/messages", json=body, headers={"x-api-key": API_KEY}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    names = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"] and names[-1] == "message_stop"
    datas = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [d["type"] for d in datas] == names
    assert datas[0]["message"]["usage"]["output_tokens"] == 0 and datas[0]["message"]["content"] == []
    assert datas[-2]["delta"]["stop_reason"] == "max_tokens" and datas[-2]["usage"]["output_tokens"] == 3


# ------------------------------------------------------------------------------------------ tools


def tool_uses(message):
    return [b for b in message.content if b.type == "tool_use"]


@pytest.mark.parametrize("choice", [{"type": "any", "disable_parallel_tool_use": True},
                                    {"type": "tool", "name": "get_current_weather"}])
def test_forced_tool_call_plain_and_streamed(client, choice):
    # one tool for `any` keeps the call short (greedy, the small model picks `calculate` with a long expression)
    tools = [WEATHER] if choice["type"] == "any" else TOOLS
    kwargs = dict(model="smol", max_tokens=80, extra_body=GREEDY, messages=QUESTION, tools=tools, tool_choice=choice)
    r = client.messages.create(**kwargs)
    assert r.stop_reason == "tool_use" and r.stop_sequence is None
    calls = tool_uses(r)
    assert len(calls) == 1 and calls[0].id
    if choice["type"] == "tool":
        assert calls[0].name == "get_current_weather"
    jsonschema.validate(calls[0].input, SCHEMAS[calls[0].name])
    partial, started = "", []
    with client.messages.stream(**kwargs) as stream:
        for event in stream:
            if event.type == "content_block_start":
                started.append(event.content_block.type)
            elif event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                partial += event.delta.partial_json
        final = stream.get_final_message()
    assert started == ["tool_use"] and json.loads(partial) == calls[0].input
    assert final.stop_reason == "tool_use" and [(b.name, b.input) for b in tool_uses(final)] == \
        [(calls[0].name, calls[0].input)]


def test_multi_turn_with_tool_use_and_tool_result(client):
    history = QUESTION + [
        {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                                          {"type": "tool_use", "id": "toolu_01abc", "name": "get_current_weather",
                                           "input": {"city": "Paris", "unit": "celsius"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01abc",
                                      "content": [{"type": "text", "text": '{"temperature": 21}'}]},
                                     {"type": "text", "text": "So, is it warm?"}]}]
    r = client.messages.create(model="smol", max_tokens=16, extra_body=GREEDY, messages=history, tools=TOOLS)
    assert r.stop_reason in ("end_turn", "max_tokens", "tool_use")
    failed = client.messages.create(model="smol", max_tokens=8, extra_body=GREEDY, tools=TOOLS, messages=history[:2] + [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01abc", "content": "timeout",
                                      "is_error": True}]}])
    assert failed.usage.output_tokens > 0
    none = client.messages.create(model="smol", max_tokens=8, extra_body=GREEDY, messages=QUESTION, tools=TOOLS,
                                  tool_choice={"type": "none"})
    assert not tool_uses(none) and none.stop_reason in ("end_turn", "max_tokens")


# ------------------------------------------------------------------------------------------ count_tokens


def test_count_tokens(client):
    short = client.messages.count_tokens(model="smol", messages=[{"role": "user", "content": "Hi"}])
    longer = client.messages.count_tokens(model="smol", messages=[
        {"role": "user", "content": "Hi, please tell me a long story about the sea."}])
    with_tools = client.messages.count_tokens(model="smol", messages=[{"role": "user", "content": "Hi"}], tools=TOOLS)
    assert 0 < short.input_tokens < longer.input_tokens and short.input_tokens < with_tools.input_tokens
    r = client.messages.create(model="smol", max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    assert r.usage.input_tokens == short.input_tokens


# ------------------------------------------------------------------------------------------ errors and auth


def assert_anthropic_error(r, status: int, err_type: str):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == err_type and body["error"]["message"]
    assert set(body) == {"type", "error"} and set(body["error"]) == {"type", "message"}


def test_errors_and_auth(smol_server, client):
    url = smol_server.base_url + "/v1/messages"
    good = {"model": "smol", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    key = {"x-api-key": API_KEY}
    assert requests.post(url, json=good, headers=key, timeout=60).status_code == 200
    assert requests.post(url, json=good, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60).status_code == 200
    assert requests.post(url + "/count_tokens", json=good, headers=key, timeout=60).json()["input_tokens"] > 0
    missing = dict(good)
    del missing["max_tokens"]
    r = requests.post(url, json=missing, headers=key, timeout=60)
    assert_anthropic_error(r, 400, "invalid_request_error")
    assert "max_tokens" in r.json()["error"]["message"]
    for bad in ({**good, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}},
                {**good, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
                {**good, "temperature": 1.5}, {**good, "messages": []}):
        assert_anthropic_error(requests.post(url, json=bad, headers=key, timeout=60), 400, "invalid_request_error")
    assert_anthropic_error(requests.post(url, json=good, headers={"x-api-key": "wrong"}, timeout=60), 401,
                           "authentication_error")
    assert_anthropic_error(requests.post(url + "/count_tokens", json=good, timeout=60), 401, "authentication_error")
    assert_anthropic_error(requests.post(url + "/nope", json=good, headers=key, timeout=60), 404, "not_found_error")
    huge = requests.post(url, data=b"x" * ((16 << 20) + 1), headers={**key, "content-type": "application/json"},
                         timeout=60)
    assert_anthropic_error(huge, 413, "request_too_large")
    with pytest.raises(anthropic.AuthenticationError) as info:
        anthropic.Anthropic(base_url=smol_server.base_url, api_key="wrong", max_retries=0).messages.create(
            model="smol", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert info.value.status_code == 401 and info.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="smol", max_tokens=2, messages=[{"role": "user", "content": "Hi"}],
                               tool_choice={"type": "any"})
    # the OpenAI routes keep their own error shape (and take x-api-key too)
    r = requests.get(smol_server.base_url + "/v1/models", headers={"x-api-key": "wrong"}, timeout=10)
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert requests.get(smol_server.base_url + "/v1/models", headers=key, timeout=10).status_code == 200


# ------------------------------------------------------------------------------------------ event mapping


class _Recorded:
    """A generation stream replaying fixed text pieces, optionally failing after them."""

    def __init__(self, pieces: list[str], fail: bool = False):
        self.pieces, self.fail, self.closed = pieces, fail, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for i, piece in enumerate(self.pieces):
            last = i == len(self.pieces) - 1 and not self.fail
            yield GenerationChunk(piece, finished=last, finish_reason="stop" if last else None, completion_tokens=i + 1)
        if self.fail:
            raise RuntimeError("engine exploded")

    async def aclose(self):
        self.closed = True


def run_events(output: ChatOutputParser, stream: _Recorded) -> list[tuple[str, dict]]:
    async def go():
        return [e async for e in message_events("msg_1", "m", 7, stream, output.stream())]

    events = []
    for raw in asyncio.run(go()):
        name, data = raw.strip("\n").split("\n")
        events.append((name[len("event: "):], json.loads(data[len("data: "):])))
    return events


def reassemble(events: list[tuple[str, dict]]) -> list[dict]:
    blocks: list[dict] = []
    partial: dict[int, str] = {}
    for name, data in events:
        if name == "content_block_start":
            assert data["index"] == len(blocks)
            blocks.append(dict(data["content_block"]))
        elif name == "content_block_delta":
            block, delta = blocks[data["index"]], data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            else:
                partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
    for index, text in partial.items():
        blocks[index]["input"] = json.loads(text)
    return blocks


def test_thinking_text_and_tool_use_blocks_from_deltas():
    schemas = {"get_current_weather": WEATHER["input_schema"]}
    tools = ToolContext(mode="auto", tools=[], fmt="qwen25", template_has_tools=True,
                        detector=detector_class("qwen25")(set(schemas), schemas))
    output = ChatOutputParser(reasoning_detector("qwen3"), tools)
    text = ('<think>The user wants weather.</think>\n\nChecking. <tool_call>\n{"name": "get_current_weather", '
            '"arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>')
    for size in (1, 3, 7, len(text)):
        stream = _Recorded([text[i:i + size] for i in range(0, len(text), size)])
        events = run_events(output, stream)
        names = [n for n, _ in events]
        assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
        assert names.count("content_block_start") == names.count("content_block_stop") == 3
        blocks = reassemble(events)
        expected = content_blocks(output.parse(text), with_thinking=True)
        for block in blocks + expected:
            block.pop("id", None)  # each parse names its calls
        assert blocks == expected and [b["type"] for b in blocks] == ["thinking", "text", "tool_use"]
        assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
        assert events[-2][1]["usage"] == {"output_tokens": len(stream.pieces)} and stream.closed


def test_error_after_start_is_one_error_event():
    stream = _Recorded(["Hello", " there"], fail=True)
    events = run_events(ChatOutputParser(None, None), stream)
    assert [n for n, _ in events][:4] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    name, data = events[-1]
    assert name == "error" and data["type"] == "error" and data["error"]["type"] == "api_error"
    assert "RuntimeError" in data["error"]["message"] and stream.closed


def test_stop_string_matcher_reports_the_matched_string():
    matcher = StopStringMatcher(["END", "xyz", "ab"])
    assert matcher.feed("hello a") == ("hello ", False) and matcher.matched is None
    assert matcher.feed("bc END") == ("", True) and matcher.matched == "ab"
    matcher = StopStringMatcher(["stop here", "stop"])
    assert matcher.feed("please stop here") == ("please ", True) and matcher.matched == "stop"


def test_error_shape_follows_the_route_prefix():
    """On a bare app: /v1/messages* answer Anthropic's shape, every other route keeps OpenAI's."""
    app = FastAPI()
    install_error_handlers(app)
    for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions", "/v1/messagesx"):
        @app.post(path)
        async def fail(kind: str):
            if kind == "busy":
                raise APIError(503, "overloaded", headers={"Retry-After": "1"})
            raise RuntimeError("bug")

    client = TestClient(app, raise_server_exceptions=False)
    for path, anthropic_shape in (("/v1/messages", True), ("/v1/messages/count_tokens", True),
                                  ("/v1/chat/completions", False), ("/v1/messagesx", False)):
        for kind, status, err_type in (("busy", 503, "overloaded_error"), ("bug", 500, "api_error")):
            r = client.post(f"{path}?kind={kind}")
            assert r.status_code == status and r.headers.get("retry-after") == ("1" if kind == "busy" else None)
            if anthropic_shape:
                assert_anthropic_error(r, status, err_type)
            else:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = client.post(path)  # missing query parameter: a validation error
        assert r.status_code == 400 and ("type" in r.json()) == anthropic_shape
        r = client.get(path)  # wrong method: 405 with its Allow header
        assert r.status_code == 405 and r.headers["allow"] == "POST" and ("type" in r.json()) == anthropic_shape
