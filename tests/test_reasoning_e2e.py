"""Reasoning end to end: a tiny random Qwen3 model served with Qwen3's own chat template (its thinking
variant, which opens `<think>` in the generation prompt unless `enable_thinking` is false), driven
through HTTP with the OpenAI SDK and plain requests. The random model never closes the block, so its
whole greedy output is reasoning: the checks compare that split with the raw text of the same greedy
generation (`separate_reasoning: false`), plain and streamed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import requests

from tests.conftest import REPO, ServerProcess, build_tiny_model, embedded_model_path

QWEN3_TEMPLATE = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text()
_PLAIN_PROMPT = "{%- if enable_thinking is defined and enable_thinking is false %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}"
# Qwen3-Thinking-2507 / Qwen3.5 style: the block is opened by the prompt unless thinking is off.
THINKING_TEMPLATE = QWEN3_TEMPLATE.replace(_PLAIN_PROMPT, "{%- if enable_thinking is defined and enable_thinking is false %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- else %}\n        {{- '<think>\\n' }}\n    {%- endif %}")
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    from lightllm.tokenizer import load_tokenizer

    assert THINKING_TEMPLATE != QWEN3_TEMPLATE
    tmp = tmp_path_factory.mktemp("qwen3_thinking")
    tokenizer = load_tokenizer(embedded_model_path())
    # The tags as single tokens, as in Qwen3's vocabulary: a logit bias can then force the end of thinking.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    model_dir = build_tiny_model(tmp / "model", "qwen3", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    tokenizer.chat_template = THINKING_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    server = ServerProcess(["--model_dir", str(model_dir), "--max_total_token_num", "4000", "--max_req_total_len", "2048"],
                           tmp / "server.log")
    yield server
    server.stop()


def chat(server, **body) -> dict:
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "ignore_eos": True, **body}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_parsers_are_chosen_from_the_template(thinking_server):
    info = requests.get(thinking_server.base_url + "/get_server_info", timeout=10).json()
    assert info["reasoning_parser"] == "qwen3" and "<think>" in info["reasoning_parser_reason"]
    assert info["tool_call_parser"] == "qwen25" and "<tool_call>" in info["tool_call_parser_reason"]
    assert "api_key" not in info and info["max_total_token_num"] == 4000


def test_output_opened_by_the_prompt_is_reasoning(thinking_server):
    raw = chat(thinking_server, separate_reasoning=False)["choices"][0]
    assert raw["message"]["content"] and raw["message"].get("reasoning_content") is None
    split = chat(thinking_server)
    choice = split["choices"][0]
    assert choice["finish_reason"] == "length"  # unterminated block: max_tokens hit while thinking
    assert choice["message"]["content"] is None
    assert choice["message"]["reasoning_content"] == raw["message"]["content"].strip()


def test_enable_thinking_false_reaches_the_template(thinking_server):
    thinking = chat(thinking_server)
    plain = chat(thinking_server, chat_template_kwargs={"enable_thinking": False})
    assert plain["usage"]["prompt_tokens"] > thinking["usage"]["prompt_tokens"]  # the closed empty block
    message = plain["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["content"]


def test_streamed_reasoning_equals_the_non_streamed_split(thinking_server):
    client = openai.OpenAI(base_url=thinking_server.base_url + "/v1", api_key="unused")
    whole = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    reasoning, content, finish = "", "", []
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        finish += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert reasoning == whole.choices[0].message.reasoning_content
    assert content == "" and finish == ["length"]


def test_reasoning_effort_needs_a_template_that_uses_it(thinking_server):
    response = requests.post(thinking_server.base_url + "/v1/chat/completions",
                             json={"messages": MESSAGES, "max_tokens": 2, "reasoning_effort": "low"}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "reasoning_effort"


def test_unknown_parser_names_fail_at_start_with_the_valid_list():
    for flag, valid in (("--reasoning_parser", "qwen3-thinking"), ("--tool_call_parser", "qwen3_coder")):
        out = subprocess.run([sys.executable, "-m", "lightllm.server.api_server", flag, "nope"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and valid in out.stderr and "nope" in out.stderr


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_qwen3_template_renders_tools_and_thinking(thinking_server):
    """The checkpoint's own Qwen3 template, with tools and the thinking switch, renders through the server."""
    def rendered(**extra) -> str:
        body = {"messages": MESSAGES, "tools": [WEATHER_TOOL], **extra}
        response = requests.post(thinking_server.base_url + "/tokenize", json=body, timeout=30)
        assert response.status_code == 200, response.text
        tokens = response.json()["tokens"]
        detok = requests.post(thinking_server.base_url + "/detokenize", json={"tokens": tokens}, timeout=30)
        return detok.json()["prompt"]

    prompt = rendered()
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt and prompt.endswith("<think>\n")
    assert rendered(chat_template_kwargs={"enable_thinking": False}).endswith("<think>\n\n</think>\n\n")
    # a forced call through the same template, thinking off: the grammar makes the tiny model produce it
    body = {"tools": [WEATHER_TOOL], "tool_choice": "required", "max_tokens": 60,
            "chat_template_kwargs": {"enable_thinking": False}, "logit_bias": {tag_id("<think>"): -100}}
    message = chat(thinking_server, **body)["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "get_weather" and message["reasoning_content"] is None


# ------------------------------------------------------------------ constrained output after the thinking

UNIT_TOOL = {"type": "function", "function": {"name": "set_unit", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"],
    "additionalProperties": False}}}
