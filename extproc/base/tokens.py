"""Signed state that travels with a request between processor replicas.

A fallback hop re-enters the processor through an Envoy internal redirect, and an asynchronous
job is executed later by a worker; both carry facts the first decision established (quota already
charged, the chain position, the submitting service) in a request header. Callers could forge
such a header, so its content is signed with a key every replica shares (HMAC-SHA256) and expires.
A token that fails verification is treated as absent, never trusted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path

import orjson

log = logging.getLogger(__name__)

KEY_ENV = "EXTPROC_SIGNING_KEY"
KEY_FILE_ENV = "EXTPROC_SIGNING_KEY_FILE"
_VERSION = b"v1"


class Signer:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the signing key must be at least 16 bytes")
        self._key = key

    @classmethod
    def from_environment(cls) -> Signer:
        """The key from ``EXTPROC_SIGNING_KEY`` or the file named by ``EXTPROC_SIGNING_KEY_FILE``.

        Without either, a random key is made: fine for one replica, but a token signed by one
        replica is then refused by the others (a fallback hop or job landing there fails closed).
        """
        value = os.environ.get(KEY_ENV, "")
        path = os.environ.get(KEY_FILE_ENV, "")
        if path:
            value = Path(path).read_text().strip()
        if value:
            return cls(value.encode())
        log.warning("no %s or %s set: using a random signing key; with more than one processor replica, "
                    "fallback hops and async jobs need a shared key", KEY_ENV, KEY_FILE_ENV)
        return cls(secrets.token_bytes(32))

    def sign(self, payload: dict[str, object], ttl_s: float, now: float | None = None) -> str:
        body = orjson.dumps({**payload, "exp": round((now or time.time()) + ttl_s, 3)})
        mac = hmac.new(self._key, _VERSION + body, hashlib.sha256).digest()[:20]
        return f"{_VERSION.decode()}.{_b64(body)}.{_b64(mac)}"

    def verify(self, token: str, now: float | None = None) -> dict[str, object] | None:
        """The payload of a genuine, unexpired token; None for anything else."""
        try:
            version, body_b64, mac_b64 = token.split(".")
            if version.encode() != _VERSION:
                return None
            body = _unb64(body_b64)
            expected = hmac.new(self._key, _VERSION + body, hashlib.sha256).digest()[:20]
            if not hmac.compare_digest(expected, _unb64(mac_b64)):
                return None
            payload = orjson.loads(body)
        except (ValueError, orjson.JSONDecodeError):
            return None
        if not isinstance(payload, dict):
            return None
        expiry = payload.pop("exp", None)
        if not isinstance(expiry, int | float) or expiry < (now or time.time()):
            return None
        return payload


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
