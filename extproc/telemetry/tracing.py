"""One OpenTelemetry span per AI call, joined to the mesh's trace.

The span is built after the fact from the ``CallRecord``, possibly on another replica than the one
that decided the call, so it carries the record's own start and end times and takes its parent
from the ``traceparent`` / B3 header the sidecar propagated: in Jaeger or Tempo it sits under the
caller's sidecar span like any other egress call.

Naming follows the OTel GenAI conventions: ``"{gen_ai.operation.name} {gen_ai.request.model}"``,
e.g. ``chat fraud_detector``, where the operation is the GenAI name (``chat`` for both the OpenAI
chat completions and the Anthropic messages APIs, ``embeddings``) rather than our endpoint name,
and the model is the one the caller asked for (the policy's logical name), as in the metrics.

Tracing is off unless an exporter is configured; then spans leave through a BatchSpanProcessor,
whose queue drops rather than blocks when the collector is slow.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue

from extproc.telemetry.record import CallRecord, Hop
from extproc.telemetry.redact import Redactor
from extproc.telemetry.telemetry import TRACE_EXPORTERS, ThrottledLog

log = logging.getLogger(__name__)

# Our endpoint operations → gen_ai.operation.name well-known values.
GENAI_OPERATIONS = {"chat_completions": "chat", "messages": "chat", "embeddings": "embeddings",
                    "completions": "text_completion"}
MAX_CONTENT_CHARS = 16384  # keeps one span under typical OTLP message limits
_TRUNCATED = "…[truncated]"
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_B3_TRACE_ID = re.compile(r"[0-9a-f]{16}|[0-9a-f]{32}")


@dataclass(frozen=True, slots=True)
class RemoteParent:
    trace_id: int
    span_id: int
    sampled: bool | None  # None: the caller deferred the decision (B3 without a sampling state)

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"


def parse_traceparent(value: str) -> RemoteParent | None:
    """W3C Trace Context ``traceparent``; None when absent or malformed (a new trace starts)."""
    match = _TRACEPARENT.fullmatch(value.strip().lower())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    # Version ff is forbidden; version 00 has exactly four fields, later versions may add more.
    if version == "ff" or (version == "00" and rest):
        return None
    parent = RemoteParent(int(trace_id, 16), int(span_id, 16), bool(int(flags, 16) & 0x01))
    return parent if parent.trace_id and parent.span_id else None


def parse_b3(value: str) -> RemoteParent | None:
    """Single-header B3: ``{trace_id}-{span_id}[-{sampling}[-{parent_span_id}]]``.

    A lone sampling state ("0", "1", "d") carries no ids, so there is nothing to join: None.
    """
    parts = value.strip().lower().split("-")
    if len(parts) < 2 or len(parts) > 4:
        return None
    trace_id, span_id = parts[0], parts[1]
    if not _B3_TRACE_ID.fullmatch(trace_id) or not _HEX16.fullmatch(span_id):
        return None
    sampled: bool | None = None
    if len(parts) >= 3:
        sampling = parts[2]
        if sampling not in ("0", "1", "d"):
            return None
        sampled = sampling != "0"  # "d" (debug) implies sampled
    if len(parts) == 4 and not _HEX16.fullmatch(parts[3]):
        return None
    # 64-bit B3 trace ids are left-padded to 128 bits, as Zipkin and OTel's B3 propagator do.
    parent = RemoteParent(int(trace_id, 16), int(span_id, 16), sampled)
    return parent if parent.trace_id and parent.span_id else None


def remote_parent(record: CallRecord) -> RemoteParent | None:
    """W3C first (Istio's default propagation), then B3."""
    return (parse_traceparent(record.traceparent) if record.traceparent else None) or (
        parse_b3(record.b3) if record.b3 else None)


def trace_id_of(record: CallRecord) -> str:
    """The call's trace id as 32 lowercase hex digits, or "" when the call carried none."""
    parent = remote_parent(record)
    return parent.trace_id_hex if parent else ""


def build_tracer_provider(exporter: str = "none", endpoint: str | None = None, *, service_name: str = "ai-extproc",
                          sample_ratio: float = 1.0, span_processor: SpanProcessor | None = None,
                          span_exporter: SpanExporter | None = None) -> TracerProvider | None:
    """A provider exporting over OTLP, or None when tracing is off ("none" and nothing injected).

    ``span_processor`` / ``span_exporter`` are added as well (tests: an in-memory exporter).
    The provider is not installed globally: only the TraceSink uses it.
    """
    if exporter not in TRACE_EXPORTERS:
        raise ValueError(f"trace exporter must be one of {', '.join(TRACE_EXPORTERS)}, not {exporter!r}")
    if not 0.0 <= sample_ratio <= 1.0:
        raise ValueError(f"trace sample ratio must be between 0 and 1, not {sample_ratio}")
    processors: list[SpanProcessor] = []
    if span_processor is not None:
        processors.append(span_processor)
    if span_exporter is not None:
        processors.append(BatchSpanProcessor(span_exporter))
    if exporter != "none":
        processors.append(BatchSpanProcessor(_otlp_exporter(exporter, endpoint)))
    if not processors:
        return None
    # A parent's decision wins (the mesh sampled the request, so its AI call is in the trace);
    # the ratio only decides traces that start here.
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}),
                              sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


