"""The error contract, on a real server: a fault inside the engine after a stream began ends that stream
with one error event in its API's own shape (then `[DONE]` where the API has it) — on every streaming
route; the same fault in a plain request is a 500 with the API's error object; a bug outside the engine
(a chat template that raises) is a 500 error object, never a bare text page; the server serves on.

The server runs a tiny random model (cheap steps) whose engine raises on every 4th model step
(LIGHTLLM_FAULT_STEPS): each request here runs until a fault, so each one starts right after a faulty
step and is hit at its 4th step, after 3 tokens. Greedy, drafting off: one token per step."""

from __future__ import annotations

import json

import pytest
import requests

from lightllm.engine.protocol import EngineError
from tests.conftest import API_KEY, ServerProcess, build_tiny_model, embedded_model_path

FAULT_EVERY = 4
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = [{"role": "user", "content": "Count to ten."}]
LONG = 100  # max tokens: more than any request gets before its fault
# A ChatML template that divides by zero for one message: a template bug, not a refusal of the messages.
TEMPLATE = ("{% for m in messages %}{% if m['content'] == 'divide by zero' %}{{ (m['content'] | length) // 0 }}"
            "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory):
    from lightllm.tokenizer import load_tokenizer

    tmp = tmp_path_factory.mktemp("error_contract")
    tokenizer = load_tokenizer(embedded_model_path())
    model_dir = build_tiny_model(tmp / "model", "llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model_dir)
    faults = ",".join(str(step) for step in range(FAULT_EVERY, 2000, FAULT_EVERY))
    server = ServerProcess(["--model_dir", str(model_dir), "--max_total_token_num", "4000",
                            "--max_req_total_len", "512", "--api_key", API_KEY, "--spec_ngram_tokens", "0"],
                           tmp / "server.log", env={"LIGHTLLM_FAULT_STEPS": faults})
    yield server
    server.stop()


def post(server: ServerProcess, path: str, body: dict, stream: bool = False) -> requests.Response:
    return requests.post(server.base_url + path, json=body, headers=AUTH, stream=stream, timeout=120)


def sse(response: requests.Response) -> list[tuple[str | None, str]]:
    """(event name or None, data) for each SSE event, in order."""
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events, name = [], None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            name = line[len("event:"):].strip()
        elif line.startswith("data:"):
            events.append((name, line[len("data:"):].strip()))
            name = None
    return events


def assert_injected(error: dict) -> None:
    assert "injected fault" in error["message"], error


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": LONG, "temperature": 0, "ignore_eos": True}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0, "ignore_eos": True}),
])
def test_openai_stream_ends_with_one_error_event_then_done(faulty_server, path, body):
    events = sse(post(faulty_server, path, dict(body, stream=True), stream=True))
    data = [payload for _, payload in events]
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    chunks = [json.loads(payload) for payload in data[:-1]]
    errors = [chunk for chunk in chunks if "error" in chunk]
    assert len(errors) == 1 and chunks[-1] is errors[0]  # the error is the last event before [DONE]
    error = errors[0]["error"]
    assert error["status"] == 500 and error["type"] == "server_error"
    assert_injected(error)
    began = chunks[:-1]
    assert began and all(chunk["choices"][0]["finish_reason"] is None for chunk in began if chunk["choices"])


def test_anthropic_stream_ends_with_one_error_event(faulty_server):
    body = {"messages": CHAT, "max_tokens": LONG, "temperature": 0, "stream": True}
    events = sse(post(faulty_server, "/v1/messages", body, stream=True))
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "error" and names.count("error") == 1
    assert "message_stop" not in names and "message_delta" not in names  # the message never finished
    payload = json.loads(events[-1][1])
    assert payload["type"] == "error" and payload["error"]["type"] == "api_error"
    assert_injected(payload["error"])


def test_responses_stream_ends_with_one_error_event(faulty_server):
    body = {"input": "Count to ten.", "max_output_tokens": LONG, "temperature": 0, "stream": True}
    events = sse(post(faulty_server, "/v1/responses", body, stream=True))
    kinds = [json.loads(payload)["type"] for _, payload in events]
    assert kinds[0] == "response.created" and kinds[-1] == "error" and kinds.count("error") == 1
    assert "response.completed" not in kinds and "response.incomplete" not in kinds
    error = json.loads(events[-1][1])
    assert error["code"] in ("engine_error", "server_error")
    assert_injected(error)


def test_native_stream_ends_with_one_error_event(faulty_server):
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": LONG, "ignore_eos": True}}
    events = [json.loads(payload) for _, payload in sse(post(faulty_server, "/generate_stream", body, stream=True))]
    assert len(events) == FAULT_EVERY  # three tokens, then the error
    assert all("token" in e and not e["finished"] for e in events[:-1])
    assert events[-1]["error"]["status"] == 500
    assert_injected(events[-1]["error"])


@pytest.mark.parametrize("path,body,shape", [
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": LONG, "temperature": 0, "ignore_eos": True}, "openai"),
    ("/v1/messages", {"messages": CHAT, "max_tokens": LONG, "temperature": 0}, "anthropic"),
    ("/generate", {"inputs": "Once upon a time", "parameters": {"max_new_tokens": LONG, "ignore_eos": True}}, "openai"),
])
def test_engine_fault_in_a_plain_request_is_a_500_error_object(faulty_server, path, body, shape):
    r = post(faulty_server, path, body)
    assert r.status_code == 500, r.text
    if shape == "anthropic":
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"
    else:
        assert r.json()["error"]["type"] == "server_error"
    assert_injected(r.json()["error"])


@pytest.mark.parametrize("stream", [False, True])
def test_a_template_that_raises_is_a_500_error_object(faulty_server, stream):
    messages = [{"role": "user", "content": "divide by zero"}]
    r = post(faulty_server, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "stream": stream})
    assert r.status_code == 500 and r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "ZeroDivisionError" in error["message"]
    r = post(faulty_server, "/v1/messages", {"messages": messages, "max_tokens": 4, "stream": stream})
    assert r.status_code == 500 and r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"


def test_the_server_serves_on_and_holds_no_kv(faulty_server):
    # 3 tokens fit between two faults (every request before this one ended at a faulty step)
    body = {"messages": CHAT, "max_tokens": FAULT_EVERY - 1, "temperature": 0, "ignore_eos": True}
    r = post(faulty_server, "/v1/chat/completions", body)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == FAULT_EVERY - 1
    load = requests.get(faulty_server.base_url + "/token_load", headers=AUTH, timeout=10).json()
    assert load["running"] == 0 and load["kv_used_by_requests"] == 0


def test_engine_error_kind_decides_the_status():
    """Whose fault it was decides the status (GenerationError's table, used by every route)."""
    from lightllm.server.errors import error_response
    from lightllm.server.generation import GenerationError

    expected = {"client": (400, "invalid_request_error"), "server": (500, "server_error"),
                "unavailable": (503, "service_unavailable_error")}
    for kind, (status, err_type) in expected.items():
        exc = GenerationError(EngineError(kind, f"{kind} problem"))
        response = error_response(exc.status, exc.message, exc.param, exc.code, exc.err_type, exc.headers)
        assert response.status_code == status and json.loads(response.body)["error"]["type"] == err_type, kind
        assert ("Retry-After" in response.headers) == (kind == "unavailable")
