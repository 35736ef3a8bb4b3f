"""The chat page at `/` in a real browser: Debian's chromium driven by Playwright (no browser download), against
real servers on loopback: SmolLM2 with an API key (tests/conftest.py) and a tiny random Qwen3 with a thinking
template (tests/test_reasoning_e2e.py). Outside CI a missing browser skips with the reason; in CI (CI=true) it
fails, so the browser tests never vanish silently."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import API_KEY
from tests.test_reasoning_e2e import thinking_server  # noqa: F401  (the module-scoped fixture, reused)

CHROMIUM = os.environ.get("LIGHTLLM_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANSWER_TIMEOUT_MS = 180_000  # a shared 2-core box generates a few tokens per second under load
WEATHER_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a timezone",
                                      "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                                                     "required": ["timezone"]}}},
]


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run in CI: {reason} (make test installs chromium with apt-get)")
    pytest.skip(f"browser tests not run: {reason}")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _unavailable(f"playwright is not installed ({exc}); pip install -e '.[test]'")
    if not Path(CHROMIUM).exists():
        _unavailable(f"no browser at {CHROMIUM}; apt-get install chromium")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser):
    """Opens the page of a server in a fresh browser context (empty localStorage), the key preset when given."""
    contexts = []

    def open_(server, key: str | None = API_KEY, viewport=(1280, 800)):
        context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        contexts.append(context)
        if key is not None:
            context.add_init_script(f"localStorage.getItem('lightllm.apiKey') === null && "
                                    f"localStorage.setItem('lightllm.apiKey', {json.dumps(key)})")
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.errors = errors
        page.goto(server.base_url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        return page

    yield open_
    for context in contexts:
        context.close()


def settings(page, **fields) -> None:
    """Fill the settings panel (opened when hidden) like a user would."""
    if not page.is_visible("#settings"):
        page.click("#toggle-settings")
    ids = {"system": "#system-prompt", "temperature": "#temperature", "max_tokens": "#max-tokens", "tools": "#tools",
           "function": "#tool-name"}
    for name, value in fields.items():
        if name == "tool_choice":
            page.select_option("#tool-choice", value)
        else:
            page.fill(ids[name], str(value))


def send(page, text: str, streams: bool = True) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    if streams:
        page.wait_for_selector(".msg.assistant.streaming", timeout=10_000)


def wait_answer(page) -> None:
    page.wait_for_selector("#send:not([hidden])", timeout=ANSWER_TIMEOUT_MS)


def stored_conversation(page) -> dict:
    return page.evaluate("""() => {
        const all = JSON.parse(localStorage.getItem('lightllm.conversations'));
        return all.find((c) => c.id === localStorage.getItem('lightllm.current'));
    }""")


def api_chat(server, key: str | None = API_KEY, **body) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(server.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=300)


def test_page_is_open_and_asks_for_the_key(open_page, smol_server):
    page_html = requests.get(smol_server.base_url + "/", timeout=10)
    assert page_html.status_code == 200 and page_html.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page_html.headers["content-security-policy"]
    for asset in re.findall(r'(?:src|href)="(/webui/[^"]+)"', page_html.text) + ["/webui/markdown.js"]:
        assert requests.get(smol_server.base_url + asset, timeout=10).status_code == 200, asset
    assert requests.get(smol_server.base_url + "/v1/models", timeout=10).status_code == 401

    page = open_page(smol_server, key=None)
    page.wait_for_selector("#key-dialog[open]", timeout=10_000)
    page.fill("#key-input", "wrong-key")
    page.click("#key-submit")
    page.wait_for_selector("#key-dialog[open] #key-error:not([hidden])", timeout=10_000)
    assert page.inner_text("#key-error") == "Incorrect API key provided."
    page.fill("#key-input", API_KEY)
    page.click("#key-submit")
    models = requests.get(smol_server.base_url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=10).json()
    page.wait_for_selector("#model-name:not(:empty)", timeout=10_000)
    assert page.inner_text("#model-name") == models["data"][0]["id"]
    assert not page.is_visible("#key-dialog") and page.errors == []


def test_markdown_is_rendered_and_html_escaped(open_page, smol_server):
    page = open_page(smol_server)
    source = ("# Title\n<img src=x onerror=alert(1)> **bold** and `a<b>`\n\n```python\nprint('<b>')\n```\n"
              "- one\n- two [ok](https://example.org) [bad](javascript:alert(1))\n\n| a | b |\n|---|--:|\n| 1 | 2 |")
    html = page.evaluate("async (s) => (await import('/webui/markdown.js')).renderMarkdown(s)", source)
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>a&lt;b&gt;</code>" in html
    assert '<pre><code data-lang="python">print(&#39;&lt;b&gt;&#39;)</code></pre>' in html
    assert "<ul><li>one</li><li>two" in html and '<a href="https://example.org"' in html
    assert "javascript" not in html and "bad" in html and '<td class="align-right">2</td>' in html
    # an unterminated fence (an answer still streaming) is already a code block
    partial = page.evaluate("async (s) => (await import('/webui/markdown.js')).renderMarkdown(s)", "x\n```js\nlet a")
    assert '<code data-lang="js">let a</code>' in partial


def test_a_message_streams_an_answer_kept_in_local_storage(open_page, smol_server):
    page = open_page(smol_server)
    settings(page, temperature=0, max_tokens=24)
    # Count the distinct lengths the answer's text passes through while it streams.
    page.evaluate("""() => {
        window.seenLengths = new Set();
        new MutationObserver(() => {
            const el = document.querySelector('.msg.assistant.streaming .content');
            if (el && el.textContent) window.seenLengths.add(el.textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    question = "What is the capital of France?"
    send(page, question)
    wait_answer(page)
    assert page.evaluate("window.seenLengths.size") >= 3  # arrived in pieces, not at once

    expected = api_chat(smol_server, messages=[{"role": "user", "content": question}], temperature=0,
                        max_tokens=24).json()
    stored = stored_conversation(page)
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    answer = stored["messages"][1]
    assert answer["content"] == expected["choices"][0]["message"]["content"] and answer["status"] == "done"
    assert answer["usage"]["completion_tokens"] == expected["usage"]["completion_tokens"]
    stats = page.inner_text(".msg.assistant .stats")
    assert re.fullmatch(rf"{expected['usage']['completion_tokens']} tokens · \d+\.\d tok/s · TTFT \d+ ms · prompt "
                        rf"{expected['usage']['prompt_tokens']}( \(\d+ cached\))?( · finish: length)?", stats), stats
    assert page.inner_text(".msg.assistant .content").strip()

    # The conversation survives a reload; "New chat" starts an empty one and the list brings the old one back.
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.inner_text(".msg.user") == question
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.click("#conversations li .title")
    assert page.inner_text(".msg.user") == question and page.errors == []


def _generated_total(server) -> float:
    text = requests.get(server.base_url + "/metrics", timeout=10).text
    return float(re.search(r"^lightllm_generation_tokens_total (\S+)$", text, re.M).group(1))


def test_stop_aborts_the_stream_and_the_server_frees_the_request(open_page, smol_server):
    page = open_page(smol_server)
    settings(page, temperature=0, max_tokens=2000)
    before = _generated_total(smol_server)
    send(page, "Write a very long story about a dragon who learns to cook.")
    page.wait_for_selector(".msg.assistant.streaming .content:not(:empty)", timeout=ANSWER_TIMEOUT_MS)
    assert smol_server.token_load()["running"] == 1
    page.click("#stop")
    page.wait_for_selector("#send:not([hidden])", timeout=10_000)
    assert page.inner_text(".msg.assistant .stats").startswith("stopped")
    load = smol_server.wait_idle(timeout=15)
    assert load["running"] == 0 and load["waiting"] == 0 and load["kv_used_by_requests"] == 0, load
    generated = _generated_total(smol_server) - before
    time.sleep(1.0)
    assert _generated_total(smol_server) - before == generated < 2000  # nothing more is generated for it
    assert stored_conversation(page)["messages"][1]["status"] == "stopped"


def test_a_forced_tool_call_is_shown_and_answered(open_page, smol_server):
    page = open_page(smol_server)
    settings(page, temperature=0, max_tokens=60, tools=json.dumps(WEATHER_TOOLS), tool_choice="required")
    send(page, "What is the weather in Paris?")
    wait_answer(page)
    call = page.locator(".msg.assistant .tool-call").first
    name = call.locator(".tool-name").inner_text()
    assert name in ("get_weather", "get_time")
    arguments = json.loads(call.locator(".tool-args").inner_text())
    assert isinstance(arguments, dict) and arguments  # a forced call's arguments follow the schema

    settings(page, tool_choice="auto", max_tokens=16)
    for reply in page.locator("textarea.tool-result").all():
        reply.fill('{"temperature_c": 18, "sky": "sunny"}')
    page.click("button.send-tool-results")
    page.wait_for_selector(".msg.assistant.streaming", timeout=10_000)
    wait_answer(page)
    assert page.locator(".msg.tool").first.inner_text().startswith(f"tool result ({name})")
    messages = stored_conversation(page)["messages"]
    assert [m["role"] for m in messages][:3] == ["user", "assistant", "tool"] and messages[-1]["role"] == "assistant"
    assert messages[2]["tool_call_id"] == messages[1]["tool_calls"][0]["id"]
    assert messages[-1]["status"] == "done" and messages[-1]["usage"]["completion_tokens"] > 0
    assert page.locator(".msg.assistant").first.locator("textarea.tool-result").count() == 0  # answered


def test_a_named_tool_choice_calls_that_function(open_page, smol_server):
    page = open_page(smol_server)
    settings(page, temperature=0, max_tokens=40, tools=json.dumps(WEATHER_TOOLS), tool_choice="named",
             function="get_time")
    send(page, "What is the weather in Paris?")
    wait_answer(page)
    assert page.locator(".msg.assistant .tool-call .tool-name").all_inner_texts() == ["get_time"]
    assert "timezone" in json.loads(page.inner_text(".msg.assistant .tool-args"))


def test_a_server_error_is_shown_with_its_message(open_page, smol_server):
    page = open_page(smol_server)
    settings(page, max_tokens=100000)
    send(page, "Hello", streams=False)
    page.wait_for_selector(".msg.error", timeout=30_000)
    expected = api_chat(smol_server, messages=[{"role": "user", "content": "Hello"}], max_tokens=100000, stream=True)
    assert expected.status_code == 400
    assert page.inner_text(".msg.error") == f"Error 400: {expected.json()['error']['message']}"
    assert [m["role"] for m in stored_conversation(page)["messages"]] == ["user", "error"]

    settings(page, max_tokens=8, tools="[{not json")  # a local mistake is reported before anything is sent
    page.fill("#prompt", "again")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#tools-error:not([hidden])", timeout=5_000)
    assert page.inner_text("#tools-error").startswith("Tools:")
    assert page.input_value("#prompt") == "again"  # kept, to send once the tools are fixed
    assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant").count() == 0


def test_reasoning_is_shown_apart_and_collapsible(open_page, thinking_server):  # noqa: F811
    page = open_page(thinking_server, key=None)
    settings(page, temperature=0, max_tokens=12)
    send(page, "What is 2 + 2?")
    wait_answer(page)
    expected = api_chat(thinking_server, key=None, messages=[{"role": "user", "content": "What is 2 + 2?"}],
                        temperature=0, max_tokens=12).json()["choices"][0]["message"]
    assert expected["reasoning_content"] and not expected["content"]
    details = page.locator(".msg.assistant details.reasoning")
    body = details.locator(".reasoning-body")
    assert body.is_visible() and body.text_content() == expected["reasoning_content"]
    assert page.text_content(".msg.assistant .content") == ""
    details.locator("summary").click()
    assert not body.is_visible() and details.evaluate("d => d.open") is False
    details.locator("summary").click()
    assert body.is_visible()


def test_usable_at_phone_width(open_page, smol_server):
    page = open_page(smol_server, viewport=(390, 844))
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("#composer").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844
    assert not page.is_visible("#sidebar") and not page.is_visible("#settings")
    page.click("#toggle-settings")
    settings_box = page.locator("#settings").bounding_box()
    assert page.is_visible("#max-tokens") and settings_box["x"] + settings_box["width"] <= 390
    page.click("#toggle-settings")
    page.click("#toggle-sidebar")
    assert page.is_visible("#sidebar")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390 and page.errors == []


def test_disable_webui_turns_the_page_off():
    """No browser or model needed: the app's routes without its lifespan (the engine is never started)."""
    from fastapi.testclient import TestClient

    from lightllm.server.args import parse_args
    from lightllm.server.http_app import create_app

    on = TestClient(create_app(parse_args([]), "unused"))
    page = on.get("/")
    assert page.status_code == 200 and '<script type="module" src="/webui/app.js">' in page.text
    assert on.get("/webui/app.js").status_code == 200 and on.get("/webui/nothing.js").status_code == 404
    off = TestClient(create_app(parse_args(["--disable_webui"]), "unused"))
    assert off.get("/").status_code == 404 and off.get("/webui/app.js").status_code == 404
