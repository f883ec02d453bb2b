"""Translation between the OpenAI APIs (Chat Completions, Responses) and Anthropic Messages, JSON and SSE.

A cross-provider fallback must be invisible to a client of either official SDK, so each direction has
a request translator (client format → provider format) and the matching response, error and stream
translators (provider format → client format):

- ``openai_to_anthropic``: an OpenAI-format caller served by an Anthropic provider;
- ``anthropic_to_openai``: an Anthropic-format caller served by an OpenAI provider;
- ``responses_to_anthropic``: an OpenAI Responses API caller (``POST /v1/responses``, caller format
  ``"openai_responses"``) served by an Anthropic provider.

Everything here is pure (no I/O); anything one side cannot express without changing what the caller
asked for raises :class:`TranslationError`, which the caller turns into a 400 in the client's format.
"""

from __future__ import annotations

__all__ = ["TranslationError"]


class TranslationError(ValueError):
    """The request (or response) uses something the other API cannot express without changing its meaning."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
