"""A structured access log: one JSON object per AI call, with the ids that join it to its trace.

Envoy's own access log sees bytes and statuses; this one sees what the policy did (route, variant,
fallback hops, cache, tokens, cost), so ``grep request_id`` or a Loki query by ``trace_id`` finds
the whole story of a call. Lines go to the ``extproc.access`` logger (the message is the JSON
object; the handler decides any prefix) or straight to a text stream such as stdout or a file.
"""

from __future__ import annotations

import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from extproc.telemetry.record import CallRecord
from extproc.telemetry.redact import Redactor
from extproc.telemetry.telemetry import ThrottledLog
from extproc.telemetry.tracing import MAX_CONTENT_CHARS, trace_id_of

ACCESS_LOGGER = "extproc.access"
_TRUNCATED = "…[truncated]"

log = logging.getLogger(__name__)


class AccessLogSink:
    def __init__(self, stream: TextIO | None = None, *, logger: logging.Logger | None = None,
                 redactor: Redactor | None = None, capture_content: bool = False,
                 max_content_chars: int = MAX_CONTENT_CHARS, owns_stream: bool = False) -> None:
        self._stream = stream
        self._owns_stream = owns_stream
        self._logger = logger or logging.getLogger(ACCESS_LOGGER)
        self._redactor = redactor or Redactor()
        self._capture_content = capture_content
        self._max_content = max_content_chars
        # Whole lines from concurrent writers (to-thread settlement, the gRPC loop) never interleave.
        self._lock = threading.Lock()
        self._errors = ThrottledLog(log)

    @classmethod
    def open(cls, path: str, **options: Any) -> AccessLogSink:
        """``-`` for stdout, else a file appended to (line-buffered, so a crash loses at most one line)."""
        if path == "-":
            return cls(sys.stdout, **options)
        return cls(open(path, "a", encoding="utf-8", buffering=1), owns_stream=True, **options)

    def emit(self, record: CallRecord) -> None:
        try:
            if self._stream is None and not self._logger.isEnabledFor(logging.INFO):
                return  # nobody would see the line: skip building it
            line = orjson.dumps(self.entry(record)).decode()
            if self._stream is None:
                self._logger.info(line)
                return
            with self._lock:
                self._stream.write(line + "\n")
        except Exception:
            self._errors.exception("emit", "could not write an access log line")

    def close(self) -> None:
        if self._stream is not None:
            with self._lock:
                if self._owns_stream:
                    self._stream.close()
                else:
                    self._stream.flush()

    def entry(self, record: CallRecord) -> dict[str, Any]:
        """The log object of one call; field names match the CallRecord so logs and code read alike."""
        entry: dict[str, Any] = {
            "start_time": _iso(record.started_at),
            "service": record.service,
            "namespace": record.namespace,
            "operation": record.operation,
            "caller_api": record.caller_api,
            "requested_model": record.requested_model,
            "route": record.route,
            "provider": record.provider,
            "response_model": record.response_model,
            "status": record.status,
            "outcome": record.outcome,
            "streamed": record.streamed,
            "input_tokens": record.input_tokens,
            "output_tokens": record.output_tokens,
            "cached_input_tokens": record.cached_input_tokens,
            "usage_reported": record.usage_reported,
            "cost_usd": record.cost_usd,
            "duration_ms": round(record.duration_s * 1000, 3),
            "ttft_ms": None if record.ttft_s is None else round(record.ttft_s * 1000, 3),
            "cache": record.cache,
            "variant": record.variant,
            "hops": [{"provider": h.provider, "model": h.model, "outcome": h.outcome} for h in record.hops],
            "policy_version": record.policy_version,
            "request_id": record.request_id,
            "trace_id": trace_id_of(record),
            "error": self._redactor.redact(record.error) if record.error else "",
        }
        # Producers redact content already; doing it again here means one producer bug cannot put
        # a key into the log pipeline.
        if self._capture_content:
            if record.prompt is not None:
                entry["prompt"] = self._content(record.prompt)
            if record.completion is not None:
                entry["completion"] = self._content(record.completion)
        return entry

    def _content(self, text: str) -> str:
        text = self._redactor.redact(text)
        return text if len(text) <= self._max_content else text[: self._max_content] + _TRUNCATED


def _iso(epoch_seconds: float) -> str | None:
    if epoch_seconds <= 0:
        return None
    return datetime.fromtimestamp(epoch_seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
