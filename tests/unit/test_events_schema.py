"""The usage event schema: CallRecord → UsageEvent → bytes/JSON and back, trace ids, the generated
code's freshness, subjects, and the JSONL sink and file tail (no NATS needed here; see
tests/e2e/test_events_nats.py for JetStream)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from extproc.events import compile_protos
from extproc.events.schema import (
    SCHEMA_NAME,
    SCHEMA_VERSION,
    Hop,
    Tokens,
    UsageEvent,
    event_from_json,
    event_to_dict,
    event_to_json,
    reference_event_dict,
    to_event,
    trace_id_of,
)
from extproc.events.sinks import JsonlEventSink, NatsEventSink, build_event_sinks
from extproc.events.subjects import check_prefix, filter_subject, subject_for, token
from extproc.events.tail import TailOptions, format_line, parse_since, tail_file
from extproc.telemetry import record as telemetry
from extproc.telemetry.record import CallRecord
from tests.conftest import missing

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
T0 = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z


def a_record(**changes: object) -> CallRecord:
    """A fallback call with every field set, content included (which the event must leave out)."""
    record = CallRecord(
        service="checkout", namespace="shop", operation="chat_completions", caller_api="openai",
        requested_model="fast", route="fast", provider="anthropic", response_model="claude-3-haiku",
        status=200, outcome="ok", streamed=True, input_tokens=120, output_tokens=45, cached_input_tokens=100,
        usage_reported=True, cost_usd=0.00123, started_at=T0, ended_at=T0 + 1.5, first_byte_at=T0 + 0.125,
        cache="miss", variant="b", policy_version="v42", request_id="req-1",
        traceparent=f"00-{TRACE}-00f067aa0ba902b7-01", b3="",
        hops=(telemetry.Hop("openai", "gpt-4o-mini", "status_503", T0 + 0.001),
              telemetry.Hop("anthropic", "claude-3-haiku", "ok", T0 + 0.5)),
        prompt="SECRET PROMPT", completion="SECRET COMPLETION", error="", genai_provider="anthropic",
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def ts(seconds: float) -> object:
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromMicroseconds(round(seconds * 1e6))
    return stamp


EXPECTED = UsageEvent(
    event_id="e" * 32, schema_version=1, service="checkout", namespace="shop", operation="chat_completions",
    caller_api="openai", requested_model="fast", route="fast", provider="anthropic",
    gen_ai_provider_name="anthropic", response_model="claude-3-haiku", status=200, outcome="ok", streamed=True,
    tokens=Tokens(input=120, output=45, cached_input=100, usage_reported=True), cost_usd=0.00123,
    started_at=ts(T0), ended_at=ts(T0 + 1.5), latency_ms=1500.0, ttft_ms=125.0, cache="miss", variant="b",
    hops=[Hop(provider="openai", model="gpt-4o-mini", outcome="status_503", started_at=ts(T0 + 0.001)),
          Hop(provider="anthropic", model="claude-3-haiku", outcome="ok", started_at=ts(T0 + 0.5))],
    policy_version="v42", request_id="req-1", trace_id=TRACE, error="",
)

# CallRecord field → where the event keeps it. A new CallRecord field fails test_every_field_is_mapped
# until it is added to the schema (or listed as content / folded into another field here).
FIELD_MAP = {
    "service": "service", "namespace": "namespace", "operation": "operation", "caller_api": "caller_api",
    "requested_model": "requested_model", "route": "route", "provider": "provider",
    "response_model": "response_model", "status": "status", "outcome": "outcome", "streamed": "streamed",
    "input_tokens": "tokens.input", "output_tokens": "tokens.output", "cached_input_tokens": "tokens.cached_input",
    "usage_reported": "tokens.usage_reported", "cost_usd": "cost_usd", "started_at": "started_at",
    "ended_at": "ended_at", "first_byte_at": "ttft_ms", "cache": "cache", "variant": "variant", "hops": "hops",
    "policy_version": "policy_version", "request_id": "request_id", "traceparent": "trace_id", "b3": "trace_id",
    "error": "error", "genai_provider": "gen_ai_provider_name",
}
CONTENT = {"prompt", "completion"}


# -- schema -------------------------------------------------------------------------------------------


def test_record_to_event_sets_every_field() -> None:
    assert to_event(a_record(), event_id="e" * 32) == EXPECTED


def test_round_trip_through_bytes() -> None:
    event = to_event(a_record())
    data = event.SerializeToString()
    assert UsageEvent.FromString(data) == event
    assert b"SECRET" not in data  # content never leaves through events


def test_every_field_is_mapped_and_content_is_not() -> None:
    record_fields = {f.name for f in dataclasses.fields(CallRecord)}
    assert record_fields - CONTENT == set(FIELD_MAP)
    event_fields = {f.name for f in UsageEvent.DESCRIPTOR.fields}
    assert {path.split(".")[0] for path in FIELD_MAP.values()} <= event_fields
    assert event_fields - {path.split(".")[0] for path in FIELD_MAP.values()} == {
        "event_id", "schema_version", "latency_ms"}  # the event's own fields, and one derived
    assert not {"prompt", "completion", "content"} & event_fields


def test_event_ids_are_uuid4_hex_and_schema_is_named() -> None:
    first, second = to_event(a_record()), to_event(a_record())
    assert first.event_id != second.event_id
    assert len(first.event_id) == 32 and int(first.event_id, 16) >= 0
    assert first.schema_version == SCHEMA_VERSION == 1
    assert SCHEMA_NAME == "ai.extproc.v1.UsageEvent"


def test_unknown_times_stay_unset() -> None:
    event = to_event(a_record(started_at=0.0, first_byte_at=None, hops=(telemetry.Hop("openai", "m", "ok"),)))
    assert not event.HasField("started_at")
    assert not event.HasField("ttft_ms")
    assert event.latency_ms == 0.0
    assert not event.hops[0].HasField("started_at")
    assert event.HasField("ended_at")


def test_refusal_without_provider() -> None:
    event = to_event(a_record(provider="", genai_provider="", response_model="", status=429, outcome="refused:quota",
                              hops=(), first_byte_at=None, input_tokens=0, output_tokens=0, cached_input_tokens=0,
                              usage_reported=False, cost_usd=0.0, error="quota exceeded"))
    assert event.gen_ai_provider_name == ""
    assert (event.provider, event.status, event.outcome, event.error) == ("", 429, "refused:quota", "quota exceeded")
    assert list(event.hops) == [] and not event.HasField("ttft_ms")


def test_token_counts_are_clamped_to_uint32() -> None:
    event = to_event(a_record(input_tokens=-5, output_tokens=2**40))
    assert (event.tokens.input, event.tokens.output) == (0, 2**32 - 1)


# -- JSON mapping -----------------------------------------------------------------------------------


GOLDEN_JSON = (
    '{"event_id":"eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee","schema_version":1,"service":"checkout","namespace":"shop",'
    '"operation":"chat_completions","caller_api":"openai","requested_model":"fast","route":"fast",'
    '"provider":"anthropic","gen_ai_provider_name":"anthropic","response_model":"claude-3-haiku","status":200,'
    '"outcome":"ok","streamed":true,'
    '"tokens":{"input":120,"output":45,"cached_input":100,"usage_reported":true},"cost_usd":0.00123,'
    '"started_at":"2023-11-14T22:13:20.250Z","ended_at":"2023-11-14T22:13:21.750Z","latency_ms":1500.0,'
    '"ttft_ms":125.0,"cache":"miss","variant":"b","hops":[{"provider":"openai","model":"gpt-4o-mini",'
    '"outcome":"status_503","started_at":"2023-11-14T22:13:20.251Z"},{"provider":"anthropic",'
    '"model":"claude-3-haiku","outcome":"ok","started_at":"2023-11-14T22:13:20.750Z"}],'
    '"policy_version":"v42","request_id":"req-1","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","error":""}'
)


def test_json_mapping_is_the_golden_line() -> None:
    line = event_to_json(to_event(a_record(), event_id="e" * 32))
    assert line == GOLDEN_JSON
    assert "\n" not in line


@pytest.mark.parametrize("record", [
    a_record(),
    a_record(first_byte_at=None, hops=(), started_at=0.0, ended_at=0.0, service="", status=0, streamed=False),
    a_record(hops=(telemetry.Hop("a", "b", "timeout", 0.0),), cost_usd=1e-06, cached_input_tokens=0),
])
def test_fast_json_mapping_is_json_format_exactly(record: CallRecord) -> None:
    """The hand-written mapping (json_format costs ~90 µs a call) equals json_format's, keys and order."""
    event = to_event(record)
    fast, reference = event_to_dict(event), reference_event_dict(event)
    assert json.dumps(fast) == json.dumps(reference)


