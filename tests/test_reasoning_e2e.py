"""Reasoning end to end: a tiny random Qwen3 model served with Qwen3's own chat template (its thinking
variant, which opens `<think>` in the generation prompt unless `enable_thinking` is false), driven
through HTTP with the OpenAI SDK and plain requests. The random model never closes the block, so its
whole greedy output is reasoning: the checks compare that split with the raw text of the same greedy
generation (`separate_reasoning: false`), plain and streamed."""

from __future__ import annotations

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
    # a forced call through the same template: the grammar makes the tiny model produce it
    body = {"tools": [WEATHER_TOOL], "tool_choice": "required", "max_tokens": 60}
    message = chat(thinking_server, **body)["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
