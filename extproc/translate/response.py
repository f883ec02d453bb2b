"""A provider's response, rewritten chunk by chunk into the caller's API format.

Streams are translated event by event as they arrive (never held back); a JSON body, success or
error, is only complete at its end, so it is collected and translated once.
"""

from __future__ import annotations

from typing import Protocol

import orjson

from extproc.translate import TranslationError, anthropic_to_openai, openai_to_anthropic


class _Stream(Protocol):
    def feed(self, chunk: bytes) -> bytes: ...
    def finish(self) -> bytes: ...


class ResponseTranslator:
    def __init__(self, caller_api: str, status: int, streaming: bool, *, requested_model: str,
                 include_usage: bool) -> None:
        # Each module is named for the caller it serves: openai_to_anthropic serves OpenAI callers.
        self._module = openai_to_anthropic if caller_api == "openai" else anthropic_to_openai
        self._status = status
        self._model = requested_model
        self._body: bytearray | None = None
        self._stream: _Stream | None = None
        if streaming and 200 <= status < 300:
            if caller_api == "openai":
                self._stream = openai_to_anthropic.StreamTranslator(requested_model=requested_model,
                                                                    include_usage=include_usage)
            else:
                self._stream = anthropic_to_openai.StreamTranslator(requested_model=requested_model)
        else:
            self._body = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        if self._stream is not None:
            return self._stream.feed(chunk)
        assert self._body is not None
        self._body += chunk
        return b""

    def finish(self) -> bytes:
        """The rest: a cut stream gets an error event in the caller's format, never a silent end."""
        if self._stream is not None:
            return self._stream.finish()
        assert self._body is not None
        body = bytes(self._body)
        if not 200 <= self._status < 300:
            return self._module.error(self._status, body)
        try:
            parsed = orjson.loads(body)
            if not isinstance(parsed, dict):
                raise TranslationError("the provider's response is not a JSON object")
            return orjson.dumps(self._module.response(parsed, requested_model=self._model))
        except (orjson.JSONDecodeError, TranslationError, KeyError, TypeError, ValueError):
            return self._module.error(502, b'{"error": {"message": "The upstream provider sent an unreadable '
                                           b'response."}}')