def _otlp_exporter(exporter: str, endpoint: str | None) -> SpanExporter:
    try:
        from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope  # noqa: F401
    except ImportError as exc:
        # xds-protos ships an old copy of these files; if pip installed it after opentelemetry-proto
        # the exporters cannot load. Say how to fix it rather than fail somewhere inside them.
        raise RuntimeError(
            "the OTLP exporters cannot import opentelemetry.proto (an older copy from xds-protos replaced "
            "opentelemetry-proto's files): run `pip install --no-deps --force-reinstall "
            "opentelemetry-proto==<the installed version>`, as `make setup` and the Dockerfile do") from exc
    # Imported lazily: the gRPC/HTTP exporter stacks are only loaded when tracing is on.
    if exporter == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint)  # http:// endpoints are plaintext, as in-mesh collectors are
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    # An explicit endpoint is used verbatim by the HTTP exporter: give it the traces path the way
    # OTEL_EXPORTER_OTLP_ENDPOINT would, so "http://collector:4318" works as operators expect.
    if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=endpoint)


class TraceSink:
    """Emits each CallRecord as a CLIENT span (plus one child per fallback attempt); no-op without a provider."""

    def __init__(self, provider: TracerProvider | None, *, redactor: Redactor | None = None,
                 capture_content: bool = False, sample_ratio: float = 1.0,
                 max_content_chars: int = MAX_CONTENT_CHARS) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("extproc.telemetry") if provider is not None else None
        self._redactor = redactor or Redactor()
        self._capture_content = capture_content
        self._max_content = max_content_chars
        # B3 callers may defer sampling; the same ratio as for new traces then decides, by trace id,
        # so every replica makes the same choice for one trace.
        self._deferred = TraceIdRatioBased(sample_ratio)
        self._errors = ThrottledLog(log)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def emit(self, record: CallRecord) -> None:
        if self._tracer is None:
            return
        try:
            self._emit(self._tracer, record)
        except Exception:
            self._errors.exception("emit", "could not build the trace span of an AI call")

    def close(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()  # flushes the batch queue

    def _emit(self, tracer: trace.Tracer, record: CallRecord) -> None:
        start_ns = _ns(record.started_at) or time.time_ns()
        end_ns = max(start_ns, _ns(record.ended_at) or time.time_ns())
        span = tracer.start_span(span_name(record), context=self._parent_context(record), kind=SpanKind.CLIENT,
                                 attributes=span_attributes(record), start_time=start_ns)
        if not span.is_recording():
            return  # not sampled: skip the redaction and child spans nobody will see
        if self._capture_content:
            self._add_content_events(span, record, start_ns, end_ns)
        error_type = _error_type(record)
        if error_type:
            span.set_attribute("error.type", error_type)
            description = self._redactor.redact(record.error)[:512] if record.error else error_type
            span.set_status(Status(StatusCode.ERROR, description))
        self._emit_hops(tracer, span, record, start_ns, end_ns)
        span.end(end_time=end_ns)

    def _parent_context(self, record: CallRecord) -> Context | None:
        parent = remote_parent(record)
        if parent is None:
            return None  # a new trace, sampled by ratio
        sampled = parent.sampled
        if sampled is None:
            sampled = self._deferred.should_sample(None, parent.trace_id, "").decision.is_sampled()
        context = SpanContext(parent.trace_id, parent.span_id, is_remote=True,
                              trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT))
        return trace.set_span_in_context(trace.NonRecordingSpan(context))

    def _add_content_events(self, span: trace.Span, record: CallRecord, start_ns: int, end_ns: int) -> None:
        # Records are redacted by their producer already; redacting again here means a producer
        # bug cannot leak a key into the trace backend.
        if record.prompt is not None:
            span.add_event("gen_ai.content.prompt", {"gen_ai.prompt": self._content(record.prompt)},
                           timestamp=start_ns)
        if record.completion is not None:
            span.add_event("gen_ai.content.completion", {"gen_ai.completion": self._content(record.completion)},
                           timestamp=end_ns)

    def _content(self, text: str) -> str:
        text = self._redactor.redact(text)
        return text if len(text) <= self._max_content else text[: self._max_content] + _TRUNCATED

    def _emit_hops(self, tracer: trace.Tracer, span: trace.Span, record: CallRecord, start_ns: int,
                   end_ns: int) -> None:
        if not record.hops:
            return
        context = trace.set_span_in_context(span)
        for index, (hop, hop_start, hop_end) in enumerate(_hop_times(record.hops, start_ns, end_ns), start=1):
            child = tracer.start_span(f"attempt {hop.provider}/{hop.model}", context=context,
                                      kind=SpanKind.INTERNAL, start_time=hop_start, attributes={
                                          "ai.attempt.index": index, "ai.attempt.provider": hop.provider,
                                          "ai.attempt.model": hop.model, "ai.attempt.outcome": hop.outcome})
            if hop.outcome != "ok":
                child.set_status(Status(StatusCode.ERROR, hop.outcome))
            child.end(end_time=hop_end)


