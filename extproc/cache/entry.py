"""A stored response, framed so that a corrupt or truncated entry is detected and never served."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import orjson

_MAGIC = b"AIC1"


@dataclass(frozen=True, slots=True)
class CacheEntry:
    status: int
    content_type: str
    body: bytes
    input_tokens: int
    output_tokens: int
    created_at: float

    def age_s(self, now: float | None = None) -> int:
        return max(0, int((now if now is not None else time.time()) - self.created_at))

    def encode(self) -> bytes:
        header = orjson.dumps({
            "status": self.status, "content_type": self.content_type, "in": self.input_tokens,
            "out": self.output_tokens, "created_at": self.created_at, "length": len(self.body),
            "sha256": hashlib.sha256(self.body).hexdigest(),
        })
        return _MAGIC + len(header).to_bytes(4, "big") + header + self.body


def decode_entry(raw: bytes, max_bytes: int) -> CacheEntry | None:
    """The entry, or None if it is not one of ours, damaged, or larger than allowed."""
    if len(raw) > max_bytes + 4096 or not raw.startswith(_MAGIC) or len(raw) < 8:
        return None
    size = int.from_bytes(raw[4:8], "big")
    try:
        header = orjson.loads(raw[8:8 + size])
        body = raw[8 + size:]
        if len(body) != header["length"] or len(body) > max_bytes:
            return None
        if hashlib.sha256(body).hexdigest() != header["sha256"]:
            return None
        return CacheEntry(int(header["status"]), str(header["content_type"]), body, int(header["in"]),
                          int(header["out"]), float(header["created_at"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
