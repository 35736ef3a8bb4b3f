"""The OpenAPI document describes every route's body and statuses, and the server honours it: requests
the document calls valid are accepted and those it calls invalid are refused (checked here case by case
with jsonschema), and schemathesis' coverage phase (its default checks, plus the hook check in
tests/schemathesis_hooks.py that judges each 400 given to a schema-valid request) and a bounded fuzzing run
find no server error and no conformance failure. The server runs a tiny random model with a short
context, so every generated request is cheap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import requests

from tests.conftest import API_KEY, REPO, ServerProcess, build_tiny_model, embedded_model_path

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# The built-in positive_data_acceptance check with its default statuses and 400: a 400 to a schema-valid
# request is judged by tests/schemathesis_hooks.py instead, which accepts only the refusals the document
# cannot state (context length, vocabulary, tool names, server state, constraint contents).
SCHEMATHESIS_CONFIG = ('[checks.positive_data_acceptance]\n'
                       'expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]\n')


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    from lightllm.tokenizer import load_tokenizer

    tmp = tmp_path_factory.mktemp("contract")
    tokenizer = load_tokenizer(embedded_model_path())
    model_dir = build_tiny_model(tmp / "model", "llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(model_dir)
    server = ServerProcess(["--model_dir", str(model_dir), "--max_total_token_num", "6000", "--max_req_total_len", "160",
                            "--api_key", API_KEY], tmp / "server.log")
    yield server
    server.stop()


def test_document_covers_every_route(tiny_server):
    doc = requests.get(tiny_server.base_url + "/openapi.json", timeout=10).json()
    paths = doc["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model_id}", "/generate",
                 "/generate_stream", "/tokenize", "/detokenize", "/health", "/get_server_info"):
        assert path in paths, path
    for path in ("/generate", "/generate_stream", "/v1/chat/completions"):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].split("/")[-1] in doc["components"]["schemas"]
    for path, item in paths.items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            assert {"200", "400", "401", "404", "413", "500", "503"} <= statuses, (path, method, statuses)
            assert "422" not in statuses


def run_schemathesis(server: ServerProcess, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    (cwd / "schemathesis.toml").write_text(SCHEMATHESIS_CONFIG)
    env = dict(os.environ, SCHEMATHESIS_HOOKS="tests.schemathesis_hooks",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    schemathesis = Path(sys.executable).with_name("schemathesis")
    return subprocess.run([str(schemathesis), "run", server.base_url + "/openapi.json", "-H",
                           f"Authorization: Bearer {API_KEY}", "--seed", "1", "--no-color", "--request-timeout", "60",
                           "--workers", "1", *args], capture_output=True, text=True, timeout=900, cwd=cwd, env=env)


def failures(out: subprocess.CompletedProcess) -> str:
    """Schemathesis' failures section (the end of its output is warnings and the summary)."""
    start = out.stdout.find("FAILURES")
    return (out.stdout[start:start + 12000] if start >= 0 else out.stdout[-8000:]) + out.stderr[-2000:]


def body_schema_valid(doc: dict, path: str, body: dict) -> bool:
    schema = dict(doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"],
                  components=doc["components"])
    return jsonschema.Draft202012Validator(schema).is_valid(body)