def span_name(record: CallRecord) -> str:
    operation = GENAI_OPERATIONS.get(record.operation, record.operation)
    return f"{operation} {record.requested_model}" if record.requested_model else operation


def span_attributes(record: CallRecord) -> dict[str, AttributeValue]:
    """The call span's attributes: GenAI semantic conventions plus our policy effects (``ai.*``).

    Empty strings are left out (the convention is to omit unknown values); token counts appear
    only when the call has usage (forwarded or answered from cache), never as a misleading 0.
    """
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": GENAI_OPERATIONS.get(record.operation, record.operation),
        "gen_ai.provider.name": record.genai_provider,
        "gen_ai.request.model": record.requested_model,
        "gen_ai.response.model": record.response_model,
        "ai.provider": record.provider,  # the policy's name for it
        "ai.service": record.service,
        "ai.namespace": record.namespace,
        "ai.caller_api": record.caller_api,
        "ai.route": record.route,
        "ai.outcome": record.outcome,
        "ai.streamed": record.streamed,
        "ai.cache": record.cache,
        "ai.variant": record.variant,
        "ai.policy_version": record.policy_version,
        # Fallbacks taken: hops lists every attempt once there was a fallback, the last one final.
        "ai.fallback.hops": max(0, len(record.hops) - 1),
        "ai.request_id": record.request_id,
    }
    if record.status:
        attributes["http.response.status_code"] = record.status
    if record.request_id:
        # http.request.header.<name> is a string array by convention (a header may repeat).
        attributes["http.request.header.x-request-id"] = (record.request_id,)
    if record.usage_reported or record.input_tokens or record.output_tokens:
        attributes["gen_ai.usage.input_tokens"] = record.input_tokens
        attributes["gen_ai.usage.output_tokens"] = record.output_tokens
        if record.cached_input_tokens:
            attributes["gen_ai.usage.cache_read.input_tokens"] = record.cached_input_tokens
        attributes["ai.usage.estimated"] = not record.usage_reported
        attributes["ai.cost_usd"] = record.cost_usd
    ttft = record.ttft_s
    if ttft is not None:
        attributes["ai.ttft_ms"] = round(ttft * 1000, 3)
    return {key: value for key, value in attributes.items() if value != ""}


def _error_type(record: CallRecord) -> str:
    """Low-cardinality error.type; "" for a successful call."""
    if record.outcome.startswith("refused:"):
        return record.outcome.removeprefix("refused:") or "refused"
    if record.outcome == "cut":
        return "cut"
    if record.status >= 400:
        return str(record.status)
    if record.outcome == "error":
        return "error"
    return ""


def _hop_times(hops: Sequence[Hop], call_start: int, call_end: int) -> list[tuple[Hop, int, int]]:
    """Each attempt runs from its start to the next attempt's start (the last: to the call's end).

    Unknown starts (0) fall back to the previous attempt's end; an attempt whose end is unknown
    gets zero length rather than a made-up duration.
    """
    timed: list[tuple[Hop, int, int]] = []
    previous_end = call_start
    for index, hop in enumerate(hops):
        start = _ns(hop.started_at) or previous_end
        is_last = index + 1 == len(hops)
        end = max(start, call_end if is_last else _ns(hops[index + 1].started_at) or start)
        timed.append((hop, start, end))
        previous_end = end
    return timed


def _ns(epoch_seconds: float) -> int:
    return round(epoch_seconds * 1e9) if epoch_seconds > 0 else 0
