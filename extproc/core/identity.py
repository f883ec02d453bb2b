"""Who is calling: the workload behind the sidecar, from Envoy attributes of its node metadata.

Istio fills the sidecar's node metadata (NAMESPACE, WORKLOAD_NAME, LABELS, SERVICE_ACCOUNT); a
standalone Envoy carries the same keys statically. The values are requested as CEL attribute
expressions; the strings below are both the filter config (``request_attributes``) and the keys
Envoy sends back, so they are defined once, here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from extproc.core.peer import Peer
from extproc.policy.model import IdentitySettings

ATTR_NAMESPACE = "xds.node.metadata.NAMESPACE"
ATTR_WORKLOAD = "xds.node.metadata.WORKLOAD_NAME"
ATTR_APP = "xds.node.metadata.LABELS.app"
ATTR_SERVICE_ACCOUNT = "xds.node.metadata['SERVICE_ACCOUNT']"

# (Envoy 1.40 fails to parse ``LABELS['app.kubernetes.io/name']`` and logs it on every request, so
# the caller's name comes from the ``app`` label, else the workload name.)
REQUEST_ATTRIBUTES: tuple[str, ...] = (ATTR_NAMESPACE, ATTR_WORKLOAD, ATTR_APP, ATTR_SERVICE_ACCOUNT)


@dataclass(frozen=True, slots=True)
class Caller:
    service: str | None
    namespace: str | None
    service_account: str | None
    source: str  # "node" (sidecar metadata) or "header" (trusted identity header)

    def describe(self) -> str:
        name = self.service or "unidentified caller"
        return f"{self.namespace}/{name}" if self.namespace else name


def _text(attributes: Mapping[str, object], key: str) -> str | None:
    value = attributes.get(key)
    return value if isinstance(value, str) and value else None


def identify(attributes: Mapping[str, object], headers: Mapping[str, str], settings: IdentitySettings) -> Caller:
    namespace = _text(attributes, ATTR_NAMESPACE)
    account = _text(attributes, ATTR_SERVICE_ACCOUNT)
    if settings.trust_header:
        claimed = headers.get(settings.header, "").strip()
        if claimed:
            ns, _, name = claimed.rpartition("/")
            return Caller(name or None, ns or namespace, account, "header")
    service = _text(attributes, ATTR_APP) or _text(attributes, ATTR_WORKLOAD)
    return Caller(service, namespace, account, "node")


def bind_to_peer(caller: Caller, peer: Peer, accounts: tuple[str, ...] | None) -> Caller | str:
    """The caller, checked against the mTLS identity its connection carries; or why it may not act so.

    Node metadata may only narrow the peer identity, never contradict it: a claimed namespace or
    service account must be the peer's own. The service the caller acts as must then name the peer's
    service account (``accounts`` from its policy: ``name`` in the caller's namespace, or
    ``namespace/name``); without a policy list, only the account named like the service may.
    """
    if caller.source == "node":
        if caller.namespace is not None and caller.namespace != peer.namespace:
            return f"claims namespace {caller.namespace!r} but its mTLS identity is {peer.describe()}"
        if caller.service_account is not None and caller.service_account != peer.service_account:
            return (f"claims service account {caller.service_account!r} but its mTLS identity is "
                    f"{peer.describe()}")
    namespace = caller.namespace or peer.namespace
    service = caller.service or ""
    allowed = accounts if accounts is not None else (service,)
    own = f"{peer.namespace}/{peer.service_account}"
    if not any(a == own or (a == peer.service_account and namespace == peer.namespace) for a in allowed):
        return (f"may not act as {namespace}/{service or 'unidentified'}: its mTLS identity is {peer.describe()}, "
                f"and that service's policy allows {', '.join(allowed) or 'no service account'}")
    return Caller(caller.service, namespace, peer.service_account, caller.source)
