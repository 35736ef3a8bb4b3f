"""Structured outputs in each peer's request shape → one GrammarSpec, checked before the request starts.

Accepted (README, "Structured outputs"): vLLM's `structured_outputs` {json, regex, choice, grammar, json_object,
structural_tag} and its older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`; SGLang's
`regex` / `ebnf` / `json_schema` and `response_format` {"type": "structural_tag"}; LightLLM's `guided_grammar` /
`guided_json` / `regular_constraint` / `allowed_token_ids`; OpenAI's `response_format` json_schema (`strict`).

A request carries at most one constraint (two → 400 naming both). Every grammar is parsed here with xgrammar
(the engine compiles the same text later), so an invalid regex, a grammar that does not parse, an empty choice
list or a schema xgrammar cannot convert is a 400 naming its field before any stream begins.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from lightllm.engine.protocol import GrammarSpec
from lightllm.server.errors import APIError
from lightllm.server.limits import MAX_TOOL_SCHEMA_BYTES

MAX_CONSTRAINT_BYTES = MAX_TOOL_SCHEMA_BYTES  # a schema, regex, grammar or choice list, serialised
MAX_ALLOWED_TOKEN_IDS = 1 << 17
_checked: OrderedDict[str, None] = OrderedDict()  # cache keys that parsed (a repeated grammar is not re-parsed)
_CHECKED_MAX = 256
_lock = threading.Lock()


def check(param: str, spec: GrammarSpec, vocab_size: int | None = None) -> GrammarSpec:
    """400 naming `param` unless xgrammar can build the spec's grammar (and token ids are in the vocabulary)."""
    if spec.kind == "token_ids":
        if not spec.token_ids:
            raise APIError(400, f"`{param}` must not be empty", param=param)
        if len(spec.token_ids) > MAX_ALLOWED_TOKEN_IDS:
            raise APIError(400, f"`{param}` lists more than {MAX_ALLOWED_TOKEN_IDS} tokens", param=param)
        if vocab_size is not None and max(spec.token_ids) >= vocab_size:
            raise APIError(400, f"`{param}` names token ids outside the vocabulary (0..{vocab_size - 1})",
                           param=param)
        return spec
    if spec.kind == "choice" and not spec.choices:
        raise APIError(400, f"`{param}` must list at least one choice", param=param)
    if spec.kind in ("regex", "grammar", "structural_tag") and not (spec.text or "").strip():
        raise APIError(400, f"`{param}` must not be empty", param=param)
    key = spec.cache_key()
    if len(key) > MAX_CONSTRAINT_BYTES:
        raise APIError(400, f"`{param}` is larger than {MAX_CONSTRAINT_BYTES} bytes", param=param)
    with _lock:
        if key in _checked:
            _checked.move_to_end(key)
            return spec
    # xgrammar (and the PyTorch it imports: seconds, ~270 MB) loads into the API process with the first
    # constrained request, so a server that never constrains output does not carry it
    from lightllm.engine.grammar import GrammarError, build_grammar

    try:
        build_grammar(spec)
    except GrammarError as exc:
        raise APIError(400, f"invalid `{param}`: {exc}", param=param) from None
    with _lock:
        _checked[key] = None
        if len(_checked) > _CHECKED_MAX:
            _checked.popitem(last=False)
    return spec


def one_constraint(found: list[tuple[str, GrammarSpec | None]]) -> tuple[str, GrammarSpec] | None:
    """The request's only constraint, (field, spec); two or more → 400 naming them."""
    given = [(param, spec) for param, spec in found if spec is not None]
    if len(given) > 1:
        names = [f"`{p}`" for p, _ in given]
        raise APIError(400, f"one output constraint per request: {', '.join(names[:-1])} and {names[-1]} were both "
                            "given", param=given[1][0])
    return given[0] if given else None


# ------------------------------------------------------------------------------------ field readers


def json_schema_of(param: str, value: Any) -> dict[str, Any]:
    """A JSON schema sent as an object or as its JSON text (SGLang and vLLM accept both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"`{param}` is not valid JSON: {exc}", param=param) from None
    if isinstance(value, bool):  # the schemas `true` / `false`
        value = {} if value else {"not": {}}
    if not isinstance(value, dict):
        raise APIError(400, f"`{param}` must be a JSON schema object", param=param)
    import jsonschema

    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as exc:
        raise APIError(400, f"invalid `{param}` schema: {exc.message}", param=param) from None
    return value


def structural_tag_of(param: str, value: Any) -> str:
    """xgrammar's structural tag JSON from the new shape {"type": "structural_tag", "format": {...}} (or its
    bare `format`) or the legacy {"structures": [{"begin", "schema", "end"}], "triggers": [...]} (vLLM's and
    SGLang's response_format)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"`{param}` is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, dict):
        raise APIError(400, f"`{param}` must be a structural tag object", param=param)
    if "format" in value:
        return json.dumps({"type": "structural_tag", "format": value["format"]})
    if "structures" in value or "triggers" in value:
        structures, triggers = value.get("structures"), value.get("triggers")
        if not isinstance(structures, list) or not isinstance(triggers, list) or not structures or not triggers:
            raise APIError(400, f"`{param}` needs non-empty `structures` and `triggers` lists", param=param)
        tags = []
        for i, item in enumerate(structures):
            if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("begin", "end")):
                raise APIError(400, f"`{param}.structures[{i}]` needs string `begin` and `end`", param=param)
            schema = json_schema_of(f"{param}.structures[{i}].schema", item.get("schema", {}))
            tags.append({"type": "tag", "begin": item["begin"], "end": item["end"],
                         "content": {"type": "json_schema", "json_schema": schema}})
        return json.dumps({"type": "structural_tag",
                           "format": {"type": "triggered_tags", "triggers": triggers, "tags": tags}})
    if "type" in value and value["type"] != "structural_tag":  # a bare format object
        return json.dumps({"type": "structural_tag", "format": value})
    raise APIError(400, f"`{param}` needs a `format` (or legacy `structures` and `triggers`)", param=param)


