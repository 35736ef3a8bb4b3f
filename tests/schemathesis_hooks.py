"""Schemathesis hooks for tests/test_openapi_contract.py (loaded through SCHEMATHESIS_HOOKS).

The built-in positive_data_acceptance check knows statuses only, so a schema-valid request that a route
refuses with 400 is either always a failure or never one. Some refusals are right although the request
matches the document, because the rule cannot be written in JSON Schema (it depends on the tokenizer, the
context length, the vocabulary, another field's contents or server state). This check takes the 400s
over: a schema-valid request may be refused only for one of those rules, named by its message; any other
refusal means the document promises what the server does not accept."""

from __future__ import annotations

import re

import schemathesis

# The rules a schema cannot state, each as the message the server gives for it.
UNEXPRESSIBLE_RULES = {
    "prompt + output within the context length (token counts)": r"maximum context length is \d+ tokens",
    "a text that encodes to no tokens": r"the prompt is empty",
    "token ids within the vocabulary": r"outside the vocabulary \(0\.\.\d+\)",
    "a tool choice naming one of the request's tools": r"^Tool '.*' not found in tools list",
    "an id the server holds": r"^Previous response with id '.*' not found",
    "best_of equal to n": r"^best_of other than n is not supported",
    "a setting the model's chat template has": r"is not supported by this model: its chat template",
    "a final message the template can continue": r"^continue_final_message needs the last message",
    "a tool's parameters that are a valid JSON Schema": r"^invalid 'parameters' schema for tool ",
    "tool-call arguments that are a JSON text": r"^tool call .* has arguments that are not valid JSON$",
    "images only for a model that takes them (server state)": r"^model '.*' does not take images \(a text-only",
    "adapter routes only on a server that serves LoRA adapters (server state)": r"^LoRA adapters are off: start ",
    "an adapter folder on the server that fits the model (server state)": r"^cannot load LoRA adapter '.*': ",
    "an adapter name not served yet (server state)": r"^the name '.*' is already served$",
}
# Output-constraint fields (lightllm/server/structured.py): their contents must parse and compile, and one
# constraint per request. Some of these rules could be written in the document (non-empty strings and
# lists, the backend names, one of a set of fields); until the constraint fields say so, they are named
# here one by one, so a refusal of anything else still fails.
CONSTRAINT_RULES = {
    "one output constraint per request": r"^one output constraint per request: ",
    "a constraint that is not empty": r"^`[\w.\[\]]+` must not be empty$|^`[\w.]+` must list at least one choice$",
    "JSON given as a string parses": r"^`[\w.\[\]]+` is not valid JSON: ",
    "a grammar, regex or schema that compiles": r"^invalid `[\w.\[\]]+`( schema)?: ",
    "a JSON schema or structural tag object": r"^`[\w.\[\]]+` must be a (JSON schema|structural tag) object$",
    "a structural tag's shape": r"^`[\w.\[\]]+` needs (a `format`|non-empty `structures`|string `begin`)",
    "response_format json_schema with its schema": r"^response_format json_schema needs a `json_schema.schema`$",
    "the one grammar backend": r"is not available: this server decodes with xgrammar$",
    "no whitespace pattern (JSON is compact)": r"whitespace_pattern` is not supported \(JSON is compact",
    "constraint size limits": r"^`[\w.\[\]]+` (is larger than \d+ bytes|lists more than \d+ tokens)$",
}
# DOTALL: the values a message quotes (tool names, field values) are generated text and may hold newlines
_ALLOWED = re.compile("|".join(f"(?:{pattern})" for pattern in [*UNEXPRESSIBLE_RULES.values(),
                                                                 *CONSTRAINT_RULES.values()]), re.DOTALL)


@schemathesis.check
def refusals_name_an_unexpressible_rule(ctx, response, case):
    """A schema-valid request answered 400 must be refused for a rule the schema cannot state."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"a 400 without the API's error object: {response.text[:300]}") from None
    if not _ALLOWED.search(message):
        raise AssertionError(f"schema-valid request refused: {message}")
    return None
