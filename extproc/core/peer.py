"""The caller's mTLS identity, as the processor's own sidecar vouches for it.

In the mesh every connection to the processor arrives through its Istio sidecar, which terminates
mTLS and forwards the peer certificate's SPIFFE identity in ``x-forwarded-client-cert`` (XFCC).
That identity, unlike the node metadata a sidecar sends in its ext_proc attributes, cannot be
claimed by whoever opens a stream: it is what the decision binds the caller to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

_SPIFFE = "spiffe://"


@dataclass(frozen=True, slots=True)
class Peer:
    trust_domain: str
    namespace: str
    service_account: str

    @property
    def spiffe_id(self) -> str:
        return f"{_SPIFFE}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def describe(self) -> str:
        return f"{self.namespace}/{self.service_account} ({self.spiffe_id})"


def from_spiffe_id(uri: str) -> Peer | None:
    """``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``, Istio's workload identity form."""
    if not uri.startswith(_SPIFFE):
        return None
    domain, _, path = uri[len(_SPIFFE):].partition("/")
    parts = path.split("/")
    if not domain or len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa" or not parts[1] or not parts[3]:
        return None
    return Peer(domain, parts[1], parts[3])


def _elements(value: str) -> list[str]:
    """XFCC elements (comma-separated, commas inside quotes kept)."""
    elements, current, quoted, escaped = [], [], False, False
    for char in value:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == '"':
            current.append(char)
            quoted = not quoted
        elif char == "," and not quoted:
            elements.append("".join(current))
            current = []
        else:
            current.append(char)
    elements.append("".join(current))
    return [e.strip() for e in elements if e.strip()]


def _pairs(element: str) -> Iterable[tuple[str, str]]:
    key: list[str] = []
    value: list[str] = []
    in_value, quoted = False, False
    for char in element + ";":
        if char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            yield "".join(key).strip().lower(), "".join(value).strip()
            key, value, in_value = [], [], False
        elif char == "=" and not in_value and not quoted:
            in_value = True
        elif in_value:
            value.append(char)
        else:
            key.append(char)


def from_xfcc(value: str) -> Peer | None:
    """The immediate peer from an XFCC header: its last element, which the nearest proxy wrote.

    Istio's sidecar either replaces the header (SANITIZE_SET) or appends its own element (APPEND_FORWARD):
    in both cases the last element is the one this processor's own sidecar vouches for, and anything
    before it came from further away and is not trusted.
    """
    elements = _elements(value)
    if not elements:
        return None
    uris = [v for k, v in _pairs(elements[-1]) if k == "uri"]
    return from_spiffe_id(uris[-1]) if uris else None
