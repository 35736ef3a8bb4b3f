"""Who may call which route: `--api_key` (or $LIGHTLLM_API_KEY), `--admin_api_key` (or $LIGHTLLM_ADMIN_API_KEY).

Deny by default: with a key set, every route needs it unless declared otherwise, so a route added later is
protected without anyone remembering to. Declared otherwise:
- open: the probes (/health, /healthz, /readiness, /liveness), the API documents (/openapi.json, /docs,
  /redoc), static files (a StaticFiles mount), and routes with `dependencies=[OPEN]` (a page's shell that
  reads nothing of the model or the server; its API calls go through protected routes);
- /metrics: open unless --metrics_require_key (Prometheus scrapers often cannot send headers);
- admin: routes with `dependencies=[ADMIN]` (cache flush, adapter load/unload, node registration: whatever
  changes the server's state for everyone) need --admin_api_key when it is set; the ordinary key is then not
  enough. Without an admin key they take the ordinary key.
The admin key opens every route. A key is sent as `Authorization: Bearer KEY` (OpenAI clients) or
`x-api-key: KEY` (Anthropic clients), compared in constant time; a missing or wrong one is a 401 in the
route's own error shape, logged without the key. One middleware enforces this before the body is read.
"""

from __future__ import annotations

import enum
import hmac
import logging
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI
from fastapi import routing as fastapi_routing
from fastapi.routing import APIRoute
from starlette.routing import Match, Mount
from starlette.staticfiles import StaticFiles

from lightllm.server.errors import error_response

logger = logging.getLogger("lightllm.api")

PROBES = frozenset({"/health", "/healthz", "/readiness", "/liveness"})
METRICS_PATH = "/metrics"


class Access(enum.Enum):
    OPEN = "open"
    METRICS = "metrics"
    KEY = "key"
    ADMIN = "admin"


async def open_access() -> None:
    """Declares a route open under --api_key (read by AuthMiddleware); only for what reveals nothing of the
    model or the server and runs nothing."""


async def admin_access() -> None:
    """Declares an admin route (read by AuthMiddleware): it needs --admin_api_key when one is set."""


OPEN = Depends(open_access)
ADMIN = Depends(admin_access)


def app_routes(app: FastAPI) -> list[Any]:
    """Every route the app serves, in matching order, routers' routes included (FastAPI >= 0.16x keeps an
    included router as one entry; its route contexts match, carry the path, methods and dependencies)."""
    iter_contexts = getattr(fastapi_routing, "iter_route_contexts", None)
    return list(iter_contexts(app.routes)) if iter_contexts else list(app.routes)


def _original(route: Any) -> Any:
    return getattr(route, "original_route", route)


def route_access(app: FastAPI, route: Any) -> Access:
    """The access level a registered route declares (see the module docstring)."""
    path = getattr(route, "path", "")
    original = _original(route)
    if path in PROBES or path in {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}:
        return Access.OPEN
    if path == METRICS_PATH:
        return Access.METRICS
    if isinstance(original, Mount) and isinstance(original.app, StaticFiles):
        return Access.OPEN
    if isinstance(original, APIRoute):
        calls = {dep.call for dep in getattr(route, "dependant", original.dependant).dependencies}
        if admin_access in calls:
            return Access.ADMIN
        if open_access in calls:
            return Access.OPEN
    return Access.KEY


