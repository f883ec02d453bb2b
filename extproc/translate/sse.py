"""Server-sent events: the one incremental parser every reader of a provider's stream uses, and the writers.

The usage tracker (``extproc.core.usage``) and the stream translators read provider streams with
:class:`SseParser`; when a stream is translated, the translator's parser is the only one and the tracker
reads the same :class:`SseEvent` objects (their JSON is decoded once too, :meth:`SseEvent.json`). The
tracker alone reads ``blocks``: the same parse as plain tuples, with blocks that are not events.

Provider bytes arrive in arbitrary chunks, so an event is only dispatched once its blank line has
arrived; the incomplete trailing event is the only thing held. Both ``\\n`` and ``\\r\\n`` line endings
are accepted, mixed freely (the SSE spec also allows a lone ``\\r``, which no provider sends and which
would force holding every trailing ``\\r`` back for a byte). Fields are read as the spec says: ``data``
lines joined with ``\\n``, the last ``event`` line names the event, one space after the colon is dropped,
comments (``: keep-alive``), ``id``, ``retry`` and unknown fields are skipped, and a block without data
lines (a bare ``event: ping``, a comment) is not an event. ``[DONE]`` is data like any other; what it
means is the reader's business.

An unterminated event at the end of the stream is dropped, as the spec says and as a client does,
unless the reader asks for it with :meth:`SseParser.finish` (the usage tracker does: a provider that
ends without the final blank line may still have sent its usage there).
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["Block", "SseEvent", "SseParser", "data_event", "named_event"]

_UNDECODED: Any = object()
Block = tuple[str | None, bytes | None, bytes]  # (event, data, raw) as SseParser.blocks returns them


class SseEvent:
    """One event: its ``event`` name, its ``data`` and its ``raw`` bytes as received, blank line included.

    ``event`` is None without an ``event:`` line (OpenAI sends none). ``data`` is the data lines joined
    with ``\\n``; it is None only for a block that is not an event (no data line), which only
    :meth:`SseParser.finish` returns.
    """

    __slots__ = ("_json", "data", "event", "raw")

    def __init__(self, event: str | None, data: bytes | None, raw: bytes = b"") -> None:
        self.event = event
        self.data = data
        self.raw = raw
        self._json = _UNDECODED

    def json(self) -> Any:
        """The data decoded as JSON, once however many readers ask (none of them may change it).

        Raises ``orjson.JSONDecodeError`` (a ``ValueError``) if the data is not JSON, or if there is none.
        """
        value = self._json
        if value is _UNDECODED:
            value = self._json = orjson.loads(self.data or b"")  # no data: not JSON either
        return value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SseEvent):
            return NotImplemented
        return (self.event, self.data, self.raw) == (other.event, other.data, other.raw)

    __hash__ = None  # type: ignore[assignment]  # mutable (the decoded JSON is cached)

    def __repr__(self) -> str:
        return f"SseEvent(event={self.event!r}, data={self.data!r}, raw={self.raw!r})"


_NAMES: dict[bytes, str] = {}  # an event line's bytes after the colon → the name: providers use a dozen


def _new_name(field: bytes) -> str:
    """The event name from an ``event:`` line's bytes after the colon (its ``\\r`` and one leading space go)."""
    value = field[:-1] if field.endswith(b"\r") else field
    name = (value[1:] if value.startswith(b" ") else value).decode("utf-8", "replace")
    if len(_NAMES) < 256:
        _NAMES[field] = name
    return name


