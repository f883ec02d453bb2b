"""Telemetry sinks from one CallRecord: spans that join the mesh's trace, the JSON access log,
redaction of every free-text field, and the fan-out that keeps a broken sink from hurting the others.

Spans are captured with the SDK's in-memory exporter; one test exports over real OTLP/HTTP to a
collector stand-in on 127.0.0.1 to prove the batch path works end to end.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from extproc.base.apis import Api, Endpoint
from extproc.core.breaker import Breakers
from extproc.core.identity import Caller
from extproc.core.messages import Forward, HttpRequest, LocalReply
from extproc.core.records import reply_record
from extproc.core.settlement import SettleInfo, Settlement
from extproc.events.schema import event_to_dict, to_event
from extproc.telemetry.access_log import AccessLogSink
from extproc.telemetry.metrics import CallLabels, genai_provider
from extproc.telemetry.record import CallRecord, Hop
from extproc.telemetry.redact import REDACTED, RedactionPatternError, Redactor
from extproc.telemetry.telemetry import Telemetry, TelemetryOptions, build_telemetry
from extproc.telemetry.tracing import (
    TraceSink,
    build_tracer_provider,
    parse_b3,
    parse_traceparent,
    span_attributes,
    trace_id_of,
)
from tests.unit.resilience_support import breaker_settings, load, make_decider

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"
T0 = 1_767_225_600.25  # 2026-01-01T00:00:00.250Z

RECORD = CallRecord(
    service="order-service", namespace="shop", operation="chat_completions", caller_api="openai",
    requested_model="fraud_detector", route="fraud_detector", provider="claude", response_model="claude-3",
    status=200, outcome="ok", streamed=True, input_tokens=120, output_tokens=48, cached_input_tokens=20,
    usage_reported=True, cost_usd=0.0042, started_at=T0, ended_at=T0 + 1.5, first_byte_at=T0 + 0.25,
    cache="miss", variant="control", policy_version="v7", request_id="req-1", traceparent=TRACEPARENT,
    hops=(Hop("openai", "gpt-4", "status_503", T0 + 0.01), Hop("claude", "claude-3", "ok", T0 + 0.5)),
    genai_provider="anthropic",
)

# Secrets of every shape the redactor must catch, and one operator-configured pattern.
OPENAI_KEY = "sk-proj-A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
ANTHROPIC_KEY = "sk-ant-api03-Zz9Yy8Xx7Ww6Vv5Uu4Tt3"
BEARER = "eyJhbGciOiJIUzI1NiJ9.payload.signature"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
X_API_KEY = "plain-looking-but-secret-value"
CUSTOMER = "cust-884213"
SECRETS = (OPENAI_KEY, ANTHROPIC_KEY, BEARER, AWS_KEY, X_API_KEY, CUSTOMER)
LEAKY = f"use {OPENAI_KEY} or {ANTHROPIC_KEY}; Authorization: Bearer {BEARER}; aws {AWS_KEY}; " \
        f"x-api-key: {X_API_KEY}; customer {CUSTOMER}"


def ns(seconds: float) -> int:
    return round(seconds * 1e9)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def sink(exporter: InMemorySpanExporter) -> Iterator[TraceSink]:
    provider = build_tracer_provider(span_processor=SimpleSpanProcessor(exporter))
    trace_sink = TraceSink(provider)
    yield trace_sink
    trace_sink.close()


def call_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    [span] = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT]
    return span


# --- traces -----------------------------------------------------------------------------------


def test_span_joins_the_w3c_trace_with_the_records_own_times(sink: TraceSink,
                                                               exporter: InMemorySpanExporter) -> None:
    sink.emit(RECORD)
    span = call_span(exporter)
    assert span.name == "chat fraud_detector"
    assert span.kind is SpanKind.CLIENT
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent is not None and span.parent.span_id == int(PARENT_SPAN, 16) and span.parent.is_remote
    assert (span.start_time, span.end_time) == (ns(T0), ns(T0 + 1.5))
    assert span.status.status_code is StatusCode.UNSET


def test_span_attributes_are_exact(sink: TraceSink, exporter: InMemorySpanExporter) -> None:
    sink.emit(RECORD)
    assert dict(call_span(exporter).attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "ai.provider": "claude",
        "gen_ai.request.model": "fraud_detector",
        "gen_ai.response.model": "claude-3",
        "gen_ai.usage.input_tokens": 120,
        "gen_ai.usage.output_tokens": 48,
        "gen_ai.usage.cache_read.input_tokens": 20,
        "http.response.status_code": 200,
        "http.request.header.x-request-id": ("req-1",),
        "ai.request_id": "req-1",
        "ai.service": "order-service",
        "ai.namespace": "shop",
        "ai.caller_api": "openai",
        "ai.route": "fraud_detector",
        "ai.outcome": "ok",
        "ai.streamed": True,
        "ai.cache": "miss",
        "ai.variant": "control",
        "ai.policy_version": "v7",
        "ai.fallback.hops": 1,
        "ai.usage.estimated": False,
        "ai.cost_usd": 0.0042,
        "ai.ttft_ms": 250.0,
    }


def test_refusal_is_an_error_span_without_usage(sink: TraceSink, exporter: InMemorySpanExporter) -> None:
    refused = replace(RECORD, provider="", genai_provider="", response_model="", status=429,
                      outcome="refused:rate_limit_exceeded", streamed=False, input_tokens=0, output_tokens=0,
                      cached_input_tokens=0, usage_reported=False, cost_usd=0.0, first_byte_at=None, cache="",
                      variant="", hops=(), operation="embeddings", error="rate limit exceeded")
    sink.emit(refused)
    span = call_span(exporter)
    assert span.name == "embeddings fraud_detector"
    attributes = dict(span.attributes or {})
    assert attributes["error.type"] == "rate_limit_exceeded"
    assert attributes["http.response.status_code"] == 429
    assert attributes["ai.fallback.hops"] == 0
    assert not {"gen_ai.provider.name", "ai.provider", "gen_ai.usage.input_tokens", "ai.cost_usd",
                "ai.cache"} & attributes.keys()
    assert span.status.status_code is StatusCode.ERROR and span.status.description == "rate limit exceeded"


@pytest.mark.parametrize(("status", "outcome", "error_type"), [(200, "cut", "cut"), (502, "error", "502"),
                                                               (200, "error", "error"), (200, "cache_hit", None)])
def test_error_status_and_type(sink: TraceSink, exporter: InMemorySpanExporter, status: int, outcome: str,
                               error_type: str | None) -> None:
    sink.emit(replace(RECORD, status=status, outcome=outcome, hops=()))
    span = call_span(exporter)
    assert (span.attributes or {}).get("error.type") == error_type
    expected = StatusCode.UNSET if error_type is None else StatusCode.ERROR
    assert span.status.status_code is expected


@pytest.mark.parametrize("b3", [f"{TRACE_ID}-{PARENT_SPAN}-1", f"{TRACE_ID}-{PARENT_SPAN}-d-e457b5a2e4d86bd1",
                                f"{TRACE_ID}-{PARENT_SPAN}"])
def test_b3_parent(sink: TraceSink, exporter: InMemorySpanExporter, b3: str) -> None:
    sink.emit(replace(RECORD, traceparent="", b3=b3))  # deferred sampling: our ratio (1.0) decides
    span = call_span(exporter)
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent is not None and span.parent.span_id == int(PARENT_SPAN, 16)


def test_b3_64_bit_trace_id_is_left_padded() -> None:
    parent = parse_b3(f"{TRACE_ID[16:]}-{PARENT_SPAN}-1")
    assert parent is not None and parent.trace_id_hex == "0" * 16 + TRACE_ID[16:]


def test_the_mesh_sampling_decision_wins(exporter: InMemorySpanExporter) -> None:
    never_for_new_traces = TraceSink(build_tracer_provider(span_processor=SimpleSpanProcessor(exporter),
                                                           sample_ratio=0.0), sample_ratio=0.0)
    never_for_new_traces.emit(replace(RECORD, traceparent=f"00-{TRACE_ID}-{PARENT_SPAN}-00"))  # not sampled
    never_for_new_traces.emit(replace(RECORD, traceparent="", b3=f"{TRACE_ID}-{PARENT_SPAN}-0"))  # denied
    never_for_new_traces.emit(replace(RECORD, traceparent="", b3=f"{TRACE_ID}-{PARENT_SPAN}"))  # deferred: ratio 0
    never_for_new_traces.emit(replace(RECORD, traceparent=""))  # new trace: ratio 0
    assert exporter.get_finished_spans() == ()
    never_for_new_traces.emit(RECORD)  # the sidecar sampled it: recorded even at ratio 0
    assert call_span(exporter).context.trace_id == int(TRACE_ID, 16)


def test_bad_traceparent_falls_back_to_b3_then_to_a_new_trace(sink: TraceSink,
                                                              exporter: InMemorySpanExporter) -> None:
    other = "463ac35c9f6413ad48485a3953bb6124"
    sink.emit(replace(RECORD, traceparent="00-nothex-zz-01", b3=f"{other}-{PARENT_SPAN}-1", hops=()))
    sink.emit(replace(RECORD, traceparent=f"ff-{TRACE_ID}-{PARENT_SPAN}-01", b3="garbage", hops=()))
    via_b3, fresh = sorted(exporter.get_finished_spans(), key=lambda s: s.context.trace_id != int(other, 16))
    assert via_b3.context.trace_id == int(other, 16)
    assert fresh.parent is None and fresh.context.trace_id not in (int(TRACE_ID, 16), int(other, 16))


@pytest.mark.parametrize(("value", "ok"), [
    (TRACEPARENT, True), (TRACEPARENT.upper(), True), (f"01-{TRACE_ID}-{PARENT_SPAN}-01-future", True),
    (f"00-{TRACE_ID}-{PARENT_SPAN}-01-extra", False), (f"00-{'0' * 32}-{PARENT_SPAN}-01", False),
    (f"00-{TRACE_ID}-{'0' * 16}-01", False), (f"00-{TRACE_ID}-{PARENT_SPAN}", False), ("", False)])
def test_traceparent_parsing(value: str, ok: bool) -> None:
    assert (parse_traceparent(value) is not None) is ok


def test_fallback_hops_are_child_spans(sink: TraceSink, exporter: InMemorySpanExporter) -> None:
    hops = (Hop("openai", "gpt-4", "status_503", T0 + 0.01), Hop("vllm", "llama", "timeout", 0.0),
            Hop("claude", "claude-3", "ok", T0 + 0.9))
    sink.emit(replace(RECORD, hops=hops))
    parent = call_span(exporter)
    children = sorted((s for s in exporter.get_finished_spans() if s is not parent),
                      key=lambda s: str((s.attributes or {})["ai.attempt.index"]))
    assert [c.name for c in children] == ["attempt openai/gpt-4", "attempt vllm/llama", "attempt claude/claude-3"]
    for child in children:
        assert child.parent is not None and child.parent.span_id == parent.context.span_id
        assert child.context.trace_id == int(TRACE_ID, 16)
    # Known starts bound the previous attempt; the unknown start begins where the previous ended and,
    # its own end being unknown, has no made-up duration.
    assert [(c.start_time, c.end_time) for c in children] == [
        (ns(T0 + 0.01), ns(T0 + 0.01)), (ns(T0 + 0.01), ns(T0 + 0.9)), (ns(T0 + 0.9), ns(T0 + 1.5))]
    assert dict(children[0].attributes or {}) == {
        "ai.attempt.index": 1, "ai.attempt.provider": "openai", "ai.attempt.model": "gpt-4",
        "ai.attempt.outcome": "status_503"}
    assert [c.status.status_code for c in children] == [StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET]
    assert (parent.attributes or {})["ai.fallback.hops"] == 2


def test_hop_spans_with_all_starts_known(sink: TraceSink, exporter: InMemorySpanExporter) -> None:
    sink.emit(RECORD)
    parent = call_span(exporter)
    children = sorted((s for s in exporter.get_finished_spans() if s is not parent), key=lambda s: s.start_time or 0)
    assert [(c.start_time, c.end_time) for c in children] == [(ns(T0 + 0.01), ns(T0 + 0.5)),
                                                              (ns(T0 + 0.5), ns(T0 + 1.5))]


def test_tracing_is_off_by_default() -> None:
    assert build_tracer_provider() is None
    assert build_tracer_provider("none", "http://127.0.0.1:4317") is None
    off = TraceSink(None)
    assert not off.enabled
    off.emit(RECORD)  # no provider, no error
    off.close()
    assert build_telemetry(TelemetryOptions()).sinks == []


def test_otlp_providers_build_and_close_without_a_collector() -> None:
    for exporter in ("otlp-grpc", "otlp-http"):
        provider = build_tracer_provider(exporter, "http://127.0.0.1:9")
        assert provider is not None
        provider.shutdown()  # nothing queued: returns without contacting anything


def test_options_are_checked_up_front() -> None:
    with pytest.raises(ValueError, match="trace exporter must be one of none, otlp-grpc, otlp-http"):
        TelemetryOptions(trace_exporter="jaeger")
    with pytest.raises(ValueError, match="between 0 and 1"):
        TelemetryOptions(trace_sample_ratio=1.5)
    with pytest.raises(RedactionPatternError, match=r"invalid redaction pattern '\(unclosed'"):
        build_telemetry(TelemetryOptions(redact_patterns=("(unclosed",)))


class _Collector(BaseHTTPRequestHandler):
    received: list[ExportTraceServiceRequest] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/v1/traces":
            _Collector.received.append(ExportTraceServiceRequest.FromString(body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_otlp_http_export_reaches_a_collector() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"  # /v1/traces is appended for us
        telemetry = build_telemetry(TelemetryOptions(trace_exporter="otlp-http", trace_endpoint=endpoint))
        telemetry.emit(RECORD)
        telemetry.close()  # flushes the batch
    finally:
        server.shutdown()
        server.server_close()
    spans = [span for request in _Collector.received for rs in request.resource_spans
             for ss in rs.scope_spans for span in ss.spans]
    assert {s.name for s in spans} == {"chat fraud_detector", "attempt openai/gpt-4", "attempt claude/claude-3"}
    assert {s.trace_id.hex() for s in spans} == {TRACE_ID}
    resource = _Collector.received[0].resource_spans[0].resource
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "ai-extproc"


# --- access log -------------------------------------------------------------------------------


def test_access_log_line_has_exact_fields() -> None:
    stream = io.StringIO()
    AccessLogSink(stream).emit(RECORD)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert orjson.loads(lines[0]) == {
        "start_time": "2026-01-01T00:00:00.250Z",
        "service": "order-service", "namespace": "shop", "operation": "chat_completions", "caller_api": "openai",
        "requested_model": "fraud_detector", "route": "fraud_detector", "provider": "claude",
        "response_model": "claude-3", "status": 200, "outcome": "ok", "streamed": True,
        "input_tokens": 120, "output_tokens": 48, "cached_input_tokens": 20, "usage_reported": True,
        "cost_usd": 0.0042, "duration_ms": 1500.0, "ttft_ms": 250.0, "cache": "miss", "variant": "control",
        "hops": [{"provider": "openai", "model": "gpt-4", "outcome": "status_503"},
                 {"provider": "claude", "model": "claude-3", "outcome": "ok"}],
        "policy_version": "v7", "request_id": "req-1", "trace_id": TRACE_ID, "error": "",
    }


def test_access_log_goes_to_the_extproc_access_logger_by_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="extproc.access"):
        AccessLogSink().emit(replace(RECORD, traceparent="", b3=f"{TRACE_ID[16:]}-{PARENT_SPAN}-1",
                                     first_byte_at=None))
    [entry] = [r for r in caplog.records if r.name == "extproc.access"]
    line = orjson.loads(entry.getMessage())
    assert line["trace_id"] == "0" * 16 + TRACE_ID[16:]
    assert line["ttft_ms"] is None


def test_access_log_to_a_file(tmp_path: Any) -> None:
    path = tmp_path / "access.log"
    sink = AccessLogSink.open(str(path))
    sink.emit(RECORD)
    sink.emit(replace(RECORD, request_id="req-2", traceparent=""))
    sink.close()
    lines = [orjson.loads(line) for line in path.read_text().splitlines()]
    assert [(x["request_id"], x["trace_id"]) for x in lines] == [("req-1", TRACE_ID), ("req-2", "")]


def test_access_log_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    stream.close()
    sink = AccessLogSink(stream)
    with caplog.at_level(logging.WARNING):
        sink.emit(RECORD)
        sink.emit(RECORD)
    warnings = [r for r in caplog.records if "access log" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited


# --- redaction --------------------------------------------------------------------------------


def test_secrets_never_reach_access_log_or_spans(exporter: InMemorySpanExporter) -> None:
    options = TelemetryOptions(access_log=True, access_log_path=None, capture_content=True,
                               redact_patterns=(r"cust-\d{6}",))
    stream = io.StringIO()
    redactor = Redactor(options.redact_patterns)
    provider = build_tracer_provider(span_processor=SimpleSpanProcessor(exporter))
    telemetry = Telemetry([AccessLogSink(stream, redactor=redactor, capture_content=True),
                           TraceSink(provider, redactor=redactor, capture_content=True)])
    leaky = replace(RECORD, prompt=LEAKY, completion=LEAKY, error=LEAKY, status=500, outcome="error")
    telemetry.emit(leaky)

    line = stream.getvalue()
    logged = orjson.loads(line)
    assert REDACTED in logged["prompt"] and REDACTED in logged["completion"] and REDACTED in logged["error"]
    span = call_span(exporter)
    events = {event.name: dict(event.attributes or {}) for event in span.events}
    assert REDACTED in str(events["gen_ai.content.prompt"]["gen_ai.prompt"])
    assert REDACTED in str(events["gen_ai.content.completion"]["gen_ai.completion"])
    exported = " ".join([line, repr(dict(span.attributes or {})), repr(events), span.status.description or ""])
    for secret in SECRETS:
        assert secret not in exported


def test_content_is_left_out_unless_capture_is_on(sink: TraceSink, exporter: InMemorySpanExporter) -> None:
    stream = io.StringIO()
    with_content = replace(RECORD, prompt="hello", completion="hi")
    AccessLogSink(stream).emit(with_content)
    sink.emit(with_content)
    assert not {"prompt", "completion"} & orjson.loads(stream.getvalue()).keys()
    assert call_span(exporter).events == ()


def test_long_content_is_truncated() -> None:
    stream = io.StringIO()
    AccessLogSink(stream, capture_content=True, max_content_chars=10).emit(replace(RECORD, prompt="x" * 50))
    assert orjson.loads(stream.getvalue())["prompt"] == "x" * 10 + "…[truncated]"


def test_headers_are_masked() -> None:
    redactor = Redactor(header_names=("x-internal-.*",))
    headers = {"Authorization": f"Bearer {BEARER}", "x-api-key": X_API_KEY, "Cookie": "session=abc",
               "Proxy-Authorization": "Basic dXNlcjpwYXNz", "X-Internal-Customer": CUSTOMER,
               "x-auth-token": "t0k3n", "x-ratelimit-remaining-tokens": "99", "user-agent": f"app {OPENAI_KEY}",
               "x-request-id": "req-1"}
    masked = redactor.redact_headers(headers)
    assert masked == {"Authorization": REDACTED, "x-api-key": REDACTED, "Cookie": REDACTED,
                      "Proxy-Authorization": REDACTED, "X-Internal-Customer": REDACTED, "x-auth-token": REDACTED,
                      "x-ratelimit-remaining-tokens": "99", "user-agent": f"app {REDACTED}", "x-request-id": "req-1"}
    assert redactor.redact_headers([("authorization", "x")]) == {"authorization": REDACTED}
    dumped = orjson.dumps(masked).decode()
    for secret in (*SECRETS, "dXNlcjpwYXNz", "t0k3n"):
        assert secret not in dumped


@pytest.mark.parametrize(("text", "expected"), [
    (f"Authorization: Bearer {BEARER}", f"Authorization: Bearer {REDACTED}"),
    (f'{{"api_key": "{X_API_KEY}", "n": 1}}', f'{{"api_key": "{REDACTED}", "n": 1}}'),
    (f"x-api-key={X_API_KEY}&q=1", f"x-api-key={REDACTED}&q=1"),
    (f"key {ANTHROPIC_KEY}.", f"key {REDACTED}."),
    (f"key {OPENAI_KEY}", f"key {REDACTED}"),
    (f"id {AWS_KEY}", f"id {REDACTED}"),
    ("the bearer of good news; basic usage; 1500 tokens; sk-short", "the bearer of good news; basic usage; "
                                                                    "1500 tokens; sk-short"),
    ("mail bob@example.com", "mail bob@example.com"),  # emails only when asked
])
def test_builtin_patterns(text: str, expected: str) -> None:
    assert Redactor().redact(text) == expected


def test_configured_patterns_and_emails() -> None:
    redactor = Redactor([r"cust-\d{6}", r"ssn=(?P<secret>\d+)"], emails=True)
    assert redactor.redact(f"{CUSTOMER} ssn=123456789 bob@example.com") == f"{REDACTED} ssn={REDACTED} {REDACTED}"


@pytest.mark.parametrize(("pattern", "message"), [
    ("(unclosed", r"invalid redaction pattern '\(unclosed': missing \)"),
    ("a*", r"invalid redaction pattern 'a\*': it matches the empty string"),
])
def test_invalid_patterns_name_the_pattern(pattern: str, message: str) -> None:
    with pytest.raises(RedactionPatternError, match=message):
        Redactor([pattern])
    with pytest.raises(ValueError, match="invalid header name pattern"):
        Redactor(header_names=["x-[bad"])


# --- fan-out ----------------------------------------------------------------------------------


class _Collecting:
    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    def emit(self, record: CallRecord) -> None:
        self.records.append(record)


class _Broken:
    def emit(self, record: CallRecord) -> None:
        raise RuntimeError("collector is down")

    def close(self) -> None:
        raise RuntimeError("still down")


def test_a_broken_sink_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    before, after = _Collecting(), _Collecting()
    telemetry = Telemetry([before, _Broken(), after])
    with caplog.at_level(logging.WARNING, logger="extproc.telemetry.telemetry"):
        for _ in range(3):
            telemetry.emit(RECORD)
        telemetry.close()
    assert before.records == after.records == [RECORD] * 3
    failures = [r for r in caplog.records if "telemetry sink _Broken failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None  # once per minute, with the traceback
    assert any("closing _Broken failed" in r.getMessage() for r in caplog.records)


def test_build_telemetry_orders_sinks(tmp_path: Any) -> None:
    metrics = _Collecting()
    telemetry = build_telemetry(TelemetryOptions(access_log=True, access_log_path=str(tmp_path / "a.log"),
                                                 capture_content=True), extra_sinks=[metrics])
    assert [type(s) for s in telemetry.sinks] == [_Collecting, AccessLogSink]
    assert telemetry.capture_content
    telemetry.emit(replace(RECORD, prompt=f"my key is {OPENAI_KEY}"))
    telemetry.close()
    assert metrics.records and OPENAI_KEY not in (tmp_path / "a.log").read_text()
    assert telemetry.redactor.redact(OPENAI_KEY) == REDACTED


def test_trace_id_of() -> None:
    assert trace_id_of(RECORD) == TRACE_ID
    assert trace_id_of(replace(RECORD, traceparent="", b3="1")) == ""  # a lone sampling state has no ids


# --- provider names: the GenAI value of its API, and the policy's own name -------------------------

PROVIDERS_POLICY = """\
providers:
- {name: my-bedrock, api: bedrock, region: us-east-1, credential: {type: aws}}
- {name: my-azure, api: azure_openai, base_url: http://contoso-ai.openai.azure.com, api_version: v1,
   credential: {env: AZURE_KEY}}
