"""Requests through the canonical form: any caller's format to any provider's, in two steps.

The canonical form is the Anthropic Messages shape (content blocks, ``tool_use``/``tool_result``,
a system prompt apart, ``max_tokens`` always set): it is the richest of the formats we read and the
closest to Bedrock Converse and Gemini. Each format has one translator to it and one from it, never
one per pair:

========================  ====================================  ===================================
format                    to canonical (request)                from canonical (request)
========================  ====================================  ===================================
``openai`` (chat)         ``openai_to_anthropic.request``       ``anthropic_to_openai.request``
``openai_responses``      ``responses_to_anthropic.request``    (never a provider format here)
``anthropic``             itself                                itself
``bedrock`` (Converse)    ``bedrock.canonical_request``         ``bedrock.request``
``gemini``                ``gemini.canonical_request``          ``gemini.request``
========================  ====================================  ===================================

A format is also read *to* the canonical form on a fallback attempt: Envoy re-sends the body the failed
hop was sent, so a call that was sent to Bedrock reaches the next hop as a Converse body.

The response side mirrors this (``extproc.translate.response``): the provider's answer is decoded to
the canonical form, then encoded into the caller's.
"""

from __future__ import annotations

from typing import Any

from extproc.base.apis import BEDROCK_FORMAT, GEMINI_FORMAT, RESPONSES_FORMAT
from extproc.translate import (
    TranslationError,
    anthropic_to_openai,
    bedrock,
    gemini,
    openai_to_anthropic,
    responses_to_anthropic,
)

CANONICAL = "anthropic"
# Formats whose model is named in the request path, not in the body.
MODEL_IN_PATH = frozenset({BEDROCK_FORMAT, GEMINI_FORMAT})


def to_provider(data: dict[str, Any], body_format: str, provider_format: str, *, model: str, stream: bool,
                default_max_tokens: int, provider_api: str = "") -> dict[str, Any]:
    """``data`` (in ``body_format``) as ``provider_format`` asks it, for ``model``.

    ``stream`` is the call's streaming flag, for bodies that do not carry one (Converse and Gemini say it
    in their path). Raises :class:`TranslationError` when a step cannot express the request.
    """
    if provider_format == RESPONSES_FORMAT:
        raise TranslationError("only an OpenAI Responses caller's own request is sent to a Responses API")
    canonical = to_canonical(data, body_format, model=model, stream=stream, default_max_tokens=default_max_tokens)
    return from_canonical(canonical, provider_format, model=model, vertex=provider_api == "vertex")


def to_canonical(data: dict[str, Any], body_format: str, *, model: str, stream: bool,
                 default_max_tokens: int) -> dict[str, Any]:
    if body_format == CANONICAL:
        return {**data, "model": model}
    if body_format == "openai":
        return openai_to_anthropic.request(data, model=model, default_max_tokens=default_max_tokens)
    if body_format == RESPONSES_FORMAT:
        return responses_to_anthropic.request(data, model=model, default_max_tokens=default_max_tokens)
    if body_format == BEDROCK_FORMAT:
        return bedrock.canonical_request(data, model=model, stream=stream, default_max_tokens=default_max_tokens)
    if body_format == GEMINI_FORMAT:
        return gemini.canonical_request(data, model=model, stream=stream, default_max_tokens=default_max_tokens)
    raise TranslationError(f"a {body_format} request is not translated")


def from_canonical(canonical: dict[str, Any], provider_format: str, *, model: str, vertex: bool = False
                   ) -> dict[str, Any]:
    """``vertex``: the Gemini body goes to Vertex AI, which takes no function-call ids."""
    if provider_format == CANONICAL:
        return canonical
    if provider_format == "openai":
        return anthropic_to_openai.request(canonical, model=model)
    if provider_format == BEDROCK_FORMAT:
        return bedrock.request(canonical, model=model)
    if provider_format == GEMINI_FORMAT:
        return gemini.request(canonical, model=model, vertex=vertex)
    raise TranslationError(f"no request is translated to the {provider_format} format")
