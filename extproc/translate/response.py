"""A provider's response, rewritten chunk by chunk into the caller's API format.

Streams are translated event by event as they arrive (never held back); a JSON body, success or
error, is only complete at its end, so it is collected and translated once.

Nothing a provider sends makes ``feed`` or ``finish`` raise. A JSON answer that cannot be translated
becomes an error body in the caller's format (OpenAI: ``server_error`` with code
``provider_response_untranslatable``; Anthropic: ``api_error``); a stream that cannot be translated
further ends with an error event in the caller's format after the events already sent. The cause is
logged once, at warning level, and ``failed`` is then true. A provider's own error (an error status,
or an error event mid-stream) is not a failure of translation: it is passed on in the caller's format.

A translated stream is parsed once: given ``usage`` (the usage tracker reading the same provider
stream), the translator hands it every event it parses, so the tracker reads no bytes of its own.

One translator is one step to or from the canonical form (the Anthropic Messages shape; see
``extproc.translate.canonical``). Encoding the canonical form for a caller, the caller's format picks
the module (each is named for the caller it serves): ``"openai"`` (chat completions) →
``openai_to_anthropic``, ``"openai_responses"`` (the Responses API) → ``responses_to_anthropic``.
Decoding a provider's answer into the canonical form (the caller's format is then ``"anthropic"``), the
provider's format picks it: ``"openai"`` → ``anthropic_to_openai``, ``"bedrock"`` → ``bedrock``,
``"gemini"`` → ``gemini``. A call whose caller and provider are both not Anthropic takes both steps, the
decoder's output fed to the encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol, TypeVar

import orjson

from extproc.translate import (
    TranslationError,
    anthropic_to_openai,
    bedrock,
    gemini,
    openai_to_anthropic,
    responses_to_anthropic,
)
from extproc.translate.sse import SseEvent, SseParser

log = logging.getLogger(__name__)


_T = TypeVar("_T")


class _Stream(Protocol):
    failure: str | None

    def feed(self, chunk: bytes) -> bytes: ...
    def translate(self, events: list[SseEvent]) -> bytes: ...
    def finish(self) -> bytes: ...


class EventReader(Protocol):
    """Another reader of the provider's stream (``extproc.core.usage.UsageTracker``)."""

    def event_reader(self) -> Callable[[SseEvent], object] | None:
        """What takes each event from now on, the reader no longer parsing bytes itself; None: it keeps parsing."""
        ...


_ENCODERS: dict[str, ModuleType] = {  # the canonical form → the caller's format, by the caller's format
    "openai": openai_to_anthropic,
    responses_to_anthropic.CALLER_FORMAT: responses_to_anthropic,
}
_DECODERS: dict[str, ModuleType] = {  # the provider's format → the canonical form, by the provider's format
    "openai": anthropic_to_openai,
    "bedrock": bedrock,
    "gemini": gemini,
}


def module_for(caller_api: str, provider_format: str) -> ModuleType:
    """The one step between the two formats, one of which is the canonical ``"anthropic"``."""
    if caller_api == "anthropic":
        return _DECODERS.get(provider_format, anthropic_to_openai)
    return _ENCODERS[caller_api]


