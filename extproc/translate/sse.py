"""Server-sent-event framing shared by both stream translators.

Provider bytes arrive in arbitrary chunks, so lines are only interpreted once their newline has
arrived and an event is only dispatched at its blank line; the incomplete tail is the only thing held.
Both ``\\n`` and ``\\r\\n`` line endings are accepted (the SSE spec also allows a lone ``\\r``, which
neither provider sends and which would force holding every trailing ``\\r`` back for a byte).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["SseEvent", "SseParser", "data_event", "named_event"]


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str | None  # the `event:` field; OpenAI sends none
    data: bytes  # the data lines joined with \n, as the SSE spec says


class SseParser:
    """Incremental SSE parser: ``feed`` returns the events completed by a chunk."""

    def __init__(self) -> None:
        self._tail = b""
        self._event: str | None = None
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buffer = self._tail + chunk if self._tail else chunk
        events: list[SseEvent] = []
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                # An event without data lines (a bare `event: ping`, say) is not dispatched, per the spec.
                if self._data:
                    events.append(SseEvent(self._event, b"\n".join(self._data)))
                self._event, self._data = None, []
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value.decode("utf-8", "replace")
            # Comments (`: keep-alive`), `id:` and `retry:` carry nothing a translation needs.
        self._tail = buffer[start:]
        return events


def data_event(payload: Any) -> bytes:
    """An OpenAI-style event: a single data line, no event name."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def named_event(name: str, payload: Any) -> bytes:
    """An Anthropic-style event: the event name repeated from the payload's `type`."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
