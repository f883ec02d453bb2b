"""What the journey is given and what it answers: the request as Envoy describes it, and a decision
(forward the request, changed as described, or answer the caller locally)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from extproc.base.apis import Api, ApiError
from extproc.core.peer import Peer
from extproc.telemetry.record import Hop


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str
    authority: str
    headers: Mapping[str, str]  # lower-case names, pseudo-headers excluded
    attributes: Mapping[str, object]
    peer: Peer | None = None  # the mTLS identity the processor's sidecar vouches for (XFCC), when verified


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request on, changed as described."""

    set_headers: tuple[tuple[str, str], ...]
    remove_headers: tuple[str, ...]
    body: bytes | None  # None: body unchanged
    metadata: Mapping[str, str]
    clear_route_cache: bool = True


@dataclass(frozen=True, slots=True)
class LocalReply:
    """Answer the caller directly; the request never leaves the mesh."""

    status: int
    body: bytes
    details: str  # short token for Envoy's %RESPONSE_CODE_DETAILS%
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    hops: tuple[Hop, ...] = ()  # providers tried (or skipped) before the processor answered itself

    def with_headers(self, *headers: tuple[str, str]) -> LocalReply:
        return LocalReply(self.status, self.body, self.details, (*self.headers, *headers), self.hops)


Decision = Forward | LocalReply


def reject(api: Api, error: ApiError) -> LocalReply:
    """The error in the caller's API format."""
    return LocalReply(error.kind.status, error.render(api), f"ai_{error.code}")
