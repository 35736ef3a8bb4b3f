"""Anthropic Messages API: request models, translation to chat completions, routes and SSE events."""
