"""The OpenAPI contract: every route's request body and every status it can answer, with the error
schema, so generated clients and fuzzers (schemathesis) see what the server really does.

FastAPI documents bodies it parses itself; the native routes parse theirs by hand (LightLLM clients post
JSON without a JSON content type), so their models are declared here. Validation errors answer 400, not
FastAPI's 422, so 422 is dropped from the document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None
    status: int | None = None  # on error events that end a stream


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthStatus(BaseModel):
    message: str


HEALTH_RESPONSES = {200: {"model": HealthStatus, "description": "Ready"},
                    503: {"model": HealthStatus, "description": "Engine down or draining"}}


def error_responses(*statuses: int, model: type[BaseModel] = ErrorResponse) -> dict[int | str, dict[str, Any]]:
    text = {400: "Invalid request", 401: "Missing or wrong API key", 404: "No such route or model",
            413: "Request body too large", 500: "Server fault", 503: "Engine unavailable, overloaded or draining"}
    return {status: {"model": model, "description": text.get(status, "Error")} for status in statuses}


# What every route may answer besides 200 (401 only with --api_key; 413 when the body is too large).
COMMON_ERRORS = error_responses(400, 401, 404, 413, 500, 503)

STREAMING_OK = {200: {"description": "A JSON body, or an SSE stream (`text/event-stream`) when `stream` is true",
                      "content": {"application/json": {}, "text/event-stream": {}}}}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that parses `model` from its body by hand."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def install_openapi(app: FastAPI, hand_parsed: list[type[BaseModel]]) -> None:
    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description="OpenAI-compatible, Anthropic Messages and LightLLM native APIs")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in hand_parsed:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = build
