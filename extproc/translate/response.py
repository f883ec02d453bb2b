"""A provider's response, rewritten chunk by chunk into the caller's API format.

Streams are translated event by event as they arrive (never held back); a JSON body, success or
error, is only complete at its end, so it is collected and translated once.

Nothing a provider sends makes ``feed`` or ``finish`` raise. A JSON answer that cannot be translated
becomes an error body in the caller's format (OpenAI: ``server_error`` with code
``provider_response_untranslatable``; Anthropic: ``api_error``); a stream that cannot be translated
further ends with an error event in the caller's format after the events already sent. The cause is
logged once, at warning level, and ``failed`` is then true. A provider's own error (an error status,
or an error event mid-stream) is not a failure of translation: it is passed on in the caller's format.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType
from typing import Protocol

import orjson

from extproc.translate import TranslationError, anthropic_to_openai, openai_to_anthropic

log = logging.getLogger(__name__)


class _Stream(Protocol):
    failure: str | None

    def feed(self, chunk: bytes) -> bytes: ...
    def finish(self) -> bytes: ...


class ResponseTranslator:
    def __init__(self, caller_api: str, status: int, streaming: bool, *, requested_model: str,
                 include_usage: bool) -> None:
        # Each module is named for the caller it serves: openai_to_anthropic serves OpenAI callers.
        self._caller_api = caller_api
        self._module: ModuleType = openai_to_anthropic if caller_api == "openai" else anthropic_to_openai
        self._status = status
        self._model = requested_model
        self._body: bytearray | None = None
        self._stream: _Stream | None = None
        self._stream_over = False  # the stream translator failed unexpectedly: nothing more goes out
        self.failure: str | None = None
        if streaming and 200 <= status < 300:
            if caller_api == "openai":
                self._stream = openai_to_anthropic.StreamTranslator(requested_model=requested_model,
                                                                    include_usage=include_usage)
            else:
                self._stream = anthropic_to_openai.StreamTranslator(requested_model=requested_model)
        else:
            self._body = bytearray()

    @property
    def failed(self) -> bool:
        """True once the provider's answer could not be translated (and the caller got an error instead)."""
        return self.failure is not None

    def feed(self, chunk: bytes) -> bytes:
        stream = self._stream
        if stream is not None:
            return self._guarded(stream.feed, chunk)
        if self._body is not None:  # None once finished: nothing follows a JSON answer
            self._body += chunk
        return b""

    def finish(self) -> bytes:
        """The rest: a cut stream gets an error event in the caller's format, never a silent end.

        Only the first call answers; a second one adds nothing.
        """
        stream = self._stream
        if stream is not None:
            return self._guarded(lambda _: stream.finish(), b"")
        if self._body is None:
            return b""
        body, self._body = bytes(self._body), None
        try:
            if not 200 <= self._status < 300:
                return self._module.error(self._status, body)
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                return self._untranslatable_body(f"the answer is not valid JSON ({exc})")
            return orjson.dumps(self._module.response(parsed, requested_model=self._model))
        except TranslationError as exc:
            return self._untranslatable_body(exc.message)
        except Exception as exc:  # a bug here must not break the response; the caller gets a clean error
            return self._untranslatable_body(f"unexpected {type(exc).__name__}: {exc}", exc)

    def _guarded(self, step: Callable[[bytes], bytes], chunk: bytes) -> bytes:
        """One step of the stream translator; its failure, if it just failed, is logged once."""
        if self._stream_over:
            return b""
        try:
            out = step(chunk)
        except Exception as exc:  # a bug here must not break the stream; the caller gets a clean end
            self._stream_over = True
            self._fail(f"unexpected {type(exc).__name__}: {exc}", exc)
            return self._module.untranslatable_event()
        failure = self._stream.failure if self._stream is not None else None
        if failure is not None:
            self._fail(failure)
        return out

    def _untranslatable_body(self, cause: str, exc: Exception | None = None) -> bytes:
        self._fail(cause, exc)
        return self._module.untranslatable_body()

    def _fail(self, cause: str, exc: Exception | None = None) -> None:
        if self.failure is not None:
            return
        self.failure = cause
        kind = "stream" if self._stream is not None else f"HTTP {self._status} body"
        log.warning("the provider's %s could not be translated into the caller's %s API (model %s): %s", kind,
                    self._caller_api, self._model, cause, exc_info=exc)
