"""The usage-event sinks and how the server builds them.

Both sinks are ``CallSink``s (extproc/telemetry/record.py) with the same lifecycle::

    sinks = build_event_sinks(nats_url, jsonl_path, metrics.registry)
    for sink in sinks:
        await sink.start()        # returns at once, even with NATS down
    ...
    sink.emit(record)             # per finished call: never blocks, never raises
    ...
    for sink in sinks:
        await sink.close(timeout)  # flushes what it can within timeout, counts the rest as dropped
"""

from __future__ import annotations

import os
from typing import Protocol

from prometheus_client import CollectorRegistry

from extproc.events.jsonl_sink import JsonlEventSink
from extproc.events.nats_sink import DEFAULT_MAX_AGE_S, NatsEventSink
from extproc.events.subjects import DEFAULT_PREFIX, DEFAULT_STREAM
from extproc.telemetry.record import CallRecord

__all__ = ["EventSink", "JsonlEventSink", "NatsEventSink", "build_event_sinks"]


class EventSink(Protocol):
    """What the server needs of an event sink: ``CallSink`` plus a lifecycle and counts."""

    name: str

    def emit(self, record: CallRecord) -> None: ...

    async def start(self) -> None: ...

    async def close(self, timeout: float = 5.0) -> None: ...

    @property
    def published(self) -> int: ...

    @property
    def dropped(self) -> int: ...


def build_event_sinks(nats_url: str | None, jsonl_path: str | os.PathLike[str] | None,
                      registry: CollectorRegistry | None = None, *, prefix: str = DEFAULT_PREFIX,
                      stream: str = DEFAULT_STREAM, max_age_s: float = DEFAULT_MAX_AGE_S,
                      create_stream: bool = True, queue_size: int = 10_000, ack_timeout_s: float = 1.0,
                      json_payload: bool = False) -> list[EventSink]:
    """The configured sinks (none, one or both), not yet started. Raises ValueError for a bad
    prefix or size, so that configuration mistakes stop the server at startup."""
    sinks: list[EventSink] = []
    if nats_url:
        sinks.append(NatsEventSink(nats_url, registry=registry, prefix=prefix, stream=stream, max_age_s=max_age_s,
                                   create_stream=create_stream, queue_size=queue_size,
                                   ack_timeout_s=ack_timeout_s, json_payload=json_payload))
    if jsonl_path:
        sinks.append(JsonlEventSink(jsonl_path, registry=registry, queue_size=queue_size))
    return sinks
