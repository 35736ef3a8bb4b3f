"""The OpenAPI contract: every route's request body and every status it can answer, with the error
schema, so generated clients and fuzzers (schemathesis) see what the server really does.

FastAPI documents bodies it parses itself; the native routes parse theirs by hand (LightLLM clients post
JSON without a JSON content type), so their models are declared here. Validation errors answer 400, not
FastAPI's 422, so 422 is dropped from the document.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Union, get_args, get_origin

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


def _alternatives(annotation: Any) -> list[Any]:
    """The types a field accepts: unions flattened, Annotated metadata dropped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _alternatives(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [alt for arg in get_args(annotation) for alt in _alternatives(arg)]
    return [annotation]


def _json_integers(annotation: Any, value: Any) -> Any:
    """`value` with integral floats turned into ints wherever `annotation` takes an integer and not a number."""
    alternatives = _alternatives(annotation)
    if isinstance(value, float) and value.is_integer() and int in alternatives and float not in alternatives:
        return int(value)
    if isinstance(value, list):
        items = [get_args(alt)[0] for alt in alternatives if get_origin(alt) is list and get_args(alt)]
        if items:
            item_type = Union[tuple(items)] if len(items) > 1 else items[0]
            return [_json_integers(item_type, item) for item in value]
    return value


def integral_floats_as_ints(model: type[BaseModel], data: Any) -> Any:
    """JSON Schema's `integer` is any number with no fractional part, so `1.0` is one (schemathesis sends it;
    so may any JSON encoder): a strict model's int fields take it as 1, while "1", 1.5 and true stay refused.
    For a model's `mode="before"` validator; nested models apply their own."""
    if not isinstance(data, dict):
        return data
    fixed = None
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key in data:
            value = _json_integers(field.annotation, data[key])
            if value is not data[key]:
                fixed = fixed if fixed is not None else dict(data)
                fixed[key] = value
    return fixed if fixed is not None else data


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


_HAND_PARSED: list[type[BaseModel]] = []  # every model json_body() named, put into the document's components


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that parses `model` from its body by hand."""
    if model not in _HAND_PARSED:
        _HAND_PARSED.append(model)
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def install_openapi(app: FastAPI, hand_parsed: list[type[BaseModel]]) -> None:
    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description="OpenAI-compatible, Anthropic Messages and LightLLM native APIs")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in [*hand_parsed, *(m for m in _HAND_PARSED if m not in hand_parsed)]:
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