class ResponseTranslator:
    def __init__(self, caller_api: str, status: int, streaming: bool, *, requested_model: str,
                 include_usage: bool = False, echo: dict[str, Any] | None = None,
                 usage: EventReader | None = None, provider_format: str = "openai") -> None:
        """``caller_api`` is the caller's format: ``"openai"``, ``"openai_responses"`` or ``"anthropic"``;
        ``provider_format``, read only when the caller's is ``"anthropic"``, the format decoded from.

        ``include_usage`` only matters to chat-completions callers; ``echo`` only to Responses callers
        (``responses_to_anthropic.echo(request_body)``: the settings their response object repeats).
        ``usage``, the usage tracker of the same response (before any byte was fed to it), gets the events
        of a translated stream from this translator's parser, including one left unterminated at the end
        (which is not translated: a client drops it); a JSON body it keeps reading itself.
        """
        # Each module is named for the caller it serves: openai_to_anthropic serves OpenAI callers.
        self._caller_api = caller_api
        self._module: ModuleType = module_for(caller_api, provider_format)
        self._status = status
        self._model = requested_model
        self._echo = echo
        self._body: bytearray | None = None
        self._stream: _Stream | None = None
        self._stream_over = False  # the stream translator failed unexpectedly: nothing more goes out
        self._parser: SseParser | None = None  # parses for the translator and the reader, when there is one
        self._reader: Callable[[SseEvent], object] | None = None
        self.failure: str | None = None
        if streaming and 200 <= status < 300:
            if self._module is openai_to_anthropic:
                self._stream = openai_to_anthropic.StreamTranslator(requested_model=requested_model,
                                                                    include_usage=include_usage)
            elif self._module is responses_to_anthropic:
                self._stream = responses_to_anthropic.StreamTranslator(requested_model=requested_model, echo=echo)
            else:
                self._stream = self._module.StreamTranslator(requested_model=requested_model)
            self._reader = usage.event_reader() if usage is not None else None
            if self._reader is not None:
                self._parser = SseParser()
        else:
            self._body = bytearray()

    @property
    def failed(self) -> bool:
        """True once the provider's answer could not be translated (and the caller got an error instead)."""
        return self.failure is not None

    def feed(self, chunk: bytes) -> bytes:
        stream = self._stream
        if stream is not None:
            reader, parser = self._reader, self._parser
            if reader is None or parser is None:
                return self._guarded(stream.feed, chunk)
            events = parser.feed(chunk)
            for event in events:  # first, and even once the translation is over: usage is read to the end
                reader(event)
            return self._guarded(stream.translate, events)
        if self._body is not None:  # None once finished: nothing follows a JSON answer
            self._body += chunk
        return b""

    def finish(self) -> bytes:
        """The rest: a cut stream gets an error event in the caller's format, never a silent end.

        Only the first call answers; a second one adds nothing.
        """
        stream = self._stream
        if stream is not None:
            reader, parser = self._reader, self._parser
            if reader is not None and parser is not None:
                self._reader = None
                tail = parser.finish()
                if tail is not None and tail.data is not None:
                    reader(tail)
            return self._guarded(lambda _: stream.finish(), b"")
        if self._body is None:
            return b""
        body, self._body = bytes(self._body), None
        try:
            if not 200 <= self._status < 300:
                error: bytes = self._module.error(self._status, body)
                return error
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                return self._untranslatable_body(f"the answer is not valid JSON ({exc})")
            if self._module is responses_to_anthropic:
                return orjson.dumps(responses_to_anthropic.response(parsed, requested_model=self._model,
                                                                    echo=self._echo))
            return orjson.dumps(self._module.response(parsed, requested_model=self._model))
        except TranslationError as exc:
            return self._untranslatable_body(exc.message)
        except Exception as exc:  # a bug here must not break the response; the caller gets a clean error
            return self._untranslatable_body(f"unexpected {type(exc).__name__}: {exc}", exc)

    def abandon(self, cause: str) -> bytes:
        """The caller's own "untranslatable" ending, when an earlier step (the decoder of a two-step
        translation) could not read the provider's answer: what that step made of it is not translated as
        if it were the answer. Only the first call answers."""
        if self.failure is not None or self._stream_over:
            return b""
        if self._stream is not None:
            self._stream_over = True
            self._fail(cause)
            return self._last_event()
        self._body = None
        return self._untranslatable_body(cause)

    def _guarded(self, step: Callable[[_T], bytes], arg: _T) -> bytes:
        """One step of the stream translator; its failure, if it just failed, is logged once."""
        if self._stream_over:
            return b""
        try:
            out = step(arg)
        except Exception as exc:  # a bug here must not break the stream; the caller gets a clean end
            self._stream_over = True
            self._fail(f"unexpected {type(exc).__name__}: {exc}", exc)
            return self._last_event()
        failure = self._stream.failure if self._stream is not None else None
        if failure is not None:
            self._fail(failure)
        return out

    def _last_event(self) -> bytes:
        """The untranslatable end of a stream whose translator just failed unexpectedly.

        A Responses stream's events are numbered, so its translator's own ending is preferred (it keeps
        the numbering and sends response.failed too); the module's plain error event is the fallback.
        """
        stream = self._stream
        if isinstance(stream, responses_to_anthropic.StreamTranslator):
            try:
                # Empty if the translator thought it had ended: the caller still needs an end it can see.
                return stream.untranslatable_events() or responses_to_anthropic.untranslatable_event(
                    stream.sequence_number)
            except Exception:  # the translator is broken: end with what needs no state but the number
                try:
                    return responses_to_anthropic.untranslatable_event(stream.sequence_number)
                except Exception:
                    return responses_to_anthropic.untranslatable_event()
        event: bytes = self._module.untranslatable_event()
        return event

    def _untranslatable_body(self, cause: str, exc: Exception | None = None) -> bytes:
        self._fail(cause, exc)
        body: bytes = self._module.untranslatable_body()
        return body

    def _fail(self, cause: str, exc: Exception | None = None) -> None:
        if self.failure is not None:
            return
        self.failure = cause
        kind = "stream" if self._stream is not None else f"HTTP {self._status} body"
        log.warning("the provider's %s could not be translated into the caller's %s API (model %s): %s", kind,
                    self._caller_api, self._model, cause, exc_info=exc)