def test_json_round_trip_and_unknown_fields() -> None:
    event = to_event(a_record(error="boom\nline two"))
    assert event_from_json(event_to_json(event)) == event
    newer = json.loads(event_to_json(event)) | {"field_from_a_newer_producer": 1}
    assert event_from_json(json.dumps(newer)) == event


def test_json_keys_follow_the_proto_whatever_the_values() -> None:
    """MessageToDict puts set fields before defaults; our mapping keeps the .proto order regardless."""
    full = event_to_dict(to_event(a_record()))
    sparse = event_to_dict(to_event(a_record(input_tokens=0, usage_reported=False, cache="", service="")))
    assert list(full) == list(sparse)
    assert list(full["tokens"]) == list(sparse["tokens"]) == ["input", "output", "cached_input", "usage_reported"]
    assert "ttft_ms" not in event_to_dict(to_event(a_record(first_byte_at=None)))  # presence: absent, not 0


# -- trace ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("traceparent", "b3", "expected"), [
    (f"00-{TRACE}-00f067aa0ba902b7-01", "", TRACE),
    (f"00-{TRACE.upper()}-00F067AA0BA902B7-00", "", TRACE),
    (f"01-{TRACE}-00f067aa0ba902b7-01-future", "", TRACE),  # later versions may append fields
    (f"00-{TRACE}-00f067aa0ba902b7-01-extra", "", ""),  # version 00 has exactly four
    (f"ff-{TRACE}-00f067aa0ba902b7-01", "", ""),  # version ff is invalid
    (f"00-{'0' * 32}-00f067aa0ba902b7-01", "", ""),  # all-zero trace id
    (f"00-{TRACE}-{'0' * 16}-01", "", ""),  # all-zero parent id
    ("00-abc-def-01", "", ""),
    ("", f"{TRACE}-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90", TRACE),
    ("", "a3ce929d0e0e4736-e457b5a2e4d86bd1-1", "0000000000000000a3ce929d0e0e4736"),  # 64-bit, padded
    ("", "a3ce929d0e0e4736-e457b5a2e4d86bd1", "0000000000000000a3ce929d0e0e4736"),
    ("", "1", ""),  # sampling decision only
    ("", "d", ""),
    ("", "xyz-e457b5a2e4d86bd1", ""),
    ("", f"{'0' * 32}-e457b5a2e4d86bd1-1", ""),
    (f"00-{TRACE}-00f067aa0ba902b7-01", "a3ce929d0e0e4736-e457b5a2e4d86bd1-1", TRACE),  # W3C wins
    ("garbage", "a3ce929d0e0e4736-e457b5a2e4d86bd1-1", "0000000000000000a3ce929d0e0e4736"),  # else B3
    ("", "", ""),
])
def test_trace_id_of(traceparent: str, b3: str, expected: str) -> None:
    assert trace_id_of(traceparent, b3) == expected