@dataclass(frozen=True)
class AuthPolicy:
    api_key: str | None = None
    admin_api_key: str | None = None
    metrics_require_key: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.api_key or self.admin_api_key)

    def keys_for(self, access: Access) -> list[str]:
        """The keys that open a route of this access level; [] when it needs none."""
        if access is Access.OPEN or (access is Access.METRICS and not self.metrics_require_key):
            return []
        if access is Access.ADMIN and self.admin_api_key:
            return [self.admin_api_key]
        if not self.api_key:  # no ordinary key: ordinary routes (and admin routes without an admin key) are open
            return []
        return [k for k in (self.api_key, self.admin_api_key) if k]

    def describe(self) -> str:
        """What the start-up log says about it (never the keys)."""
        if not self.enabled:
            return "no API key: every route is open"
        parts = [("an API key is required on every route except the probes and the API documents"
                  if self.api_key else "no API key for ordinary routes")]
        parts.append("/metrics needs it (--metrics_require_key)" if self.metrics_require_key and self.api_key
                     else "/metrics is open (--metrics_require_key protects it)")
        if self.admin_api_key:
            parts.append("admin routes need the admin key")
        return "; ".join(parts)


def _presented(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    keys = []
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            keys.append(value[7:].strip())
        elif name == b"x-api-key":
            keys.append(value.strip())
    return keys


def key_matches(presented: list[bytes], accepted: list[str]) -> bool:
    """Constant time in the keys' contents: every pair is compared, no early exit on a match."""
    ok = False
    for key in accepted:
        for candidate in presented:
            ok |= hmac.compare_digest(candidate, key.encode())
    return ok


class AuthMiddleware:
    """Enforces the AuthPolicy for the route a request would reach, before the route reads its body. CORS
    preflights (OPTIONS) pass: they carry no credentials and the CORS middleware answers them."""

    def __init__(self, app: Any, fastapi_app: FastAPI, policy: AuthPolicy):
        self.app = app
        self.fastapi_app = fastapi_app
        self.policy = policy
        self._routes: list[tuple[Any, Access]] | None = None

    def access_for(self, scope: dict) -> Access:
        if self._routes is None:  # the app's routes are all registered by the first request
            self._routes = [(r, route_access(self.fastapi_app, r)) for r in app_routes(self.fastapi_app)]
        partial = Access.KEY
        for route, access in self._routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return access
            if match is Match.PARTIAL:  # the path exists with another method: answer 405 only to the key holder
                partial = access
        return partial  # unknown paths need the key too: a 404 would tell a stranger which routes exist

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        access = self.access_for(scope)
        accepted = self.policy.keys_for(access)
        if accepted:
            presented = _presented(scope.get("headers") or [])
            if not key_matches(presented, accepted):
                path = scope.get("path", "")
                admin = access is Access.ADMIN and self.policy.admin_api_key is not None
                why = "no key" if not presented else ("not the admin key" if admin else "wrong key")
                client = (scope.get("client") or ("?",))[0]
                logger.warning("401 %s %s from %s: %s", scope["method"], path, client, why)
                message = ("This route needs the admin API key." if admin else
                           "Missing API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`." if not presented
                           else "Incorrect API key provided.")
                response = error_response(401, message, code="invalid_api_key", path=path,
                                          headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer", "description": "--api_key (or the admin key)"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "--api_key (or the admin key)"},
}


def install_openapi_security(app: FastAPI, policy: AuthPolicy) -> None:
    """Mark in the OpenAPI document which operations need a key on this server (either header works) and
    which need the admin key (`x-lightllm-access: admin`)."""
    build = app.openapi
    marked: list[dict] = []  # the (cached) document once marked

    def openapi() -> dict[str, Any]:
        schema = build()
        if any(done is schema for done in marked) or not policy.enabled:
            return schema
        marked.append(schema)
        schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
        for route in app_routes(app):
            if not isinstance(_original(route), APIRoute) or not getattr(route, "include_in_schema", False):
                continue
            access = route_access(app, route)
            if not policy.keys_for(access):
                continue
            for method in route.methods:
                operation = schema.get("paths", {}).get(route.path_format, {}).get(method.lower())
                if operation is not None:
                    operation["security"] = [{"bearerAuth": []}, {"apiKeyHeader": []}]
                    if access is Access.ADMIN and policy.admin_api_key:
                        operation["x-lightllm-access"] = "admin"
        return schema

    app.openapi = openapi