USER = [{"role": "user", "content": "hi"}]
# (route, body, whether the document calls it valid): each of the refusals schemathesis' coverage phase
# once found, and its neighbours. The server must accept exactly the bodies the document calls valid.
CASES = [
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "stream_options": {"include_usage": True}}, False),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "stream": True,
                              "stream_options": {"include_usage": True}}, True),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "stream_options": None}, True),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": False, "stream_options": {}}, False),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True, "stream_options": {}}, True),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "n": 1.0}, True),  # a JSON-Schema integer
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2.0, "stop_token_ids": [1.0]}, True),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "n": 1.5}, False),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "seed": 2 ** 63 + 191}, True),  # any integer seeds
    ("/v1/responses", {"input": [{"type": {}, "role": "user", "content": "hi"}], "max_output_tokens": 2}, False),
    ("/v1/responses", {"input": [{"role": "user", "content": "hi"}], "max_output_tokens": 2}, True),
    ("/v1/responses", {"input": [{"type": "reasoning"}], "max_output_tokens": 2}, False),
    ("/v1/responses", {"input": [{"type": "reasoning"}], "instructions": "Be brief.", "max_output_tokens": 2}, True),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2, "tool_choice": "required"}, False),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2, "tools": [{"type": "web_search"}]}, False),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "top_logprobs": 2}, False),
    ("/generate_stream", {"inputs": "hi", "parameters": {"max_new_tokens": 2, "n": 2}}, False),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "n": "1"}, False),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "tools": []}, False),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "n": 1.0, "min_tokens": 0.0}, True),
    ("/v1/completions", {"prompt": [1.0, 2.0], "max_tokens": 2}, True),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "suffix": "!"}, False),  # found by fuzzing
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "suffix": ""}, True),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2, "min_new_tokens": 1.0, "n": 1.0}}, True),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2, "min_new_tokens": 0.5}}, False),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "tool_choice": "auto"}, False),  # found by fuzzing
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "tool_choice": "none"}, True),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "logit_bias": {"x": 1}}, False),  # found by fuzzing
    ("/tokenize", {"prompt": "hi", "tools": []}, False),
    ("/tokenize", {"prompt": "hi"}, True),
    ("/tokenize", {"messages": USER, "prompt": None}, True),
    ("/tokenize", {"prompt": None, "messages": None}, False),
    ("/tokenize", {"prompt": "hi", "messages": USER}, False),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2, "background": True}, False),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2, "background": False, "tools": []}, True),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2, "reasoning": {"effort": "extreme"}}, False),
    ("/v1/messages", {"messages": USER, "max_tokens": 2, "tools": [], "tool_choice": {"type": "tool", "name": "f"}},
     False),
    ("/v1/messages", {"messages": USER, "max_tokens": 2, "tool_choice": {"type": "any"}}, False),
    ("/v1/messages", {"messages": USER, "max_tokens": 2, "tool_choice": {"type": "auto"}}, True),
    ("/v1/messages", {"messages": USER, "max_tokens": 2.0, "top_k": 1.0}, True),
    ("/v1/messages/count_tokens", {"messages": USER, "tools": [], "tool_choice": {"type": "none"}}, True),
    ("/v1/messages/count_tokens", {"messages": USER, "tool_choice": {"type": "tool", "name": "f"}}, False),
    # continue_final_message needs add_generation_prompt false, which defaults to true (found by reading the routes'
    # refusals after a fuzzing run)
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}], "max_tokens": 2,
                              "continue_final_message": True}, False),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}], "max_tokens": 2,
                              "continue_final_message": True, "add_generation_prompt": False}, True),
    ("/tokenize", {"messages": [{"role": "assistant", "content": "x"}], "continue_final_message": True}, False),
    # the chat fields apply to messages only (found by fuzzing: a prompt with tools and continue_final_message)
    ("/tokenize", {"prompt": "hi", "continue_final_message": True, "add_generation_prompt": False}, False),
    ("/tokenize", {"prompt": "hi", "add_generation_prompt": False}, False),
    ("/tokenize", {"prompt": "hi", "add_generation_prompt": True, "continue_final_message": False}, True),
    ("/tokenize", {"prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, False),
    ("/tokenize", {"prompt": "hi", "chat_template_kwargs": {}}, False),
    ("/tokenize", {"prompt": "hi", "tools": None, "chat_template_kwargs": None}, True),
    ("/tokenize", {"messages": [{"role": "assistant", "content": "x"}], "continue_final_message": True,
                   "add_generation_prompt": False}, True),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "echo": True, "stream": True}, False),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "echo": True, "stream": False}, True),
    # at most 16 stop sequences (server/limits.py), in the document too
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop": [f"@{i}@" for i in range(16)]}, True),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "stop": [f"@{i}@" for i in range(17)]}, False),
    ("/generate", {"inputs": "hi",
                   "parameters": {"max_new_tokens": 2, "stop_sequences": [f"@{i}@" for i in range(17)]}},
     False),
    ("/generate", {"inputs": "hi",
                   "parameters": {"max_new_tokens": 2, "stop_sequences": [f"@{i}@" for i in range(16)]}},
     True),
    # images go with text inputs, which hold the image token
    ("/generate", {"inputs": [1, 2], "parameters": {"max_new_tokens": 2},
                   "multimodal_params": {"images": [{"type": "base64", "data": "AA=="}]}}, False),
    ("/generate", {"inputs": [1, 2], "parameters": {"max_new_tokens": 2}, "multimodal_params": {"images": []}}, True),
    # a JSON text format or a forced tool call, not both
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2, "tools": [{"type": "function", "name": "f"}],
                       "tool_choice": "required", "text": {"format": {"type": "json_object"}}}, False),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2, "tools": [{"type": "function", "name": "f"}],
                       "tool_choice": {"type": "function", "name": "f"},
                       "text": {"format": {"type": "json_schema", "schema": {}}}}, False),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2, "tools": [{"type": "function", "name": "f"}],
                       "tool_choice": "auto", "text": {"format": {"type": "json_object"}}}, True),
]


@pytest.mark.parametrize("path,body,valid", CASES)
def test_the_server_accepts_exactly_what_the_document_calls_valid(tiny_server, path, body, valid):
    doc = requests.get(tiny_server.base_url + "/openapi.json", timeout=10).json()
    assert body_schema_valid(doc, path, body) == valid
    r = requests.post(tiny_server.base_url + path, json=body, headers=AUTH, timeout=120)
    assert (r.status_code == 200) == valid, r.text
    if not valid:
        assert r.status_code == 400 and r.json()["error"]["message"], r.text


def test_schemathesis_coverage_phase_finds_no_failure(tiny_server, tmp_path):
    """The coverage phase: boundary values and every enum and type of every field, default checks."""
    out = run_schemathesis(tiny_server, tmp_path, "--phases", "coverage")
    assert out.returncode == 0, failures(out)


def test_schemathesis_fuzzing_finds_no_server_error_or_conformance_failure(tiny_server, tmp_path):
    out = run_schemathesis(tiny_server, tmp_path, "--phases", "examples,fuzzing,stateful", "--max-examples", "6",
                           "--max-time", "150")
    assert out.returncode == 0, failures(out)
