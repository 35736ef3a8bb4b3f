"""The chat page at `/`: static files shipped inside the package (no CDN, no build step), talking to the
server's own `/v1/chat/completions`. The page and its assets are open; the API calls it makes carry the key
(`--api_key`), which the page asks for when the server answers 401."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from lightllm.server.auth import OPEN

STATIC_DIR = Path(__file__).parent / "static"
ASSET_PREFIX = "/webui"
# Everything the page loads comes from this server; model output is rendered as escaped text (markdown.js),
# and the policy stops any script or remote resource that slipped through anyway.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
           "Referrer-Policy": "no-referrer"}


class _Assets(StaticFiles):
    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def install_webui(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False, dependencies=[OPEN])  # the page itself is open (lightllm.server.auth)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=HEADERS)

    app.mount(ASSET_PREFIX, _Assets(directory=STATIC_DIR), name="webui")