HMM = 41827  # " Hmm" in the tokenizer


def tag_id(tag: str) -> str:
    """The id the fixture gave a tag (added after the tokenizer's own vocabulary), as logit_bias takes it."""
    from lightllm.tokenizer import load_tokenizer

    return str(len(load_tokenizer(embedded_model_path())) + ["<think>", "</think>"].index(tag))


def forced_thinking() -> dict:
    """Forced tokens: " Hmm" three times (its bias falls by the frequency penalty at each use), then the end
    tag. Neither can appear in the constrained answer (its values are enums), so the grammar's start shows:
    free tokens while thinking, only the grammar's after the end tag."""
    return {"logit_bias": {str(HMM): 40, tag_id("</think>"): 35}, "frequency_penalty": 2.0, "max_tokens": 40}


def stream_message(server, **body) -> tuple[dict, str | None]:
    body = {"messages": MESSAGES, "temperature": 0, "stream": True, **body}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120, stream=True)
    reasoning, content, calls, finish = "", "", {}, None
    for line in response.iter_lines():
        if not line.startswith(b"data: {"):
            continue
        choice = json.loads(line[6:])["choices"][0]
        delta = choice["delta"]
        reasoning += delta.get("reasoning_content") or ""
        content += delta.get("content") or ""
        for tc in delta.get("tool_calls") or []:
            call = calls.setdefault(tc["index"], {"name": tc["function"]["name"], "arguments": ""})
            call["arguments"] += tc["function"]["arguments"]
        finish = choice["finish_reason"] or finish
    return {"reasoning_content": reasoning or None, "content": content or None,
            "tool_calls": [calls[i] for i in sorted(calls)]}, finish


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_call_after_free_thinking(thinking_server, choice):
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "set_unit"}}
    body = {"tools": [UNIT_TOOL], "tool_choice": tool_choice, **forced_thinking()}
    out = chat(thinking_server, ignore_eos=False, **body)["choices"][0]
    message = out["message"]
    assert message["reasoning_content"] == "Hmm Hmm Hmm"  # thought freely: the grammar would not allow it
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "set_unit"
    assert json.loads(call["function"]["arguments"])["unit"] in ("celsius", "fahrenheit")
    assert out["finish_reason"] == ("tool_calls" if choice == "required" else "stop")
    streamed, finish = stream_message(thinking_server, **body)
    assert streamed["reasoning_content"] == message["reasoning_content"] and finish == out["finish_reason"]
    assert [(c["name"], c["arguments"]) for c in streamed["tool_calls"]] == \
           [(call["function"]["name"], call["function"]["arguments"])]
    # with the reasoning left in the content the grammar applies from the first token: no thinking
    plain = chat(thinking_server, ignore_eos=False, separate_reasoning=False, **body)["choices"][0]["message"]
    assert "Hmm" not in (plain["content"] or "") and plain["tool_calls"][0]["function"]["name"] == "set_unit"


def test_response_format_after_free_thinking(thinking_server):
    schema = UNIT_TOOL["function"]["parameters"]
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "unit", "schema": schema}},
            **forced_thinking()}
    message = chat(thinking_server, ignore_eos=False, **body)["choices"][0]["message"]
    assert message["reasoning_content"] == "Hmm Hmm Hmm"
    assert json.loads(message["content"])["unit"] in ("celsius", "fahrenheit")


def test_unterminated_thinking_is_length_with_no_call(thinking_server):
    # the same prompt, unconstrained (tool_choice none): greedy, the random model never ends the block
    free = chat(thinking_server, tools=[UNIT_TOOL], tool_choice="none")["choices"][0]
    assert free["finish_reason"] == "length" and free["message"]["reasoning_content"]
    for tool_choice in ("required", {"type": "function", "function": {"name": "set_unit"}}):
        out = chat(thinking_server, tools=[UNIT_TOOL], tool_choice=tool_choice)["choices"][0]
        assert out["finish_reason"] == "length" and "tool_calls" not in out["message"]
        assert out["message"]["content"] is None
        # the constraint did not touch the thinking: the same text as the unconstrained generation's
        assert out["message"]["reasoning_content"] == free["message"]["reasoning_content"]


def test_tool_choice_none_still_thinks(thinking_server):
    out = chat(thinking_server, tools=[UNIT_TOOL], tool_choice="none", **forced_thinking())["choices"][0]
    assert out["message"]["reasoning_content"] == "Hmm Hmm Hmm" and "tool_calls" not in out["message"]


def test_thinking_off_applies_the_grammar_from_the_first_token(thinking_server):
    body = {"tools": [UNIT_TOOL], "tool_choice": "required", "max_tokens": 40,
            "chat_template_kwargs": {"enable_thinking": False}, "logit_bias": {str(HMM): 40, tag_id("<think>"): -100}}
    message = chat(thinking_server, ignore_eos=False, **body)["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["tool_calls"][0]["function"]["name"] == "set_unit"
    assert "Hmm" not in (message["content"] or "")
    # the output may still open a block itself: then it thinks freely before the grammar
    body["logit_bias"] = {str(HMM): 40, tag_id("<think>"): 45, tag_id("</think>"): 35}
    body["frequency_penalty"] = 2.0
    message = chat(thinking_server, ignore_eos=False, **body)["choices"][0]["message"]
    assert message["reasoning_content"] and message["tool_calls"][0]["function"]["name"] == "set_unit"