def test_event_trace_id_from_b3() -> None:
    event = to_event(a_record(traceparent="", b3="a3ce929d0e0e4736-e457b5a2e4d86bd1-1"))
    assert event.trace_id == "0000000000000000a3ce929d0e0e4736"


# -- generated code ------------------------------------------------------------------------------------


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    try:
        import grpc_tools  # noqa: F401
    except ImportError:
        missing("grpcio-tools is not installed (pip install -e '.[dev]')")
    fresh = compile_protos.compile_protos(tmp_path)
    checked_in = compile_protos.generated_files()
    assert [p.relative_to(tmp_path) for p in fresh] == [p.relative_to(compile_protos.GEN_DIR) for p in checked_in]
    for new, old in zip(fresh, checked_in, strict=True):
        assert new.read_bytes() == old.read_bytes(), (
            f"{old} is stale (or was made by another grpcio-tools): run python -m extproc.events.compile_protos")


def test_generated_module_lives_under_our_package() -> None:
    """Nested under extproc, registered as its own .proto file: it coexists with the xds-protos
    `envoy` package (and its descriptors) in one process."""
    from envoy.service.ext_proc.v3 import external_processor_pb2

    from extproc.events.gen.ai.extproc.v1 import usage_event_pb2

    assert external_processor_pb2.ProcessingRequest.DESCRIPTOR.full_name.startswith("envoy.")

    assert usage_event_pb2.UsageEvent is UsageEvent
    assert usage_event_pb2.DESCRIPTOR.name == "ai/extproc/v1/usage_event.proto"
    assert usage_event_pb2.DESCRIPTOR.package == "ai.extproc.v1"


