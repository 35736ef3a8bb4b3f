"""POST /v1/responses (OpenAI's Responses API) end to end with the official SDK on the embedded model
(strict response validation: every object and event must match the SDK's models), plus the stream
translation (reasoning, text, calls, errors) checked through the SDK's own stream accumulator."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import jsonschema
import openai
import pytest
import requests
from openai._models import validate_type
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent

from tests.conftest import API_KEY

WEATHER = {"type": "function", "name": "get_current_weather", "description": "Get the current weather in a given city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "description": "The city name", "maxLength": 40},
               "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"], "additionalProperties": False}, "strict": True}
CALCULATE = {"type": "function", "name": "calculate", "description": "Evaluate a math expression",
             "parameters": {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 60}},
                            "required": ["expression"], "additionalProperties": False}, "strict": True}
TOOLS = [WEATHER, CALCULATE]
SCHEMAS = {t["name"]: t["parameters"] for t in TOOLS}
SHORT = "What is the capital of France?"  # SmolLM2 answers this in 8 tokens at temperature 0


@pytest.fixture(scope="module")
def client(smol_server):
    return openai.OpenAI(base_url=smol_server.base_url + "/v1", api_key=API_KEY, _strict_response_validation=True)


def post(server, body: dict) -> requests.Response:
    return requests.post(server.base_url + "/v1/responses", json={"model": "m", **body}, timeout=60,
                         headers={"Authorization": f"Bearer {API_KEY}"})


def calls_of(response) -> list:
    return [item for item in response.output if item.type == "function_call"]


def test_string_input(client):
    r = client.responses.create(model="m", input=SHORT, max_output_tokens=40, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed"
    assert r.incomplete_details is None and r.error is None
    assert r.output_text.strip()
    message = r.output[0]
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.id.startswith("msg_") and message.content[0].type == "output_text"
    usage = r.usage
    assert usage.input_tokens > 0 and 0 < usage.output_tokens < 40
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert r.max_output_tokens == 40 and r.temperature == 0 and r.tools == [] and r.tool_choice == "auto"


def test_instructions_messages_and_max_output_tokens(client):
    items = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a long story."}]}]
    pirate = "You are a pirate. Speak like one."
    r = client.responses.create(model="m", input=items, instructions=pirate, max_output_tokens=5, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and r.output[0].status == "incomplete" and r.usage.output_tokens == 5
    assert r.instructions == pirate
    # The instructions are the first (system) message: the same prompt as that message in the input.
    system = client.responses.create(model="m", input=[{"role": "system", "content": pirate}, *items],
                                     max_output_tokens=5, temperature=0)
    assert system.usage.input_tokens == r.usage.input_tokens and system.output_text == r.output_text


def stream_events(client, **kwargs):
    with client.responses.stream(model="m", **kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response() if events[-1].type == "response.completed" else None
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    return events, final


def test_stream_reassembles_to_the_plain_response(client):
    kwargs = dict(input=SHORT, max_output_tokens=40, temperature=0)
    plain = client.responses.create(model="m", **kwargs)
    events, final = stream_events(client, **kwargs)
    types = [e.type for e in events]
    assert types[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final is not None and final.status == "completed"
    assert text == final.output_text == plain.output_text
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert final.output[0].id == events[2].item.id

    events, final = stream_events(client, input="Tell me a long story about the sea.", max_output_tokens=6,
                                  temperature=0)
    assert final is None and events[-1].type == "response.incomplete"
    done = events[-1].response
    assert done.status == "incomplete" and done.incomplete_details.reason == "max_output_tokens"
    assert done.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "calculate"}])
def test_forced_tool_calls_plain_and_streamed(client, choice):
    kwargs = dict(input="What's the weather in Paris? Also compute 17 * 23.", tools=TOOLS, tool_choice=choice,
                  parallel_tool_calls=False, max_output_tokens=100, temperature=0)
    r = client.responses.create(model="m", **kwargs)
    assert r.status == "completed"
    (call,) = calls_of(r)
    assert call.id.startswith("fc_") and call.call_id and call.status == "completed"
    assert call.name in SCHEMAS and (isinstance(choice, str) or call.name == "calculate")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert r.tool_choice == choice if isinstance(choice, str) else r.tool_choice.name == "calculate"
    assert [t.name for t in r.tools] == ["get_current_weather", "calculate"]

    events, final = stream_events(client, **kwargs)
    added = [e for e in events if e.type == "response.output_item.added"]
    assert len(added) == 1 and added[0].item.type == "function_call" and added[0].item.name == call.name
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    (streamed,) = calls_of(final)
    assert arguments == done.arguments == streamed.arguments == call.arguments
    assert streamed.name == call.name and streamed.status == "completed"


def test_function_call_round_trip(client):
    question = {"role": "user", "content": "What's the weather in Paris?"}
    call = {"type": "function_call", "call_id": "call_abc123456", "name": "get_current_weather",
            "arguments": '{"city": "Paris", "unit": "celsius"}'}
    result = {"type": "function_call_output", "call_id": "call_abc123456", "output": '{"temperature": 21}'}
    asked = client.responses.create(model="m", input=[question], tools=[WEATHER], max_output_tokens=8, temperature=0)
    r = client.responses.create(model="m", input=[question, call, result], tools=[WEATHER], max_output_tokens=8,
                                temperature=0)
    assert r.status in ("completed", "incomplete") and r.output
    assert r.usage.input_tokens > asked.usage.input_tokens + 10  # the call and its result are in the prompt

    # The same through the store: the forced call's item, then its output in the next request.
    first = client.responses.create(model="m", input=[question], tools=[WEATHER], tool_choice="required",
                                    parallel_tool_calls=False, max_output_tokens=60, temperature=0)
    (made,) = calls_of(first)
    second = client.responses.create(model="m", previous_response_id=first.id, tools=[WEATHER], max_output_tokens=8,
                                     temperature=0, input=[{"type": "function_call_output", "call_id": made.call_id,
                                                            "output": '{"temperature": 21}'}])
    assert second.previous_response_id == first.id and second.output
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_text_format_json_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer"}, "capital": {"type": "boolean"}},
              "required": ["city", "population", "capital"], "additionalProperties": False}
    r = client.responses.create(model="m", input="Describe Paris as JSON.", max_output_tokens=120, temperature=0,
                                text={"format": {"type": "json_schema", "name": "city", "schema": schema,
                                                 "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema" and r.text.format.name == "city"


def test_store_and_previous_response_id(client, smol_server):
    first = client.responses.create(model="m", input="My name is Ann and I live in Oslo.", max_output_tokens=8,
                                    temperature=0)
    alone = client.responses.create(model="m", input="What is my name?", max_output_tokens=8, temperature=0)
    second = client.responses.create(model="m", input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0)
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    assert client.responses.retrieve(first.id).output_text == first.output_text

    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="m", input="Hi", previous_response_id="resp_nope", max_output_tokens=4)
    assert err.value.body["param"] == "previous_response_id" and "resp_nope" in err.value.body["message"]
    unstored = client.responses.create(model="m", input="Hi", store=False, max_output_tokens=4, temperature=0)
    r = post(smol_server, {"input": "Hi", "previous_response_id": unstored.id, "max_output_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_unsupported_tool_type(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="m", input="Find news", tools=[{"type": "web_search"}], max_output_tokens=4)
    assert "web_search" in err.value.body["message"] and err.value.body["param"] == "tools[0].type"


@pytest.mark.parametrize("body, param", [
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input"),  # SmolLM2 takes no images
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "calculate", "arguments": "{nope"}],
      "tools": [CALCULATE]}, "input"),
    ({"input": "hi", "tools": TOOLS, "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"input": "hi", "tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "hi", "reasoning": {"effort": "low"}}, "reasoning.effort"),  # SmolLM2's template has no effort
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"input": "hi", "tools": TOOLS, "tool_choice": "required", "text": {"format": {"type": "json_object"}}},
     "text.format"),
    ({"input": [], "max_output_tokens": 4}, "input"),
    ({"input": "hi", "max_output_tokens": 10 ** 6}, "max_output_tokens"),
    ({"input": "hi", "background": True}, "background"),
])
def test_request_errors_name_the_field(smol_server, body, param):
    r = post(smol_server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_tools_empty_and_choice_auto_without_tools(client):
    r = client.responses.create(model="m", input=SHORT, tools=[], tool_choice="auto", max_output_tokens=8,
                                temperature=0)
    assert r.output_text and not calls_of(r)


# --- the stream translation, without a server: fake generations through the real parsers ----------------


def _prepared(pieces: list[str], finish_reason: str = "stop", error: Exception | None = None):
    from lightllm.server.function_call import prepare_tool_context
    from lightllm.server.generation import GenerationChunk
    from lightllm.server.openai.chat import PreparedChat
    from lightllm.server.openai.chat_output import ChatOutputParser
    from lightllm.server.openai.protocol import ChatCompletionRequest
    from lightllm.server.reasoning.registry import reasoning_detector

    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}])
    state = SimpleNamespace(tool_call_parser="qwen25", tokenizer=SimpleNamespace(chat_template="{{ tools }}"),
                            args=SimpleNamespace(output_constraint_mode="xgrammar"))
    tools = prepare_tool_context(req, state)

    async def stream():
        for i, piece in enumerate(pieces):
            if error is not None and i == len(pieces) - 1:
                raise error
            last = i == len(pieces) - 1
            yield GenerationChunk(piece, finished=last, finish_reason=finish_reason if last else None,
                                  completion_tokens=i + 1, cached_tokens=2)

    return PreparedChat([1, 2, 3, 4], [stream()], ChatOutputParser(reasoning_detector("qwen3"), tools), tools)


def _run(prepared, **request) -> tuple[list[dict], list[dict]]:
    """→ (the events' data, the stored bodies), each event checked against the SDK's models."""
    from lightllm.server.openai.responses.events import response_events
    from lightllm.server.openai.responses.objects import base_body
    from lightllm.server.openai.responses.protocol import ResponsesRequest

    base = base_body(ResponsesRequest(input="hi", tools=[WEATHER], **request),
                     SimpleNamespace(model_name="m", served_name=lambda model: "m"), "resp_1", 1)
    stored: list[dict] = []

    async def collect():
        return [e async for e in response_events(prepared, base, stored.append)]

    events = []
    for raw in asyncio.run(collect()):
        kind, data = raw.split("\n", 1)
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}" and raw.endswith("\n\n")
        validate_type(type_=ResponseStreamEvent, value=event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events, stored


OUTPUT = ('<think>Paris, so celsius.</think>Let me check.<tool_call>{"name": "get_current_weather", '
          '"arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>')


@pytest.mark.parametrize("size", [1, 4, 17, len(OUTPUT)])
def test_stream_translation_reasoning_text_and_call(size):
    prepared = _prepared([OUTPUT[i:i + size] for i in range(0, len(OUTPUT), size)])
    events, stored = _run(prepared)
    state = ResponseStreamState(input_tools=[WEATHER], text_format=openai.omit)
    for event in events:
        state.handle_event(validate_type(type_=ResponseStreamEvent, value=event))
    final = state._completed_response
    assert final is not None and [item.type for item in final.output] == ["reasoning", "message", "function_call"]
    reasoning, message, call = final.output
    assert reasoning.content[0].text == "Paris, so celsius." and message.content[0].text == "Let me check."
    assert call.name == "get_current_weather" and json.loads(call.arguments) == {"city": "Paris", "unit": "celsius"}
    assert call.parsed_arguments == {"city": "Paris", "unit": "celsius"}  # the SDK parses strict tools' arguments
    expected = prepared.output.parse(OUTPUT)
    assert (expected.reasoning, expected.content) == ("Paris, so celsius.", "Let me check.")
    assert call.call_id.startswith("call_") and call.arguments == expected.tool_calls[0]["function"]["arguments"]
    body = validate_type(type_=Response, value=stored[0])
    assert body.status == "completed" and body.usage.input_tokens == 4
    assert body.usage.output_tokens == len(range(0, len(OUTPUT), size)) and body.usage.input_tokens_details.cached_tokens == 2
    assert events[-1]["type"] == "response.completed" and events[-1]["response"] == stored[0]
    kinds = [e["type"] for e in events]
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 3
    assert "response.reasoning_text.delta" in kinds and "response.function_call_arguments.delta" in kinds


def test_stream_translation_incomplete_and_error():
    cut = OUTPUT[:OUTPUT.index("Paris\",")]
    events, stored = _run(_prepared([cut[i:i + 8] for i in range(0, len(cut), 8)], finish_reason="length"))
    assert events[-1]["type"] == "response.incomplete"
    body = events[-1]["response"]
    assert body["incomplete_details"] == {"reason": "max_output_tokens"} and stored == [body]
    # An unterminated call in auto mode is text, as in the plain response; the cut item is incomplete.
    assert [(i["type"], i.get("status")) for i in body["output"]] == [("reasoning", None), ("message", "incomplete")]
    prepared = _prepared([cut])
    assert body["output"][1]["content"][0]["text"] == prepared.output.parse(cut).content

    from lightllm.server.errors import APIError

    events, stored = _run(_prepared(["Hello", " there", "!"], error=APIError(503, "the engine died", code="engine_down")))
    assert events[-1]["type"] == "error" and stored == []
    assert (events[-1]["code"], events[-1]["message"]) == ("engine_down", "the engine died")
    assert any(e["type"] == "response.output_text.delta" for e in events)


def test_stream_translation_two_calls_and_max_tool_calls():
    second = OUTPUT[OUTPUT.index("<tool_call>"):].replace("Paris", "Rome")
    text = OUTPUT + second
    events, stored = _run(_prepared([text[i:i + 9] for i in range(0, len(text), 9)]))
    calls = [item for item in stored[0]["output"] if item["type"] == "function_call"]
    assert [json.loads(c["arguments"])["city"] for c in calls] == ["Paris", "Rome"]
    assert len({c["call_id"] for c in calls}) == len({c["id"] for c in calls}) == 2
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == stored[0]["output"]  # each item closes with its final form, in output order
    events, stored = _run(_prepared([text[i:i + 9] for i in range(0, len(text), 9)]), max_tool_calls=1)
    assert [item["type"] for item in stored[0]["output"]] == ["reasoning", "message", "function_call"]
    assert stored[0]["max_tool_calls"] == 1
