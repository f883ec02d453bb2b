"""Fan-out of finished calls to every telemetry sink (metrics, access log, traces, usage events).

The AI call has already been answered when a record is emitted, so telemetry must never cost the
caller anything: each sink is isolated, and a broken one is logged (rate-limited, so a dead
collector cannot flood the logs) and skipped while the others still receive the record.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from extproc.telemetry.record import CallRecord, CallSink, CallTelemetry
from extproc.telemetry.redact import Redactor

log = logging.getLogger(__name__)

TRACE_EXPORTERS = ("none", "otlp-grpc", "otlp-http")


class ThrottledLog:
    """Logs a recurring failure once, then at most once per ``interval`` with a suppressed count."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._logger = logger
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def exception(self, key: str, message: str) -> None:
        """Call from an ``except`` block; never raises, whatever the logging setup does."""
        try:
            now = time.monotonic()
            with self._lock:
                last = self._last.get(key)
                if last is not None and now - last < self._interval:
                    self._suppressed[key] = self._suppressed.get(key, 0) + 1
                    return
                self._last[key] = now
                suppressed = self._suppressed.pop(key, 0)
            suffix = f" ({suppressed} similar failures suppressed)" if suppressed else ""
            self._logger.warning("%s%s", message, suffix, exc_info=True)
        except Exception:
            pass  # logging must not turn a telemetry hiccup into a failed call


@dataclass(frozen=True, slots=True)
class TelemetryOptions:
    access_log: bool = False
    access_log_path: str | None = None  # None: the "extproc.access" logger; "-": stdout; else a file (appended)
    trace_exporter: str = "none"  # "none" | "otlp-grpc" | "otlp-http"
    trace_endpoint: str | None = None  # None: the exporter's default / OTEL_EXPORTER_OTLP_* environment
    trace_sample_ratio: float = 1.0  # for traces the mesh did not already decide on
    capture_content: bool = False  # prompts and completions in access log and span events (redacted)
    redact_patterns: tuple[str, ...] = ()
    redact_headers: tuple[str, ...] = ()  # extra header names (regexes) to mask
    redact_emails: bool = False
    service_name: str = "ai-extproc"  # OTel resource service.name

    def __post_init__(self) -> None:
        # Checked here so that a bad flag fails at startup, not on the first call.
        if self.trace_exporter not in TRACE_EXPORTERS:
            raise ValueError(f"trace exporter must be one of {', '.join(TRACE_EXPORTERS)}, "
                             f"not {self.trace_exporter!r}")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ValueError(f"trace sample ratio must be between 0 and 1, not {self.trace_sample_ratio}")


class Telemetry:
    """The ``CallTelemetry``: a ``CallSink`` that hands each record to every configured sink, isolating
    their failures."""

    def __init__(self, sinks: Iterable[CallSink] = (), *, redactor: Redactor | None = None,
                 capture_content: bool = False) -> None:
        self.sinks: list[CallSink] = list(sinks)
        # Producers that fill CallRecord.prompt/completion use these, so content is redacted at the
        # source and captured only when the operator asked for it.
        self.redactor = redactor or Redactor()
        self.capture_content = capture_content
        self._errors = ThrottledLog(log)

    def emit(self, record: CallRecord) -> None:
        for sink in self.sinks:
            try:
                sink.emit(record)
            except Exception:
                self._errors.exception(type(sink).__name__, f"telemetry sink {type(sink).__name__} failed")

    def close(self) -> None:
        """Flush and release what sinks hold (trace batches, log files); for shutdown, may block briefly."""
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is None or inspect.iscoroutinefunction(close):
                continue  # asynchronous sinks (usage events) are closed by their owner, on the event loop
            try:
                close()
            except Exception:
                self._errors.exception(f"close:{type(sink).__name__}", f"closing {type(sink).__name__} failed")


if TYPE_CHECKING:
    _conforms: type[CallTelemetry] = Telemetry  # mypy: Telemetry provides everything CallTelemetry declares


def build_telemetry(options: TelemetryOptions, extra_sinks: Iterable[CallSink] = ()) -> Telemetry:
    """The sinks the options ask for, after ``extra_sinks`` (metrics, usage events) in that order."""
    # Imported here: the sinks use ThrottledLog from this module.
    from extproc.telemetry.access_log import ACCESS_LOGGER, AccessLogSink
    from extproc.telemetry.tracing import TraceSink, build_tracer_provider

    redactor = Redactor(options.redact_patterns, header_names=options.redact_headers, emails=options.redact_emails)
    sinks: list[CallSink] = list(extra_sinks)
    if options.access_log:
        content = options.capture_content
        if options.access_log_path is None:
            # Turning the access log on is explicit: it should not vanish under --log-level WARNING.
            logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
            sinks.append(AccessLogSink(redactor=redactor, capture_content=content))
        else:
            sinks.append(AccessLogSink.open(options.access_log_path, redactor=redactor, capture_content=content))
    provider = build_tracer_provider(options.trace_exporter, options.trace_endpoint,
                                     service_name=options.service_name, sample_ratio=options.trace_sample_ratio)
    if provider is not None:
        sinks.append(TraceSink(provider, redactor=redactor, capture_content=options.capture_content,
                               sample_ratio=options.trace_sample_ratio))
    return Telemetry(sinks, redactor=redactor, capture_content=options.capture_content)