- {name: my-vertex, api: vertex, project: demo-project, location: us-central1,
   credential: {type: google, file: /keys/vertex.json}}
- {name: my-gemini, api: gemini, credential: {env: GEMINI_KEY}}
---
service: order-service
ai_proxy:
  models:
  - {name: chat, provider: my-bedrock, model: m, fallback: [my-azure/m, my-vertex/m, my-gemini/m]}
"""
OPENAI_ANSWER = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "usage": {
    "prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}, "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hi"}}]})


@pytest.mark.parametrize(("provider", "genai"), [("my-bedrock", "aws.bedrock"), ("my-azure", "azure.ai.openai"),
                                                 ("my-vertex", "gcp.vertex_ai"), ("my-gemini", "gcp.gemini")])
def test_a_provider_is_named_by_its_api_and_by_the_policy(tmp_path: Any, provider: str, genai: str) -> None:
    """gen_ai_provider_name / gen_ai.provider.name is the convention's value for the provider's API;
    ``provider`` / ``ai.provider`` / the event's ``provider`` the name the policy gave it."""
    runtime = make_decider(tmp_path, PROVIDERS_POLICY).runtime
    records = _Collecting()
    runtime.telemetry = Telemetry([records])
    policy = runtime.policy()
    runtime.count(Forward((), (), None, {"provider": provider, "route": "chat"}), policy,
                  Caller("order-service", "shop", None, "node"))
    # The body format the provider answers in does not matter to the names: an OpenAI-shaped one here.
    settlement = Settlement(SettleInfo(None, "openai", 4, provider, "m", operation="chat_completions", route="chat",
                                       decided_at=T0, service="order-service", namespace="shop"), runtime, False)
    settlement.on_headers(200, "application/json")
    settlement.feed(OPENAI_ANSWER)
    settlement.flush()
    asyncio.run(settlement.settle(True))
    # The runtime's own breakers report to the gauge (the test decider's run on an injected clock, unwired).
    Breakers(on_change=runtime._breaker_changed).record(("shop", "order-service", provider, "m"),
                                                        breaker_settings(consecutive_failures=1), failed=True)

    sample = runtime.metrics.registry.get_sample_value
    caller = {"service": "order-service", "namespace": "shop"}
    names = {"gen_ai_provider_name": genai, "provider": provider}
    assert sample("ai_extproc_calls_total", {**caller, **names, "gen_ai_request_model": "chat",
                                             "outcome": "forwarded"}) == 1
    assert sample("ai_extproc_cost_usd_total", {**caller, **names, "gen_ai_response_model": "m"}) is not None
    genai_labels = {**caller, "gen_ai_operation_name": "chat_completions", **names, "gen_ai_request_model": "chat",
                    "gen_ai_response_model": "m"}
    assert sample("gen_ai_client_token_usage_sum", {**genai_labels, "gen_ai_token_type": "input"}) == 11
    assert sample("gen_ai_client_token_usage_sum", {**genai_labels, "gen_ai_token_type": "output"}) == 7
    assert sample("gen_ai_server_request_duration_seconds_count", {**genai_labels, "status": "200"}) == 1
    assert sample("ai_extproc_breaker_state", {**caller, **names, "gen_ai_request_model": "m"}) == 2

    (record,) = records.records
    assert (record.provider, record.genai_provider) == (provider, genai)
    attributes = span_attributes(record)
    assert (attributes["gen_ai.provider.name"], attributes["ai.provider"]) == (genai, provider)
    event = event_to_dict(to_event(record))
    assert (event["provider"], event["gen_ai_provider_name"]) == (provider, genai)
    keys = list(event)
    assert keys.index("gen_ai_provider_name") == keys.index("provider") + 1  # .proto order


