"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with the matching HTTP status; on the
Anthropic routes (`/v1/messages*`) Anthropic's {"type": "error", "error": {"type", "message"}} instead."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("lightllm.api")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}


# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors); other 4xx are
# invalid_request_error, other 5xx api_error.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}
ANTHROPIC_PREFIX = "/v1/messages"


def is_anthropic_path(path: str | None) -> bool:
    return path is not None and (path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"))


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    err_type = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": err_type, "message": message}}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 err_type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.err_type = err_type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, err_type: str, param: str | None = None, code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def anthropic_stream_error_event(exc: BaseException, request_id: str | None = None) -> dict[str, Any]:
    """The payload of the `event: error` that ends an Anthropic stream, classified as stream_error_event does."""
    body = stream_error_event(exc, request_id)["error"]
    return anthropic_error_body(body["status"], body["message"])


def stream_error_event(exc: BaseException, request_id: str | None = None) -> dict[str, Any]:
    """The `data: {"error": ...}` event that ends a stream (then `[DONE]`): an APIError keeps its own status
    and type; anything else is a server fault, logged with the request id and reported as such."""
    if isinstance(exc, APIError):
        body = error_body(exc.message, exc.err_type, exc.param, exc.code)
        body["error"]["status"] = exc.status
        return body
    logger.error("stream %s failed: %s", request_id, exc, exc_info=exc)
    body = error_body(f"internal server error ({type(exc).__name__})", "server_error", None, "internal_error")
    body["error"]["status"] = 500
    return body


def error_response(status: int, message: str, param: str | None = None, code: Any = None,
                   err_type: str | None = None, headers: dict[str, str] | None = None,
                   path: str | None = None) -> JSONResponse:
    """The error as a JSON response, in the Anthropic shape when `path` is an Anthropic route."""
    if is_anthropic_path(path):
        return JSONResponse(anthropic_error_body(status, message), status_code=status, headers=headers)
    err_type = err_type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(error_body(message, err_type, param, code), status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"invalid JSON body: {first.get('msg')}", None
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return message, param


def _allowed_methods(request: Request) -> list[str]:
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= route.methods
    return sorted(methods)


def install_error_handlers(app) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.err_type, exc.headers,
                              path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return error_response(400, message, param, "invalid_value", path=request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
        return error_response(500, f"internal server error ({type(exc).__name__})", code="internal_error",
                              path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = "Not Found: no such route"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method the path takes, not only those of the first matching route
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return error_response(exc.status_code, message, headers=headers or None, path=request.url.path)
