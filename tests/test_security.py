"""--api_key / --admin_api_key / --metrics_require_key / --allowed_origins over every registered route.

The route table is walked from the app itself, and the expectations below are this test's own: a route
added later that is not protected (or that claims to be open) fails here until someone decides."""

from __future__ import annotations

import logging
import re

import pytest
import requests
from fastapi.routing import iter_route_contexts
from starlette.routing import Mount
from starlette.testclient import TestClient

from lightllm.server.args import parse_args
from lightllm.server.http_app import create_app
from tests.conftest import ServerProcess, build_tiny_model, embedded_model_path

KEY, ADMIN_KEY = "k-ordinary-7f3", "k-admin-91c"
# Open under any key: probes, the API documents, the chat page's shell. Everything else needs a key.
OPEN = {"/health", "/healthz", "/readiness", "/liveness", "/openapi.json", "/docs", "/docs/oauth2-redirect",
        "/redoc", "/"}
ADMIN = {"/flush_cache", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
METRICS = "/metrics"
STATIC_MOUNTS = {"/webui": "/webui/index.html"}
# the route families that must exist (so the walk below covers them)
MUST_EXIST = {"/generate", "/generate_stream", "/tokens", "/tokenize", "/detokenize", "/get_server_info",
              "/server_info", "/model_info", "/get_model_info", "/get_load", "/flush_cache", "/token_load",
              "/get_model_name", "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages",
              "/v1/responses"}


def make_app(*flags: str):
    """The real app without its lifespan (no engine): routes past the key check fail with 500 or 400, which
    is all this test needs to tell them from a 401."""
    return create_app(parse_args(list(flags)), "/nonexistent-model")


def requests_for(app) -> list[tuple[str, str, str]]:
    """(method, url, route path) for every registered route."""
    out = []
    for route in iter_route_contexts(app.routes):  # routers' routes included
        if isinstance(route.original_route, Mount):
            assert route.path in STATIC_MOUNTS, f"new mount {route.path}: decide whether it is open"
            out.append(("GET", STATIC_MOUNTS[route.path], route.path))
            continue
        url = re.sub(r"\{[^}]+\}", "x1", route.path)
        for method in sorted(route.methods - {"HEAD"}):
            out.append((method, url, route.path))
    return out


def call(client, method: str, url: str, headers: dict[str, str]):
    return client.request(method, url, headers=headers, json={} if method in ("POST", "PUT", "PATCH") else None)


NO_KEY, WRONG = {}, {"Authorization": "Bearer nope"}
BEARER, X_API = {"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}
ADMIN_BEARER, ADMIN_X = {"Authorization": f"Bearer {ADMIN_KEY}"}, {"x-api-key": ADMIN_KEY}


def expected_open(path: str, headers: dict, *, api_key: bool, admin_key: bool, metrics_key: bool) -> bool:
    """This test's own statement of the policy (README, Security)."""
    sent = headers.get("x-api-key") or headers.get("Authorization", "").removeprefix("Bearer ")
    if path in OPEN or path in STATIC_MOUNTS or (path == METRICS and not metrics_key):
        return True
    if admin_key and sent == ADMIN_KEY:
        return True
    if path in ADMIN and admin_key:
        return False
    return not api_key or sent == KEY


CONFIGS = {
    "api_key": (["--api_key", KEY], dict(api_key=True, admin_key=False, metrics_key=False)),
    "api_and_admin_keys": (["--api_key", KEY, "--admin_api_key", ADMIN_KEY],
                           dict(api_key=True, admin_key=True, metrics_key=False)),
    "metrics_require_key": (["--api_key", KEY, "--metrics_require_key"],
                            dict(api_key=True, admin_key=False, metrics_key=True)),
    "admin_key_only": (["--admin_api_key", ADMIN_KEY], dict(api_key=False, admin_key=True, metrics_key=False)),
    "no_key": ([], dict(api_key=False, admin_key=False, metrics_key=False)),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_registered_route_with_no_wrong_right_and_admin_key(config, caplog):
    flags, policy = CONFIGS[config]
    app = make_app(*flags)
    table = requests_for(app)
    assert MUST_EXIST <= {path for _, _, path in table}
    client = TestClient(app, raise_server_exceptions=False)
    caplog.set_level(logging.WARNING, logger="lightllm.api")
    for method, url, path in table:
        for name, headers in [("none", NO_KEY), ("wrong", WRONG), ("bearer", BEARER), ("x-api-key", X_API),
                              ("admin bearer", ADMIN_BEARER), ("admin x-api-key", ADMIN_X)]:
            r = call(client, method, url, headers)
            if expected_open(path, headers, **policy):
                assert r.status_code != 401, (config, method, url, name, r.text)
            else:
                assert r.status_code == 401, (config, method, url, name, r.status_code, r.text[:200])
                assert r.headers["www-authenticate"] == "Bearer"
                body = r.json()
                if path.startswith("/v1/messages"):  # Anthropic's shape
                    assert body["type"] == "error" and body["error"]["type"] == "authentication_error", body
                else:  # OpenAI's, which the native routes share
                    assert body["error"]["type"] == "authentication_error", body
                    assert body["error"]["code"] == "invalid_api_key", body
                assert KEY not in r.text and ADMIN_KEY not in r.text
    assert KEY not in caplog.text and ADMIN_KEY not in caplog.text


def test_unknown_paths_need_the_key_and_preflights_pass():
    client = TestClient(make_app("--api_key", KEY), raise_server_exceptions=False)
    assert client.get("/no/such/route").status_code == 401  # no route map for strangers
    assert client.get("/no/such/route", headers=BEARER).status_code == 404
    assert client.get("/v1/nope", headers=X_API).status_code == 404
    assert client.post("/health").status_code == 405  # a probe's path with another method: still open
    assert client.put("/generate").status_code == 401
    assert client.put("/generate", headers=BEARER).status_code == 405


def test_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("LIGHTLLM_API_KEY", KEY)
    monkeypatch.setenv("LIGHTLLM_ADMIN_API_KEY", ADMIN_KEY)
    args = parse_args([])
    assert (args.api_key, args.admin_api_key) == (KEY, ADMIN_KEY)
    assert KEY not in repr(args.public_dict()) and ADMIN_KEY not in repr(args.public_dict())
    client = TestClient(create_app(args, "/nonexistent-model"), raise_server_exceptions=False)
    assert client.post("/generate", json={}).status_code == 401
    assert client.post("/flush_cache", headers=BEARER).status_code == 401
    assert client.post("/flush_cache", headers=ADMIN_X).status_code != 401
    assert parse_args(["--api_key", "flag-wins"]).api_key == "flag-wins"


def test_help_never_shows_a_key_from_the_environment(monkeypatch, capsys):
    from lightllm.server.args import build_parser

    monkeypatch.setenv("LIGHTLLM_API_KEY", KEY)
    build_parser().print_help()
    assert KEY not in capsys.readouterr().out


def test_openapi_marks_the_routes_that_need_a_key():
    doc = TestClient(make_app("--api_key", KEY, "--admin_api_key", ADMIN_KEY)).get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["scheme"] == "bearer" and schemes["apiKeyHeader"]["name"] == "x-api-key"
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if path in OPEN or path == METRICS:
                assert "security" not in op, (path, method)
            else:
                assert op.get("security") == [{"bearerAuth": []}, {"apiKeyHeader": []}], (path, method)
            assert (op.get("x-lightllm-access") == "admin") == (path in ADMIN), (path, method)
    open_doc = TestClient(make_app()).get("/openapi.json").json()  # no key: nothing to send
    assert "securitySchemes" not in open_doc.get("components", {})


def test_cors_closed_by_default_and_opened_by_allowed_origins():
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    closed = TestClient(make_app("--api_key", KEY), raise_server_exceptions=False)
    r = closed.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in closed.get("/health", headers={"Origin": "http://app.example"}).headers
    for flag in ("--allowed_origins", "--cors_allow_origins"):  # the old name still works
        client = TestClient(make_app("--api_key", KEY, flag, "http://app.example"), raise_server_exceptions=False)
        r = client.options("/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in r.headers
        other = client.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        # a 401 carries the CORS header too, so the browser page can read why
        denied = client.post("/v1/chat/completions", json={}, headers={"Origin": "http://app.example"})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "http://app.example"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A tiny model behind both keys (the ordinary one from the environment, off the command line), /metrics
    behind the key, one CORS origin."""
    from lightllm.tokenizer import load_tokenizer

    tmp = tmp_path_factory.mktemp("security")
    tokenizer = load_tokenizer(embedded_model_path())
    model_dir = build_tiny_model(tmp / "model", "llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(model_dir)
    server = ServerProcess(["--model_dir", str(model_dir), "--max_total_token_num", "2000", "--max_req_total_len", "256",
                            "--admin_api_key", ADMIN_KEY, "--metrics_require_key",
                            "--allowed_origins", "http://app.example"], tmp / "server.log",
                           env={"LIGHTLLM_API_KEY": KEY})
    yield server
    server.stop()


def test_real_server_guards_the_model_and_its_state(keyed_server):
    url = keyed_server.base_url
    gen = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
    assert requests.post(url + "/generate", json=gen, timeout=30).status_code == 401
    assert requests.post(url + "/generate", json=gen, headers=WRONG, timeout=30).status_code == 401
    ok = requests.post(url + "/generate", json=gen, headers=BEARER, timeout=60)
    assert ok.status_code == 200 and ok.json()["count_output_tokens"] == 2
    assert requests.post(url + "/generate_stream", json=gen, headers=X_API, timeout=60).status_code == 200
    denied = requests.post(url + "/v1/messages", json={"model": "m", "max_tokens": 2, "messages": []}, timeout=30)
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
    info = requests.get(url + "/get_server_info", headers=BEARER, timeout=10)
    assert info.status_code == 200 and KEY not in info.text and ADMIN_KEY not in info.text
    assert "api_key" not in info.json() and info.json()["metrics_require_key"] is True
    assert requests.get(url + "/get_server_info", timeout=10).status_code == 401
    assert requests.get(url + "/metrics", timeout=10).status_code == 401
    assert requests.get(url + "/metrics", headers=BEARER, timeout=10).status_code == 200
    assert requests.post(url + "/flush_cache", headers=BEARER, timeout=30).status_code == 401
    assert requests.post(url + "/flush_cache", headers=ADMIN_BEARER, timeout=30).status_code == 200
    assert requests.get(url + "/health", timeout=10).status_code == 200
    log = keyed_server.log_path.read_text()
    assert "admin routes need the admin key" in log and "/metrics needs it" in log
    assert KEY not in log and ADMIN_KEY not in log