def test_provider_labels_are_bounded_by_the_policy(tmp_path: Any) -> None:
    policy = load(tmp_path, PROVIDERS_POLICY)

    def providers(provider: str | None) -> tuple[str, str]:
        return CallLabels.of(policy, service="order-service", namespace="shop", provider=provider).providers

    assert providers("my-bedrock") == ("aws.bedrock", "my-bedrock")
    assert providers("someone-elses") == ("other", "other")  # not the policy's: bounded, never echoed
    assert providers("") == ("other", "other")
    assert providers(None) == ("", "")  # a call never forwarded
    assert (genai_provider(policy, "my-azure"), genai_provider(policy, "nope"), genai_provider(policy, "")) == (
        "azure.ai.openai", "", "")


def test_a_locally_answered_call_names_its_provider_both_ways(tmp_path: Any) -> None:
    policy = load(tmp_path, PROVIDERS_POLICY)
    reply = LocalReply(200, b"{}", "ai_cache_hit", (("x-ai-provider", "my-vertex"), ("x-ai-model", "m")))
    record = reply_record(HttpRequest("POST", "/v1/chat/completions", "api.openai.com", {}, {}),
                          Caller("order-service", "shop", None, "node"),
                          Endpoint(Api.OPENAI, "chat_completions", "/chat/completions"), reply, policy, "chat")
    assert (record.provider, record.genai_provider, record.outcome) == ("my-vertex", "gcp.vertex_ai", "cache_hit")
