"""The one way the server makes ids: request ids for the engine and the ids of API objects.

The prefix carries its separator, since the APIs differ (`chatcmpl-…` in OpenAI chat, `resp_…` in the
Responses API, `msg_…` in Anthropic's): `new_id("chatcmpl-")`."""

from __future__ import annotations

import uuid


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex
