"""The ``application/vnd.amazon.eventstream`` framing: an incremental decoder, and an encoder for tests.

AWS streams (Bedrock's ConverseStream among them) are binary frames, not SSE. One frame::

    total length (uint32) | headers length (uint32) | prelude CRC32 (of the 8 bytes before it)
    headers | payload | message CRC32 (of every byte before it)

all integers big-endian. A header is a name (uint8 length, UTF-8), a type byte, and a value of that
type: 0 true and 1 false (no value bytes), 2 byte, 3 short, 4 int, 5 long (signed, 1/2/4/8 bytes),
6 bytes and 7 string (uint16 length, then the bytes), 8 timestamp (int64 milliseconds since the epoch,
kept as that integer, as botocore does), 9 uuid (16 bytes, read as a :class:`uuid.UUID`).

Bytes arrive in arbitrary chunks, so :class:`EventStreamDecoder` holds the incomplete trailing frame
(``pending``) and returns each frame once its last byte has arrived. Both CRCs are checked: the
prelude's before the length is trusted (a corrupt length would otherwise make the decoder wait for
bytes that never come), the message's before anything is read from the frame. A frame that fails a
check raises :class:`EventStreamError`; the stream cannot be resynchronised after it (frames carry no
marker to find the next one), so the decoder refuses further input.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Final

__all__ = ["EventStreamDecoder", "EventStreamError", "HeaderValue", "Message", "encode"]

HeaderValue = bool | int | bytes | str | uuid.UUID

_PRELUDE: Final = struct.Struct(">III")
_PRELUDE_LENGTH: Final = 12
_CRC_LENGTH: Final = 4
_MIN_LENGTH: Final = _PRELUDE_LENGTH + _CRC_LENGTH  # a frame with neither headers nor payload
# AWS's own limits: a frame of at most 16 MiB, headers of at most 128 KiB. Anything larger is a corrupt
# length (the prelude CRC is only 32 bits), and waiting for it would hold the stream's memory hostage.
MAX_FRAME_LENGTH: Final = 16 * 1024 * 1024
MAX_HEADERS_LENGTH: Final = 128 * 1024

# Fixed-size integer header types: type byte → struct format (8, the timestamp, is an int64 too).
_INTEGERS: Final = {
    2: struct.Struct(">b"),
    3: struct.Struct(">h"),
    4: struct.Struct(">i"),
    5: struct.Struct(">q"),
    8: struct.Struct(">q"),
}
_UINT32: Final = struct.Struct(">I")
_UUID_LENGTH: Final = 16


class EventStreamError(ValueError):
    """A frame that is not valid ``application/vnd.amazon.eventstream`` (or a stream cut inside one).

    ``messages`` holds the frames the same chunk completed before the corrupt one, so that a reader can
    still pass them on before it ends the stream.
    """

    def __init__(self, message: str, messages: list[Message] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.messages: list[Message] = messages or []


@dataclass(frozen=True)
class Message:
    """One decoded frame: its headers (in order, each name once) and its payload bytes."""

    headers: dict[str, HeaderValue] = field(default_factory=dict)
    payload: bytes = b""

    def header(self, name: str) -> str | None:
        """The string header ``name``; None if absent or of another type."""
        value = self.headers.get(name)
        return value if isinstance(value, str) else None


class EventStreamDecoder:
    """Incremental decoder: ``feed`` returns the frames a chunk completes, in order."""

    __slots__ = ("_broken", "_pending")

    def __init__(self) -> None:
        self._pending = b""
        self._broken = False

    @property
    def pending(self) -> bytes:
        """The held bytes: the start of a frame whose last byte has not arrived yet."""
        return self._pending

    def feed(self, chunk: bytes) -> list[Message]:
        """The frames ``chunk`` completes. Raises :class:`EventStreamError` at the first corrupt frame, with
        the frames completed before it on the exception; every later call raises too."""
        if self._broken:
            raise EventStreamError("the event stream is already broken by an earlier corrupt frame")
        # Immutable bytes, so views into them never pin a buffer that has to be resized.
        buffer = self._pending + chunk if self._pending else chunk
        view = memoryview(buffer)
        messages: list[Message] = []
        start = 0
        try:
            while len(buffer) - start >= _PRELUDE_LENGTH:
                total = _frame_length(view[start : start + _PRELUDE_LENGTH])
                if len(buffer) - start < total:
                    break
                messages.append(_frame(view[start : start + total]))
                start += total
        except EventStreamError as exc:
            self._broken = True
            self._pending = b""
            raise EventStreamError(exc.message, messages) from None
        self._pending = buffer[start:] if start else buffer
        return messages

    def finish(self) -> None:
        """End of the stream: raises :class:`EventStreamError` if part of a frame is still held."""
        held, self._pending = len(self._pending), b""
        if held:
            raise EventStreamError(f"the event stream ended inside a frame ({held} bytes of it received)")


def _frame_length(prelude: memoryview) -> int:
    """The total length a prelude announces, once its CRC and the lengths' bounds are checked."""
    total, headers_length, prelude_crc = _PRELUDE.unpack(prelude)
    computed = zlib.crc32(prelude[:8])
    if computed != prelude_crc:
        raise EventStreamError(f"prelude checksum mismatch (expected 0x{prelude_crc:08x}, computed 0x{computed:08x})")
    if not _MIN_LENGTH <= total <= MAX_FRAME_LENGTH:
        raise EventStreamError(f"frame length {total} is outside {_MIN_LENGTH}..{MAX_FRAME_LENGTH} bytes")
    if headers_length > MAX_HEADERS_LENGTH or headers_length > total - _MIN_LENGTH:
        raise EventStreamError(f"headers length {headers_length} does not fit a frame of {total} bytes")
    return int(total)


def _frame(frame: memoryview) -> Message:
    """A whole frame (prelude already checked) → its message, once the message CRC matches."""
    end = len(frame) - _CRC_LENGTH
    (message_crc,) = _UINT32.unpack_from(frame, end)
    computed = zlib.crc32(frame[:end])
    if computed != message_crc:
        raise EventStreamError(f"message checksum mismatch (expected 0x{message_crc:08x}, computed 0x{computed:08x})")
    (headers_length,) = _UINT32.unpack_from(frame, 4)
    headers_end = _PRELUDE_LENGTH + headers_length
    headers = _headers(frame[_PRELUDE_LENGTH:headers_end])
    return Message(headers, bytes(frame[headers_end:end]))


def _headers(data: memoryview) -> dict[str, HeaderValue]:
    headers: dict[str, HeaderValue] = {}
    at = 0
    while at < len(data):
        name, at = _string(data, at, 1, "a header name")
        what = f"header {name!r}"
        _need(data, at, 1, what)
        value, at = _value(data, at + 1, data[at], what)
        if name in headers:
            raise EventStreamError(f"{what} appears twice")
        headers[name] = value
    return headers


def _value(data: memoryview, at: int, kind: int, what: str) -> tuple[HeaderValue, int]:
    """The value of type ``kind`` starting at ``at`` (of the header ``what``), and where the next header starts."""
    if kind in (0, 1):
        return kind == 0, at
    if kind in _INTEGERS:
        reader = _INTEGERS[kind]
        value: int = reader.unpack_from(data, _need(data, at, reader.size, what))[0]
        return value, at + reader.size
    if kind == 6:
        return _bytes(data, at, 2, what)
    if kind == 7:
        return _string(data, at, 2, what)
    if kind == 9:
        start = _need(data, at, _UUID_LENGTH, what)
        return uuid.UUID(bytes=bytes(data[start : start + _UUID_LENGTH])), at + _UUID_LENGTH
    raise EventStreamError(f"{what} has unknown type {kind}")


def _need(data: memoryview, at: int, size: int, what: str) -> int:
    """``at``, once ``size`` bytes are there to read from it."""
    if at + size > len(data):
        raise EventStreamError(f"{what} is cut short")
    return at


def _bytes(data: memoryview, at: int, length_size: int, what: str) -> tuple[bytes, int]:
    """A byte string at ``at`` with a 1- or 2-byte big-endian length before it, and where it ends."""
    _need(data, at, length_size, what)
    length = data[at] if length_size == 1 else (data[at] << 8) | data[at + 1]
    start = _need(data, at + length_size, length, what)
    return bytes(data[start : start + length]), start + length


def _string(data: memoryview, at: int, length_size: int, what: str) -> tuple[str, int]:
    raw, at = _bytes(data, at, length_size, what)
    try:
        return raw.decode("utf-8"), at
    except UnicodeDecodeError:
        raise EventStreamError(f"{what} is not UTF-8") from None


def encode(headers: dict[str, str], payload: bytes) -> bytes:
    """One frame with string headers (type 7) and ``payload``: what AWS sends, for tests and mocks."""
    encoded = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        if not 0 < len(raw_name) < 256 or len(raw_value) > 0xFFFF:
            raise ValueError(f"header {name!r} is too long for the event-stream format")
        encoded += bytes((len(raw_name),)) + raw_name + b"\x07" + struct.pack(">H", len(raw_value)) + raw_value
    total = _MIN_LENGTH + len(encoded) + len(payload)
    if total > MAX_FRAME_LENGTH or len(encoded) > MAX_HEADERS_LENGTH:
        raise ValueError(f"a frame of {total} bytes is over the event-stream limits")
    prelude = struct.pack(">II", total, len(encoded))
    frame = prelude + _UINT32.pack(zlib.crc32(prelude)) + bytes(encoded) + payload
    return frame + _UINT32.pack(zlib.crc32(frame))