def _block(raw: bytes) -> Block:
    """(event, data, raw) of one block: its lines up to its blank line (at the end of a stream, without)."""
    # The shapes providers send take a find or two: OpenAI's single data line; Anthropic's and the
    # Responses API's name line, then data line. A data line ends at most three bytes from the end (LF LF,
    # LF CR LF) only if nothing but the blank line follows it.
    if raw.startswith(b"data:"):
        end = raw.find(b"\n")
        if end >= len(raw) - 3:
            if raw[end - 1] == 13:  # \r
                end -= 1
            return None, raw[6:end] if raw[5] == 32 else raw[5:end], raw  # 32: the space after the colon
    elif raw.startswith(b"event:"):
        name_end = raw.find(b"\n")
        start = name_end + 6
        if raw.startswith(b"data:", name_end + 1):
            end = raw.find(b"\n", start)
            if end >= len(raw) - 3:
                if raw[end - 1] == 13:
                    end -= 1
                if raw[start] == 32:
                    start += 1
                field = raw[6:name_end]
                return _NAMES.get(field) or _new_name(field), raw[start:end], raw
    return _lines(raw)


def _lines(raw: bytes) -> Block:
    """A block of any shape, line by line: comments, id and retry lines, multi-line data, leading blank
    lines (a blank line before any data ends an empty block, dispatching nothing)."""
    name: str | None = None
    data: list[bytes] = []
    for line in raw.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            if data:
                break  # the blank line that ends the event
            name = None
            continue
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    return name, b"\n".join(data) if data else None, raw


class SseParser:
    """Incremental SSE parser: ``feed`` returns the events completed by a chunk, in order."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    @property
    def pending(self) -> bytes:
        """The held bytes: the start of an event whose blank line has not arrived yet."""
        return self._pending

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events ``chunk`` completes (blocks without data are not events, per the spec)."""
        return [SseEvent(name, data, raw) for name, data, raw in self.blocks(chunk, every_block=False)]

    def blocks(self, chunk: bytes, *, every_block: bool = True) -> list[Block]:
        """What ``feed`` returns as plain ``(event, data, raw)`` tuples: for a reader of every byte.

        The cheapest form (no object per event, no JSON cache). With ``every_block``, blocks without data
        (``data`` None) too, so that the ``raw`` bytes are everything fed but ``pending``: for a reader that
        forwards the stream byte for byte as it goes (a keep-alive comment goes out at once too).
        """
        pending = self._pending
        if pending:
            # Zero-copy in the usual case where chunks end on event boundaries; a long event split into
            # many small chunks costs a re-concatenation per chunk.
            buffer = pending + chunk
            at = buffer.find(b"\n", max(len(pending) - 2, 0))  # a separator may straddle the two
        else:
            buffer = chunk
            at = buffer.find(b"\n")
        # A block ends at a blank line: LF LF or LF CR LF. Single-byte finds step over the newlines at
        # memchr speed, which beats a two-byte substring search: compact JSON has no raw newlines, so
        # events have one or two lines.
        blocks: list[Block] = []
        append = blocks.append
        find = buffer.find
        last = len(buffer) - 1
        start = 0
        while 0 <= at < last:
            following = buffer[at + 1]
            if following == 10:  # \n
                end = at + 2
            elif following == 13 and at + 1 < last and buffer[at + 2] == 10:  # \r\n
                end = at + 3
            else:
                at = find(b"\n", at + 1)
                continue
            block = _block(buffer[start:end])
            if every_block or block[1] is not None:
                append(block)
            start = end
            at = find(b"\n", end)
        self._pending = buffer[start:] if start else buffer
        return blocks

    def finish(self) -> SseEvent | None:
        """End of the stream: the held block read as if its blank line had come (its last line counting as
        whole), or None if nothing is held. Its ``data`` is None if it holds no data line; what it holds
        may be cut mid-line. A client drops it: call this only to read what a provider left unterminated.
        """
        pending = self._pending
        if not pending:
            return None
        # With a blank line after it, what is held is exactly one block (and at most a byte more, dropped).
        name, data, _ = self.blocks(b"\n\n")[0]
        self._pending = b""
        return SseEvent(name, data, pending)


def data_event(payload: Any) -> bytes:
    """An OpenAI-style event: a single data line, no event name."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def named_event(name: str, payload: Any) -> bytes:
    """An Anthropic-style event: the event name repeated from the payload's `type`."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
