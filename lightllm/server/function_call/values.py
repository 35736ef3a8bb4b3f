"""Typed argument values for formats that write each parameter as text (qwen3_coder XML, GLM
`<arg_value>`, DeepSeek-V3.2 DSML): the tool's JSON schema says what the text means.

The rules follow what vLLM's and SGLang's parsers do: a `string` parameter keeps its text verbatim;
integer / number / boolean / null / object / array texts are decoded; text that does not decode as its
declared type is kept as a string (the call is still returned, so the client can see what the model
wrote; the peers turn a non-boolean into false, which hides it). `null` is None whatever the type, as
all three peers do. A parameter the schema does not declare is decoded as JSON when it is JSON, else
kept as text.
"""

from __future__ import annotations

import ast
import json
from typing import Any

_STRING_TYPES = {"string", "str", "text", "varchar", "char", "enum"}


def declared_types(schema: dict[str, Any] | None) -> list[str]:
    """The JSON types a property schema allows (`type` as a string or list, or the types of `anyOf`/`oneOf`)."""
    if not isinstance(schema, dict):
        return []
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind.lower()]
    if isinstance(kind, list):
        return [str(k).lower() for k in kind]
    if "enum" in schema and all(isinstance(v, str) for v in schema["enum"]):
        return ["string"]
    types: list[str] = []
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or []:
            types += [t for t in declared_types(option) if t not in types]
    return types


def _decode_json_like(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, ValueError):
        pass
    try:  # Python literals: {'a': 1}, True, None
        return True, ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return False, None


def _as_type(text: str, kind: str) -> tuple[bool, Any]:
    stripped = text.strip()
    if kind in _STRING_TYPES:
        return True, text
    if kind in ("integer", "int"):
        try:
            return True, int(stripped)
        except ValueError:
            return False, None
    if kind in ("number", "float", "double"):
        try:
            value = float(stripped)
        except ValueError:
            return False, None
        if value != value or value in (float("inf"), float("-inf")):
            return False, None  # JSON has no NaN / Infinity
        return True, int(value) if value.is_integer() and "." not in stripped and "e" not in stripped.lower() else value
    if kind in ("boolean", "bool"):
        lowered = stripped.lower()
        if lowered in ("true", "false"):
            return True, lowered == "true"
        return False, None
    if kind == "null":
        return (True, None) if stripped.lower() in ("null", "none") else (False, None)
    if kind in ("object", "array", "dict", "list"):
        ok, value = _decode_json_like(stripped)
        if ok and isinstance(value, dict if kind in ("object", "dict") else list):
            return True, value
        return False, None
    return False, None


def convert_value(text: str, schema: dict[str, Any] | None) -> Any:
    """The value of one parameter written as text, typed by its property schema (None: undeclared)."""
    if text.strip().lower() == "null":
        return None
    kinds = declared_types(schema)
    if not kinds:
        ok, value = _decode_json_like(text.strip()) if text.strip() else (False, None)
        return value if ok and not isinstance(value, (set, tuple, bytes, complex)) else text
    # Non-string types first: a ["integer", "string"] parameter holding "3" is the number 3.
    for kind in sorted(kinds, key=lambda k: k in _STRING_TYPES):
        ok, value = _as_type(text, kind)
        if ok:
            return value
    return text


def property_schema(tool_schema: dict[str, Any] | None, parameter: str) -> dict[str, Any] | None:
    if not isinstance(tool_schema, dict):
        return None
    props = tool_schema.get("properties")
    return props.get(parameter) if isinstance(props, dict) else None