def regex(value: str | None) -> GrammarSpec | None:
    return None if value is None else GrammarSpec("regex", text=value)


def grammar(value: str | None) -> GrammarSpec | None:
    return None if value is None else GrammarSpec("grammar", text=value)


def choice(value: list[str] | None) -> GrammarSpec | None:
    return None if value is None else GrammarSpec("choice", choices=tuple(value))


def token_ids(value: list[int] | None) -> GrammarSpec | None:
    return None if value is None else GrammarSpec("token_ids", token_ids=tuple(sorted(set(value))))


def json_spec(param: str, value: Any, strict: bool = True, any_whitespace: bool = False) -> GrammarSpec | None:
    if value is None:
        return None
    return GrammarSpec.json_schema(json_schema_of(param, value), strict=strict, any_whitespace=any_whitespace)


def structural_tag(param: str, value: Any) -> GrammarSpec | None:
    return None if value is None else GrammarSpec("structural_tag", text=structural_tag_of(param, value))


def vllm_structured_outputs(so: Any, param: str = "structured_outputs") -> list[tuple[str, GrammarSpec | None]]:
    """vLLM's `structured_outputs` object (a StructuredOutputs model) → its constraints by field name."""
    if so.whitespace_pattern is not None:
        raise APIError(400, f"`{param}.whitespace_pattern` is not supported (JSON is compact unless "
                            "disable_any_whitespace is false)", param=f"{param}.whitespace_pattern")
    any_ws = so.disable_any_whitespace is False  # vLLM's default allows whitespace; ours is compact JSON
    strict = so.disable_additional_properties is not False
    return [(f"{param}.json", json_spec(f"{param}.json", so.json_, strict, any_ws)),
            (f"{param}.regex", regex(so.regex)),
            (f"{param}.choice", choice(so.choice)),
            (f"{param}.grammar", grammar(so.grammar)),
            (f"{param}.json_object", GrammarSpec.json_object() if so.json_object else None),
            (f"{param}.structural_tag", structural_tag(f"{param}.structural_tag", so.structural_tag))]


def check_backend(param: str, backend: str | None) -> None:
    """vLLM's `guided_decoding_backend`: this server has xgrammar only ("xgrammar:option" keeps its options)."""
    if backend is not None and backend.split(":", 1)[0] not in ("xgrammar", "auto"):
        raise APIError(400, f"`{param}` {backend!r} is not available: this server decodes with xgrammar",
                       param=param)


def resolve(state: Any, found: list[tuple[str, GrammarSpec | None]]) -> GrammarSpec | None:
    """The request's one constraint, checked (400 naming its field), or None."""
    picked = one_constraint(found)
    if picked is None:
        return None
    param, spec = picked
    if spec.kind != "token_ids" and state.args.output_constraint_mode == "none":
        raise APIError(400, f"`{param}` needs constrained decoding, which this server runs without "
                            "(--output_constraint_mode none)", param=param)
    info = getattr(state.engine, "info", None)
    return check(param, spec, getattr(info, "vocab_size", None))


def response_format(fmt: Any) -> GrammarSpec | None:
    """OpenAI's `response_format` (json_object, json_schema with `strict`) and SGLang's / vLLM's structural_tag."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec.json_object()
    if fmt.type == "structural_tag":
        return structural_tag("response_format", fmt.model_dump(exclude_none=True, include={"format", "structures",
                                                                                          "triggers"}))
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format json_schema needs a `json_schema.schema`", param="response_format")
    # strict false: objects may also carry properties the schema does not name (true / unset: they may not)
    return json_spec("response_format", fmt.json_schema.schema_, strict=fmt.json_schema.strict is not False)


def openai_constraint(state: Any, req: Any, tool_choice: GrammarSpec | None = None) -> GrammarSpec | None:
    """The one constraint of a chat / completions request (ConstraintFields, `response_format` and a forced
    `tool_choice`'s grammar), checked; None when it has none."""
    if req.guided_whitespace_pattern is not None:
        raise APIError(400, "`guided_whitespace_pattern` is not supported (JSON is compact)",
                       param="guided_whitespace_pattern")
    check_backend("guided_decoding_backend", req.guided_decoding_backend)
    found: list[tuple[str, GrammarSpec | None]] = [("tool_choice", tool_choice)]
    if getattr(req, "response_format", None) is not None:
        found.append(("response_format", response_format(req.response_format)))
    if req.structured_outputs is not None:
        found += vllm_structured_outputs(req.structured_outputs)
    found += [("guided_json", json_spec("guided_json", req.guided_json)), ("guided_regex", regex(req.guided_regex)),
              ("guided_choice", choice(req.guided_choice)), ("guided_grammar", grammar(req.guided_grammar)),
              ("regex", regex(req.regex)), ("ebnf", grammar(req.ebnf)),
              ("json_schema", json_spec("json_schema", req.json_schema)),
              ("allowed_token_ids", token_ids(req.allowed_token_ids))]
    return resolve(state, found)
