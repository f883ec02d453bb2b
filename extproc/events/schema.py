"""CallRecord → UsageEvent (protos/ai/extproc/v1/usage_event.proto), and the event's JSON form.

The event carries everything in the record except content: ``prompt`` and ``completion`` never
leave the process through this path, whatever the capture setting, because usage events go to
places (a shared stream, files) that content must not.

JSON: one event is one line of the proto3 JSON mapping (``google.protobuf.json_format``) with
``preserving_proto_field_name=True``, i.e. the snake_case names of the .proto (``input_tokens`` is
``tokens.input``, ``cost_usd``, ``started_at``), not the lowerCamelCase default, so the JSONL
file, the .proto and the CallRecord read the same. Every field without presence is written even
when it holds its default (stable columns for jq and log pipelines); fields with presence are
omitted when unset: ``ttft_ms`` (no first byte), ``started_at``/``ended_at`` (unknown time) and
hop ``started_at``. Timestamps are RFC 3339 strings in UTC; all integers are 32-bit, so they stay
JSON numbers.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from extproc.events.gen.ai.extproc.v1.usage_event_pb2 import Hop, Tokens, UsageEvent
from extproc.telemetry.record import CallRecord

__all__ = ["SCHEMA_NAME", "SCHEMA_VERSION", "Hop", "Tokens", "UsageEvent", "event_from_json", "event_to_dict",
           "event_to_json", "to_event", "trace_id_of"]

SCHEMA_VERSION = 1
SCHEMA_NAME = UsageEvent.DESCRIPTOR.full_name  # "ai.extproc.v1.UsageEvent", the Ai-Schema header value
_UINT32_MAX = 2**32 - 1

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_B3_TRACE_ID = re.compile(r"^([0-9a-f]{16}|[0-9a-f]{32})$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def to_event(record: CallRecord, *, event_id: str | None = None) -> UsageEvent:
    """The usage event of one call. ``event_id`` defaults to a fresh uuid4 (tests pin it)."""
    ttft = record.ttft_s
    return UsageEvent(
        event_id=event_id or uuid.uuid4().hex,
        schema_version=SCHEMA_VERSION,
        service=record.service,
        namespace=record.namespace,
        operation=record.operation,
        caller_api=record.caller_api,
        requested_model=record.requested_model,
        route=record.route,
        provider=record.provider,
        gen_ai_provider_name=record.genai_provider,
        response_model=record.response_model,
        status=_uint32(record.status),
        outcome=record.outcome,
        streamed=record.streamed,
        tokens=Tokens(input=_uint32(record.input_tokens), output=_uint32(record.output_tokens),
                      cached_input=_uint32(record.cached_input_tokens), usage_reported=record.usage_reported),
        cost_usd=record.cost_usd,
        # Unknown times stay unset (not 1970-01-01), so consumers can tell "unknown" from a value.
        started_at=_timestamp(record.started_at),
        ended_at=_timestamp(record.ended_at),
        latency_ms=_ms(record.duration_s),
        ttft_ms=None if ttft is None else _ms(ttft),
        cache=record.cache,
        variant=record.variant,
        hops=[Hop(provider=h.provider, model=h.model, outcome=h.outcome, started_at=_timestamp(h.started_at))
              for h in record.hops],
        policy_version=record.policy_version,
        request_id=record.request_id,
        trace_id=trace_id_of(record.traceparent, record.b3),
        error=record.error,
    )


def event_to_dict(event: UsageEvent) -> dict[str, Any]:
    """The proto3 JSON mapping of an event, with the .proto field names (see the module docstring),
    keys in .proto field order.

    Written out by hand because ``json_format`` costs ~90 µs per event on the processor's CPU,
    which every AI call pays; ``reference_event_dict`` is the json_format version, and a test keeps
    the two identical.
    """
    tokens = event.tokens
    out: dict[str, Any] = {
        "event_id": event.event_id, "schema_version": event.schema_version, "service": event.service,
        "namespace": event.namespace, "operation": event.operation, "caller_api": event.caller_api,
        "requested_model": event.requested_model, "route": event.route, "provider": event.provider,
        "gen_ai_provider_name": event.gen_ai_provider_name, "response_model": event.response_model,
        "status": event.status, "outcome": event.outcome, "streamed": event.streamed,
        "tokens": {"input": tokens.input, "output": tokens.output, "cached_input": tokens.cached_input,
                   "usage_reported": tokens.usage_reported},
        "cost_usd": event.cost_usd,
    }
    if event.HasField("started_at"):
        out["started_at"] = event.started_at.ToJsonString()
    if event.HasField("ended_at"):
        out["ended_at"] = event.ended_at.ToJsonString()
    out["latency_ms"] = event.latency_ms
    if event.HasField("ttft_ms"):
        out["ttft_ms"] = event.ttft_ms
    out["cache"] = event.cache
    out["variant"] = event.variant
    out["hops"] = [_hop_dict(hop) for hop in event.hops]
    out["policy_version"] = event.policy_version
    out["request_id"] = event.request_id
    out["trace_id"] = event.trace_id
    out["error"] = event.error
    return out


def _hop_dict(hop: Hop) -> dict[str, Any]:
    out: dict[str, Any] = {"provider": hop.provider, "model": hop.model, "outcome": hop.outcome}
    if hop.HasField("started_at"):
        out["started_at"] = hop.started_at.ToJsonString()
    return out


def reference_event_dict(event: UsageEvent) -> dict[str, Any]:
    """``event_to_dict`` by ``json_format`` (slow, generic): the definition the fast one must match."""
    mapped = json_format.MessageToDict(event, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)
    return _in_field_order(event, mapped)


def _in_field_order(message: Message, mapped: dict[str, Any]) -> dict[str, Any]:
    # MessageToDict lists set fields first and defaults after them, so the key order would depend
    # on the values; .proto declaration order makes every line of a JSONL file read the same.
    ordered: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.name not in mapped:
            continue
        value = mapped[field.name]
        if isinstance(value, dict):  # a nested message (a Timestamp maps to a string, not a dict)
            value = _in_field_order(getattr(message, field.name), value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            value = [_in_field_order(m, v) for m, v in zip(getattr(message, field.name), value, strict=True)]
        ordered[field.name] = value
    return ordered


def event_to_json(event: UsageEvent) -> str:
    """One compact JSON line (no trailing newline); JSON escapes keep any newline inside values."""
    return json.dumps(event_to_dict(event), separators=(",", ":"), ensure_ascii=False)


def event_from_json(text: str | bytes) -> UsageEvent:
    """Parse a JSON event; unknown fields are ignored so that older readers accept newer events."""
    return json_format.Parse(text, UsageEvent(), ignore_unknown_fields=True)


def trace_id_of(traceparent: str, b3: str) -> str:
    """The call's trace id as 32 lowercase hex digits: from the W3C traceparent when it is valid,
    else from single-header B3 (``{trace}-{span}[-{sampled}[-{parent}]]``; a 64-bit trace id is
    left-padded to 128 bits as the B3 spec says), else "".

    Invalid headers give "" rather than a guess: a wrong trace id links an event to someone else's
    trace, which is worse than none.
    """
    match = _TRACEPARENT.match(traceparent.strip().lower())
    # Version ff is forbidden, version 00 has exactly four fields, all-zero ids are invalid.
    if (match and match[1] != "ff" and not (match[1] == "00" and match[5]) and match[2] != _ZERO_TRACE
            and match[3] != _ZERO_SPAN):
        return match[2]
    trace = b3.strip().lower().split("-", 1)[0]
    # A lone "0"/"1"/"d" is a sampling-only B3 header, not a trace; the regex rejects it.
    if "-" in b3 and _B3_TRACE_ID.match(trace):
        padded = trace.rjust(32, "0")
        if padded != _ZERO_TRACE:
            return padded
    return ""


def _timestamp(epoch_seconds: float) -> Timestamp | None:
    """A Timestamp for epoch seconds, or None (field left unset) when the time is unknown (0)."""
    if not epoch_seconds:
        return None
    stamp = Timestamp()
    # Microseconds: what time.time() resolves; nanoseconds would only carry float noise.
    stamp.FromMicroseconds(round(epoch_seconds * 1e6))
    return stamp


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)  # microsecond resolution, like the timestamps


def _uint32(value: int) -> int:
    # A negative or absurd count is a bug upstream; clamping keeps the event (and the call's
    # accounting) instead of failing to encode it.
    return min(max(0, int(value)), _UINT32_MAX)
