"""POST /v1/responses (OpenAI's Responses API), plain and streamed, on top of the chat path.

A request is translated into a ChatCompletionRequest (input items → messages, flat function tools →
chat tools, `text.format` → response_format, `reasoning.effort` → reasoning_effort), prepared by
`prepare_chat`, and its output read back as Responses output items: a `reasoning` item, a `message`
item, one `function_call` item per call. Streams translate the chat stream parser's deltas into the
typed events the SDK's `responses.stream` accumulates. `store` keeps the last responses in memory so
that `previous_response_id` continues a conversation.
"""

from lightllm.server.openai.responses.routes import router

__all__ = ["router"]
