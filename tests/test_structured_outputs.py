"""Structured outputs end to end (issue 29): regex, choice, GBNF/Lark grammars, JSON schema, structural tags and
allowed_token_ids in vLLM's, SGLang's, LightLLM's and OpenAI's request shapes, through HTTP on the real servers.
Outputs are checked with independent tools: `re.fullmatch`, lark for grammars, jsonschema for JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import jsonschema
import lark
import openai
import pytest
import requests

from tests.conftest import API_KEY, REPO, ServerProcess

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
COLORS = ["red", "green", "blue"]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
# One language in both dialects: GBNF for the server (xgrammar), Lark for the independent check.
GBNF = 'root ::= item ("," item){0,3}\nitem ::= [a-z]{1,8} "=" [0-9]{1,3}'
LARK_CHECK = 'start: item ("," item)~0..3\nitem: /[a-z]{1,8}=[0-9]{1,3}/'
LARK = 'start: "SELECT " column " FROM " table\ncolumn: "id" | "name"\ntable: "users" | "orders"'


def _chat(server, extra: dict, stream: bool = False, **kw) -> list[str]:
    """Texts of a chat completion's choices (streamed: assembled from the deltas)."""
    finish = kw.pop("finish", "stop")
    body = {"messages": [{"role": "user", "content": kw.pop("prompt", "Give me an example.")}],
            "max_tokens": kw.pop("max_tokens", 60), "temperature": kw.pop("temperature", 0), **kw, **extra}
    return _post(server, "/v1/chat/completions", body, stream, lambda c: c.get("message", c.get("delta", {})).get(
        "content") or "", finish)


def _completion(server, extra: dict, stream: bool = False, **kw) -> list[str]:
    finish = kw.pop("finish", "stop")
    body = {"prompt": kw.pop("prompt", "Example:"), "max_tokens": kw.pop("max_tokens", 60),
            "temperature": kw.pop("temperature", 0), **kw, **extra}
    return _post(server, "/v1/completions", body, stream, lambda c: c.get("text") or "", finish)


def _post(server, path: str, body: dict, stream: bool, text_of, finish: str = "stop") -> list[str]:
    r = requests.post(server.base_url + path, json={**body, "stream": stream}, headers=HEADERS, timeout=300,
                      stream=stream)
    assert r.status_code == 200, r.text
    if not stream:
        choices = r.json()["choices"]
        assert all(c["finish_reason"] == finish for c in choices), choices
        return [text_of(c) for c in sorted(choices, key=lambda c: c["index"])]
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for line in r.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        assert "error" not in event, event
        for c in event["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + text_of(c)
            if c.get("finish_reason"):
                reasons[c["index"]] = c["finish_reason"]
    assert set(reasons.values()) == {finish}, reasons
    return [texts[i] for i in sorted(texts)]


def _generate(server, parameters: dict, inputs: str = "Example:") -> dict:
    r = requests.post(server.base_url + "/generate", json={"inputs": inputs, "parameters": parameters}, timeout=300,
                      headers=HEADERS)
    assert r.status_code == 200, r.text
    return r.json()


def _metric(server, name: str) -> float:
    text = requests.get(server.base_url + "/metrics", timeout=10, headers=HEADERS).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_regex_in_every_shape(smol_server):
    prompt = "Give me a US phone number."
    for extra in ({"structured_outputs": {"regex": PHONE}}, {"guided_regex": PHONE}, {"regex": PHONE}):
        for stream in (False, True):
            [text] = _chat(smol_server, extra, stream, prompt=prompt)
            assert re.fullmatch(PHONE, text), (extra, text)
    [text] = _completion(smol_server, {"guided_regex": PHONE}, stream=True, prompt="Phone: ")
    assert re.fullmatch(PHONE, text)
    for key in ("regular_constraint", "regex"):  # LightLLM's and SGLang's native names
        out = _generate(smol_server, {"max_new_tokens": 30, key: PHONE})
        assert re.fullmatch(PHONE, out["generated_text"][0]) and out["finish_reason"] == "stop", out


def test_choice_with_n2_through_the_openai_sdk(smol_server):
    client = openai.OpenAI(base_url=smol_server.base_url + "/v1", api_key=API_KEY)
    for extra in ({"guided_choice": COLORS}, {"structured_outputs": {"choice": COLORS}}):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Pick a color."}],
                                           max_tokens=10, n=2, temperature=1.0, seed=3, extra_body=extra)
        assert [c.message.content for c in r.choices if c.message.content in COLORS] == \
            [c.message.content for c in r.choices] and len(r.choices) == 2
        assert {c.finish_reason for c in r.choices} == {"stop"}
    texts = _completion(smol_server, {"structured_outputs": {"choice": COLORS}}, stream=True, n=2, temperature=1.0,
                        seed=5, prompt="Favourite color:")
    assert len(texts) == 2 and set(texts) <= set(COLORS), texts


def test_grammars_gbnf_and_lark(smol_server):
    checker = lark.Lark(LARK_CHECK)
    for extra in ({"ebnf": GBNF}, {"structured_outputs": {"grammar": GBNF}}):
        for stream in (False, True):
            [text] = _chat(smol_server, extra, stream, prompt="List some settings as key=value pairs.")
            checker.parse(text)  # raises on text outside the language
    [text] = _completion(smol_server, {"guided_grammar": LARK}, prompt="SQL query:")
    lark.Lark(LARK).parse(text)
    out = _generate(smol_server, {"max_new_tokens": 40, "guided_grammar": GBNF, "n": 2})  # (n=2 sampled: chat)
    assert len(out["generated_text"]) == 2
    for text in out["generated_text"]:
        checker.parse(text)
    # /generate_stream: the same grammar, token by token
    r = requests.post(smol_server.base_url + "/generate_stream", timeout=300, stream=True, headers=HEADERS,
                      json={"inputs": "Settings:", "parameters": {"max_new_tokens": 40, "ebnf": GBNF}})
    events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith(b"data:")]
    assert events[-1]["finished"] and events[-1]["finish_reason"] == "stop"
    checker.parse(events[-1]["generated_text"])


def test_json_schema_shapes(smol_server):
    prompt = "Describe a person as JSON with a name and an age."
    shapes = ({"structured_outputs": {"json": PERSON}}, {"guided_json": json.dumps(PERSON)},
              {"json_schema": json.dumps(PERSON)},
              {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON,
                                                                          "strict": True}}})
    for i, extra in enumerate(shapes):  # plain and streamed alternately (both paths, half the requests)
        [text] = _chat(smol_server, extra, stream=i % 2 == 1, prompt=prompt, max_tokens=80)
        jsonschema.validate(json.loads(text), PERSON)
    out = _generate(smol_server, {"max_new_tokens": 80, "guided_json": PERSON}, inputs="A person as JSON:")
    jsonschema.validate(json.loads(out["generated_text"][0]), PERSON)
    client = openai.OpenAI(base_url=smol_server.base_url + "/v1", api_key=API_KEY)
    r = client.responses.create(model="m", input=prompt, max_output_tokens=80, temperature=0,
                                text={"format": {"type": "json_schema", "name": "p", "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), PERSON)


def test_structural_tags(smol_server):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    # xgrammar's structural tag: the whole answer is one <n>...</n> region holding JSON of the schema
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<n>", "end": "</n>", "content": {
        "type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}}}
    for stream in (False, True):
        [text] = _chat(smol_server, {"response_format": tag}, stream, prompt="Pick a number.")
        match = re.fullmatch(r"<n>(.*)</n>", text, re.S)
        assert match, text
        jsonschema.validate(json.loads(match.group(1)), schema)
    # the legacy form (SGLang's / vLLM's response_format): free text, each triggered region holds valid JSON
    legacy = {"structures": [{"begin": "<n>", "schema": schema, "end": "</n>"}], "triggers": ["<n>"]}
    few_shot = '<n>{"n": 4}</n>\n<n>{"n": 17}</n>\n<n>{"n": 8}</n>\n'
    [text] = _completion(smol_server, {"structured_outputs": {"structural_tag": json.dumps(legacy)}},
                         prompt=few_shot, max_tokens=40, finish="length")  # free text: it goes on
    regions = re.findall(r"<n>(.*?)</n>", text, re.S)
    assert regions, text
    for region in regions:
        jsonschema.validate(json.loads(region), schema)


def test_allowed_token_ids(smol_server):
    ids = [33, 34, 35, 2]  # "1", "2", "3" and the end-of-text token
    out = _generate(smol_server, {"max_new_tokens": 12, "allowed_token_ids": ids, "return_details": True,
                                  "do_sample": True, "seed": 7})
    assert out["tokens"][0] and {t["id"] for t in out["tokens"][0]} <= set(ids), out
    r = requests.post(smol_server.base_url + "/v1/completions", headers=HEADERS, timeout=120,
                      json={"prompt": "Digits:", "max_tokens": 8, "allowed_token_ids": ids[:3]})
    choice = r.json()["choices"][0]
    assert re.fullmatch(r"[123]{8}", choice["text"]) and choice["finish_reason"] == "length", choice


BAD = [  # (route, body, field the 400 must name)
    ("/v1/chat/completions", {"guided_regex": "a(b"}, "guided_regex"),
    ("/v1/chat/completions", {"structured_outputs": {"regex": "(?=x)x"}}, "structured_outputs.regex"),
    ("/v1/chat/completions", {"ebnf": 'root ::= "a" |'}, "ebnf"),
    ("/v1/chat/completions", {"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ("/v1/chat/completions", {"guided_choice": []}, "guided_choice"),
    ("/v1/chat/completions", {"guided_json": {"$ref": "#/$defs/missing"}}, "guided_json"),  # jsonschema accepts it
    ("/v1/chat/completions", {"json_schema": "{not json"}, "json_schema"),
    ("/v1/chat/completions", {"response_format": {"type": "structural_tag", "format": {"type": "nope"}}},
     "response_format"),
    ("/v1/chat/completions", {"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs.regex"),
    ("/v1/chat/completions", {"structured_outputs": {"regex": "a", "whitespace_pattern": " "}},
     "structured_outputs.whitespace_pattern"),
    ("/v1/chat/completions", {"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ("/v1/chat/completions", {"structured_outputs": {"jsn": {}}}, "structured_outputs.jsn"),  # unknown key
    ("/v1/completions", {"allowed_token_ids": [10 ** 7]}, "allowed_token_ids"),
    ("/v1/completions", {"structured_outputs": {"grammar": "root ::= foo"}}, "structured_outputs.grammar"),
]


@pytest.mark.parametrize("stream", [False, True])
def test_bad_constraints_are_400_naming_the_field(smol_server, stream):
    for path, extra, field in BAD:
        body = {"max_tokens": 5, "stream": stream, **extra}
        body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
        r = requests.post(smol_server.base_url + path, json=body, headers=HEADERS, timeout=60)
        assert r.status_code == 400, (extra, r.text)
        error = r.json()["error"]
        assert error["param"] == field and field.split(".")[-1] in error["message"], (extra, error)
    both = requests.post(smol_server.base_url + "/v1/chat/completions", headers=HEADERS, timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "guided_regex": "a", "ebnf": 'root ::= "a"'}).json()
    assert "`guided_regex`" in both["error"]["message"] and "`ebnf`" in both["error"]["message"]
    for params, field in (({"guided_grammar": "root ::= ("}, "parameters.guided_grammar"),
                          ({"guided_json": "[1"}, "parameters.guided_json"),
                          ({"regular_constraint": "[z-a]"}, "parameters.regular_constraint"),
                          ({"guided_json": {"type": "object"}, "allowed_token_ids": [1]},
                           "parameters.allowed_token_ids")):
        r = requests.post(smol_server.base_url + ("/generate_stream" if stream else "/generate"), timeout=60,
                          headers=HEADERS,
                          json={"inputs": "hi", "parameters": params})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (params, r.text)


def test_a_constraint_no_token_can_start_is_400_and_the_step_goes_on(smol_server):
    """SmolLM2's tokenizer drops control characters, so no token can start "\x14": refused at admission (the
    fuzzing run found it failing the whole step with NaN probabilities)."""
    body = {"prompt": ["hi", "there"], "max_tokens": 3, "guided_regex": "\x14", "repetition_penalty": 6.5e69}
    r = requests.post(smol_server.base_url + "/v1/completions", json=body, headers=HEADERS, timeout=60)
    assert r.status_code == 400 and "no token of this model's vocabulary" in r.json()["error"]["message"], r.text
    (text,) = _completion(smol_server, {"guided_regex": "[ab]{2}"})  # and the server goes on serving
    assert re.fullmatch("[ab]{2}", text), text


def test_unending_grammar_stops_at_max_tokens_and_cache_is_reused(smol_server):
    """Also: no speculative drafts for a constrained request, though this greedy, repetitive single stream is
    what prompt-lookup drafting picks up."""
    body = {"inputs": "x", "parameters": {"max_new_tokens": 7, "guided_grammar": 'root ::= "ab" root'}}
    compiled, hits, drafts = (_metric(smol_server, "lightllm_grammar_compiled_total"),
                              _metric(smol_server, "lightllm_grammar_cache_hits_total"),
                              _metric(smol_server, "lightllm_spec_draft_tokens_total"))
    first = requests.post(smol_server.base_url + "/generate", json=body, timeout=120, headers=HEADERS).json()
    assert first["finish_reason"] == "length" and first["generated_text"][0].startswith("abab"), first
    assert _metric(smol_server, "lightllm_grammar_compiled_total") == compiled + 1
    second = requests.post(smol_server.base_url + "/generate", json=body, timeout=120, headers=HEADERS).json()
    assert second == first
    assert _metric(smol_server, "lightllm_grammar_compiled_total") == compiled + 1  # not compiled again
    assert _metric(smol_server, "lightllm_grammar_cache_hits_total") == hits + 1
    assert _metric(smol_server, "lightllm_spec_draft_tokens_total") == drafts


def _pattern_schema(n: int) -> dict:
    """A schema whose string patterns make xgrammar's mask tables slow to build (~40 ms per property here)."""
    props = {f"f{i}": {"type": "string", "pattern": f"[a-z]{{{i % 7 + 1},{i % 7 + 9}}}[0-9]{{2}}-x{i}"}
             for i in range(n)}
    return {"type": "object", "properties": props, "required": list(props)}


def test_compilation_does_not_stall_other_streams_and_batches(smol_server):
    """While a slow schema compiles, an unconstrained stream keeps getting tokens; then both decode together,
    and the unconstrained output is what it is alone."""
    prompt = {"messages": [{"role": "user", "content": "Tell me a long story about a dragon."}], "max_tokens": 80,
              "temperature": 0, "ignore_eos": True}
    [solo] = _chat(smol_server, {}, max_tokens=80, ignore_eos=True, prompt=prompt["messages"][0]["content"],
                   finish="length")
    arrivals: list[float] = []
    texts: list[str] = []

    def stream_story():
        r = requests.post(smol_server.base_url + "/v1/chat/completions", headers=HEADERS, stream=True, timeout=300,
                          json={**prompt, "stream": True})
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    arrivals.append(time.perf_counter())
                    texts.append(delta)

    story = threading.Thread(target=stream_story)
    story.start()
    while len(arrivals) < 3:
        time.sleep(0.01)
    sent = time.perf_counter()
    schema = _pattern_schema(30)
    r = requests.post(smol_server.base_url + "/v1/chat/completions", headers=HEADERS, timeout=300, stream=True, json={
        "messages": [{"role": "user", "content": "Fill the form."}], "max_tokens": 12, "temperature": 0,
        "stream": True, "guided_json": schema})
    first_token = None
    for line in r.iter_lines():
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            first_token = time.perf_counter()
            break
    r.close()
    story.join()
    during = [t for t in arrivals if sent < t < first_token]
    assert len(during) >= 5, (first_token - sent, len(during))  # the engine kept stepping the story
    assert "".join(texts) == solo


# ------------------------------------------------------------------------------------- Qwen2.5-Coder


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory):
    fetched = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_qwen25_coder.py")], capture_output=True,
                             text=True)
    assert fetched.returncode == 0, f"Qwen2.5-Coder GGUF could not be fetched: {fetched.stderr[-500:]}"
    path = fetched.stdout.strip().splitlines()[-1]
    server = ServerProcess(["--model_dir", path, "--max_total_token_num", "8000", "--max_req_total_len", "4096",
                            "--api_key", API_KEY], tmp_path_factory.mktemp("logs") / "qwen_structured.log")
    yield server
    server.stop()


@pytest.mark.qwen
def test_constraints_on_qwen(qwen_server):
    [text] = _chat(qwen_server, {"guided_regex": r"\d{4}-\d{2}-\d{2}"}, prompt="What date is new year's day 2024?",
                   stream=True)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", text)
    [text] = _chat(qwen_server, {"structured_outputs": {"choice": ["Python", "Rust", "Go"]}},
                   prompt="Which language has a borrow checker: Python, Rust or Go?")
    assert text in ("Python", "Rust", "Go")
    texts = _chat(qwen_server, {"json_schema": json.dumps(PERSON)}, prompt="Describe Ada Lovelace as JSON.", n=2,
                  temperature=0.8, seed=1, max_tokens=80)
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    [text] = _completion(qwen_server, {"ebnf": GBNF}, prompt="# config as key=value pairs\n")
    lark.Lark(LARK_CHECK).parse(text)
