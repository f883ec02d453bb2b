"""The signed tokens (extproc/base/tokens.py): a round trip, expiry, a tampered body or mac, another key,
garbage, a genuine mac over a payload that is not a token's, and the shortest key allowed."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from extproc.base.tokens import Signer
from tests.unit.resilience_support import SIGNING_KEY


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign_raw(body: bytes, key: bytes = SIGNING_KEY) -> str:
    """A token with a genuine signature over an arbitrary body."""
    return f"v1.{_b64(body)}.{_b64(hmac.new(key, b'v1' + body, hashlib.sha256).digest()[:20])}"


def test_signer_round_trip() -> None:
    signer = Signer(SIGNING_KEY)
    payload = {"a": 1, "b": "two", "c": [1.5, None], "d": {"e": True}}
    token = signer.sign(payload, ttl_s=60, now=1000.0)
    assert token.startswith("v1.") and token.count(".") == 2
    assert signer.verify(token, now=1000.0) == payload
    assert signer.verify(token, now=1060.0) == payload  # valid up to and including its expiry
    assert Signer(SIGNING_KEY).verify(token, now=1030.0) == payload  # any replica with the key


def test_signer_expired_token_is_refused() -> None:
    signer = Signer(SIGNING_KEY)
    token = signer.sign({"a": 1}, ttl_s=60, now=1000.0)
    assert signer.verify(token, now=1060.5) is None
    assert signer.verify(token, now=5000.0) is None


def test_signer_tampered_body_or_mac_is_refused() -> None:
    signer = Signer(SIGNING_KEY)
    version, body, mac = signer.sign({"service": "a"}, ttl_s=60, now=1000.0).split(".")
    _, other_body, other_mac = signer.sign({"service": "b"}, ttl_s=60, now=1000.0).split(".")
    assert signer.verify(f"{version}.{body}.{mac}", now=1000.0) == {"service": "a"}
    assert signer.verify(f"{version}.{other_body}.{mac}", now=1000.0) is None
    assert signer.verify(f"{version}.{body}.{other_mac}", now=1000.0) is None
    assert signer.verify(f"{version}.{body}.{'A' if mac[0] != 'A' else 'B'}{mac[1:]}", now=1000.0) is None
    assert signer.verify(f"{version}.{body}.{mac[:-4]}", now=1000.0) is None  # a truncated mac
    assert signer.verify(f"v2.{body}.{mac}", now=1000.0) is None


def test_signer_wrong_key_is_refused() -> None:
    token = Signer(SIGNING_KEY).sign({"a": 1}, ttl_s=60, now=1000.0)
    assert Signer(b"x" * 32).verify(token, now=1000.0) is None


@pytest.mark.parametrize("token", [
    "", ".", "..", "v1", "v1.", "v1..", "v1.a.b", "v1.a.b.c", "a.b.c", "v1.!!!.???", "v1.é.é", "v1.a",
    "not a token at all", "v1.eyJhIjoxfQ", "v1.eyJhIjoxfQ.",
])
def test_signer_garbage_is_refused(token: str) -> None:
    assert Signer(SIGNING_KEY).verify(token, now=1000.0) is None


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"7", b'{"a": 1}', b'{"a": 1, "exp": "soon"}', b"{not json"])
def test_signer_genuine_mac_over_a_bad_payload_is_refused(body: bytes) -> None:
    """Not a JSON object, no expiry, or an expiry that is not a number: refused even with a valid mac."""
    assert Signer(SIGNING_KEY).verify(_sign_raw(body), now=1000.0) is None


def test_signer_key_shorter_than_16_bytes_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Signer(b"x" * 15)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Signer(b"")
    Signer(b"x" * 16)  # the minimum is accepted
