"""Published/dropped counts of the event sinks: exact integers on the sink (for tests and logs),
mirrored into Prometheus counters when a registry is given.

The Prometheus counters exist once per registry however many sinks share it (a second
``Counter(...)`` of the same name on one registry raises), hence the per-registry cache.
"""

from __future__ import annotations

import threading
import weakref
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter

_FAMILIES: weakref.WeakKeyDictionary[CollectorRegistry, tuple[Counter, Counter]] = weakref.WeakKeyDictionary()
_FAMILIES_LOCK = threading.Lock()


def _families(registry: CollectorRegistry) -> tuple[Counter, Counter]:
    with _FAMILIES_LOCK:
        families = _FAMILIES.get(registry)
        if families is None:
            families = (
                Counter("ai_extproc_events_published", "Usage events delivered by a sink (acknowledged by "
                        "JetStream, or written to the file).", ["sink"], registry=registry),
                Counter("ai_extproc_events_dropped", "Usage events lost by a sink: its queue was full, "
                        "delivery failed, or it was closing.", ["sink"], registry=registry),
            )
            _FAMILIES[registry] = families
        return families


class SinkCounters:
    """Counts for one sink. Thread-safe: the JSONL writer counts from its own thread."""

    def __init__(self, sink: str, registry: CollectorRegistry | None = None) -> None:
        self.published = 0
        self.dropped = 0
        self._lock = threading.Lock()
        if registry is None:
            self._published_metric = self._dropped_metric = None
        else:
            published, dropped = _families(registry)
            self._published_metric = published.labels(sink=sink)
            self._dropped_metric = dropped.labels(sink=sink)

    def add_published(self, n: int = 1) -> None:
        if n <= 0:
            return
        with self._lock:
            self.published += n
        if self._published_metric is not None:
            self._published_metric.inc(n)

    def add_dropped(self, n: int = 1) -> None:
        if n <= 0:
            return
        with self._lock:
            self.dropped += n
        if self._dropped_metric is not None:
            self._dropped_metric.inc(n)


class _Sized(Protocol):
    def qsize(self) -> int: ...


class CountedSink:
    """The counts every event sink reports, from its ``counts`` and its ``_queue``."""

    counts: SinkCounters
    _queue: _Sized

    @property
    def published(self) -> int:
        return self.counts.published

    @property
    def dropped(self) -> int:
        return self.counts.dropped

    @property
    def queued(self) -> int:
        return self._queue.qsize()
