"""Screenshot of the chat page (docs/webui.png) answering a real question: starts a server with the given model
(default Qwen2.5-Coder-0.5B, fetched by name), asks through the page in Debian's chromium, saves the PNG.

    .venv/bin/python scripts/webui_screenshot.py [--model_dir qwen2.5-coder] [--out docs/webui.png]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parent.parent
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTION = "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces."
SYSTEM = "You are a concise coding assistant."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model_dir", default="qwen2.5-coder")
    ap.add_argument("--out", default=str(REPO / "docs" / "webui.png"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--max_tokens", type=int, default=400)
    opts = ap.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(Path(tempfile.gettempdir()) / "webui_screenshot_server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "lightllm.server.api_server", "--host", "127.0.0.1", "--port",
                               str(port), "--model_dir", opts.model_dir], cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while True:
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"server did not start; see {log.name}")
            try:
                if requests.get(base + "/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=opts.chromium, args=LAUNCH_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(base + "/")
            page.wait_for_selector("body[data-ready='1']")
            page.fill("#system-prompt", SYSTEM)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", str(opts.max_tokens))
            page.fill("#prompt", QUESTION)
            page.press("#prompt", "Enter")
            page.wait_for_selector(".msg.assistant.streaming", timeout=30_000)
            page.wait_for_selector("#send:not([hidden])", timeout=600_000)
            page.eval_on_selector("#messages", "el => { el.scrollTop = 0; }")
            Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=opts.out)
            browser.close()
        print(f"{opts.out}: {Path(opts.out).stat().st_size // 1024} KB")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()


if __name__ == "__main__":
    main()