# -- subjects --------------------------------------------------------------------------------------------


def test_subject_tokens_are_sanitised() -> None:
    assert subject_for("ai.usage", "shop", "checkout") == "ai.usage.shop.checkout"
    assert subject_for("ai.usage", "", "checkout") == "ai.usage._.checkout"
    assert subject_for("ai.usage", "a.b", "x* y>\tz") == "ai.usage.a_b.x__y__z"
    assert token("") == "_"
    assert filter_subject("ai.usage") == "ai.usage.*.*"
    assert filter_subject("ai.usage", namespace="shop") == "ai.usage.shop.*"
    assert filter_subject("ai.usage", service="checkout") == "ai.usage.*.checkout"
    assert check_prefix("team-a.ai_usage") == "team-a.ai_usage"
    for bad in ("", "ai..usage", "ai.*", "ai.>", "ai usage", ".ai", "ai."):
        with pytest.raises(ValueError):
            check_prefix(bad)


# -- JSONL sink ---------------------------------------------------------------------------------------


def records(n: int) -> list[CallRecord]:
    return [a_record(request_id=f"req-{i}", service=f"svc-{i % 2}", input_tokens=i) for i in range(n)]


def test_jsonl_sink_writes_exact_lines(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    registry = CollectorRegistry()
    sink = JsonlEventSink(path, registry=registry)

    async def run() -> None:
        await sink.start()
        for record in records(3):
            sink.emit(record)
        await sink.close(timeout=5)

    asyncio.run(run())
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 3 and all(line.endswith("}\n") for line in lines)
    for line, record in zip(lines, records(3), strict=True):
        event = event_from_json(line)
        assert line == event_to_json(to_event(record, event_id=event.event_id)) + "\n"
    assert (sink.published, sink.dropped, sink.queued) == (3, 0, 0)
    assert registry.get_sample_value("ai_extproc_events_published_total", {"sink": "jsonl"}) == 3
    assert registry.get_sample_value("ai_extproc_events_dropped_total", {"sink": "jsonl"}) == 0


def test_jsonl_sink_counts_overflow_and_late_events(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlEventSink(path, queue_size=3)

    async def run() -> None:
        for record in records(5):  # not started yet: the first three wait, two do not fit
            sink.emit(record)
        assert (sink.queued, sink.dropped) == (3, 2)
        await sink.start()
        await sink.close(timeout=5)
        sink.emit(a_record())  # closed: dropped

    asyncio.run(run())
    assert (sink.published, sink.dropped, sink.queued) == (3, 3, 0)
    assert [event_from_json(line).request_id for line in path.read_text().splitlines()] == ["req-0", "req-1", "req-2"]


def test_jsonl_sink_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlEventSink(path, reopen_check_s=0.0)

    async def wait_published(n: int) -> None:
        while sink.published < n:
            await asyncio.sleep(0.01)

    async def run() -> None:
        await sink.start()
        sink.emit(a_record(request_id="before"))
        await asyncio.wait_for(wait_published(1), 10)
        path.rename(tmp_path / "events.jsonl.1")
        sink.emit(a_record(request_id="after"))
        await sink.close(timeout=5)

    asyncio.run(run())
    assert [event_from_json(line).request_id for line in path.read_text().splitlines()] == ["after"]
    assert [event_from_json(line).request_id for line in (tmp_path / "events.jsonl.1").read_text().splitlines()] \
        == ["before"]


def test_sinks_share_one_registry(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    sinks = build_event_sinks("nats://127.0.0.1:4222", tmp_path / "events.jsonl", registry, prefix="t.usage")
    assert [type(s) for s in sinks] == [NatsEventSink, JsonlEventSink]
    another = build_event_sinks("nats://127.0.0.1:4222", None, registry)  # same registry, no duplicate metrics
    assert len(another) == 1
    assert build_event_sinks(None, None, registry) == []
    with pytest.raises(ValueError):
        build_event_sinks("nats://127.0.0.1:4222", None, registry, prefix="bad.>")


# -- tail (file side) and the human line ---------------------------------------------------------------


def test_human_line() -> None:
    assert format_line(to_event(a_record())) == (
        "2023-11-14T22:13:21.750Z shop/checkout anthropic/claude-3-haiku 200 ok tokens=120/45 cached=100 "
        "$0.001230 latency=1500ms ttft=125ms cache=miss "
        "hops=openai/gpt-4o-mini(status_503)>anthropic/claude-3-haiku(ok)")
    refused = to_event(a_record(provider="", response_model="", status=429, outcome="refused:quota", hops=(),
                                first_byte_at=None, usage_reported=False, input_tokens=7, output_tokens=0,
                                cached_input_tokens=0, cost_usd=0.0, cache="", error="quota"))
    assert format_line(refused) == ("2023-11-14T22:13:21.750Z shop/checkout -/fast 429 refused:quota tokens=~7/0 "
                                    "$0.000000 latency=1500ms error='quota'")


def test_parse_since() -> None:
    now = datetime(2025, 1, 1, 12, tzinfo=UTC)
    assert parse_since("10m", now) == now - timedelta(minutes=10)
    assert parse_since("1.5h", now) == now - timedelta(minutes=90)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("2025-01-01T11:00:00", now) == datetime(2025, 1, 1, 11, tzinfo=UTC)
    assert parse_since("2025-01-01T11:00:00+01:00", now) == datetime(2025, 1, 1, 10, tzinfo=UTC)
    with pytest.raises(Exception, match="--since"):
        parse_since("yesterday", now)


def test_tail_file_filters_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    early = a_record(request_id="early", started_at=T0 - 3600, ended_at=T0 - 3599, first_byte_at=None, hops=())
    lines = [event_to_json(to_event(r)) for r in (early, *records(4))]
    path.write_text("\n".join(lines) + "\n")

    def tail(**options: object) -> list[str]:
        out = io.StringIO()
        with contextlib.suppress(_EndOfFile):  # the tail follows forever; here nothing more will come
            tail_file(path, TailOptions(**options), out, sleep=_end_of_file)  # type: ignore[arg-type]
        return [event_from_json(line).request_id for line in out.getvalue().splitlines()]

    assert tail(from_start=True, count=2, as_json=True) == ["early", "req-0"]
    assert tail(from_start=True, service="svc-1", as_json=True) == ["req-1", "req-3"]
    assert tail(since=datetime.fromtimestamp(T0 - 60, UTC), count=1, as_json=True) == ["req-0"]
    assert tail(from_start=True, namespace="elsewhere", as_json=True) == []
    assert tail(as_json=True) == []  # default: only events written from now on


class _EndOfFile(Exception):
    pass


def _end_of_file(seconds: float) -> None:
    raise _EndOfFile


def test_cli_tails_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from extproc.cli import main

    path = tmp_path / "events.jsonl"
    path.write_text("".join(event_to_json(to_event(r)) + "\n" for r in records(3)))
    assert main(["events", "tail", "--file", str(path), "--all", "--count", "2", "--json"]) == 0
    assert [event_from_json(line).request_id for line in capsys.readouterr().out.splitlines()] == ["req-0", "req-1"]
    assert main(["events", "tail", "--file", str(path), "--all", "--count", "1"]) == 0
    assert capsys.readouterr().out == format_line(to_event(records(1)[0])) + "\n"
