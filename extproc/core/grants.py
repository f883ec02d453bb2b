"""Grants: what a sidecar's decision carries instead of a provider key (credential injection at the gateway).

In the Istio install the decision never hands a key to the caller's sidecar, whose network namespace
the application shares. It signs a short-lived, single-use grant for exactly this call: the provider,
the caller's identity, the body it decided on. The egress gateway's credential filter sends the grant
(and the body) to the processor's credential port, which checks it and answers with the key, added
only at the gateway. A grant obtained by an application that talks to the decision port itself buys
nothing it could not get through its sidecar: the same call, once, under the same policy.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from extproc.base.apis import ApiError, ErrorKind
from extproc.base.tokens import Signer
from extproc.core.credentials import CredentialStore
from extproc.core.inflight import InFlightStore
from extproc.core.peer import Peer
from extproc.core.provider_request import credential_headers

if TYPE_CHECKING:
    from extproc.core.cloud_auth import CloudAuth
    from extproc.policy.compiled import PolicySet
    from extproc.policy.model import Provider

ANY_BODY = "*"  # a grant for a path the policy allows without reading its body (files, batches)


def in_mesh(host: str, cluster_domain: str = "cluster.local") -> bool:
    """Whether a provider host is a Kubernetes Service of the mesh (``*.svc``, ``*.svc.<cluster domain>``)
    or otherwise cluster-local (``*.local``) rather than a host outside it. The renderer (what goes through
    the egress gateway) and the decision (who adds the key) use this one rule."""
    host = host.split(":", 1)[0].lower().rstrip(".")
    return host.endswith((".svc", f".svc.{cluster_domain.lower()}", ".local"))


def through_gateway(provider: Provider, cluster_domain: str = "cluster.local") -> bool:
    """Whether the provider is reached through the egress gateway: hosts outside the mesh. An in-mesh
    server is reached directly, so its credential, if it has one, is added by the caller's sidecar
    (prefer mesh authorization to keys for in-mesh servers)."""
    return not in_mesh(provider.authority, cluster_domain)


def body_digest(body: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(body).digest()[:18]).decode()


@dataclass(frozen=True, slots=True)
class Grant:
    provider: str  # the provider entry whose credential is granted
    authority: str  # the host the call must go to
    namespace: str  # of the workload whose sidecar will present it (its mTLS peer, when verified)
    service: str  # the service the call is charged to (a job's submitter when a worker replays it)
    service_account: str  # of the presenting workload ("" when not known)
    nonce: str  # single use: the credential port remembers it
    body: str  # body_digest of the request the decision forwarded (ANY_BODY for an allowed path)
    method: str  # the request the decision let through: a grant for GET /v1/models buys nothing else
    path: str

    def encode(self, signer: Signer, ttl_s: float) -> str:
        return signer.sign({"gp": self.provider, "ga": self.authority, "ns": self.namespace, "sv": self.service,
                            "sa": self.service_account, "n": self.nonce, "bh": self.body, "gm": self.method,
                            "gh": self.path}, ttl_s)

    @classmethod
    def decode(cls, token: str, signer: Signer) -> Grant | None:
        raw = signer.verify(token)
        if raw is None or "gp" not in raw:  # another kind of token signed by the same key is not a grant
            return None
        try:
            return cls(str(raw["gp"]), str(raw["ga"]), str(raw["ns"]), str(raw["sv"]), str(raw["sa"]),
                       str(raw["n"]), str(raw["bh"]), str(raw["gm"]), str(raw["gh"]))
        except KeyError:
            return None


async def redeem(token: str, *, method: str, path: str, authority: str, body: bytes, peer: Peer | None, signer: Signer,
                 inflight: InFlightStore, credentials: CredentialStore, policy: PolicySet, cloud: CloudAuth
                 ) -> list[tuple[str, str]] | ApiError:
    """The credential header for a genuine, unused grant presented for its own call; else why not.

    ``peer`` is the caller's sidecar as the gateway saw it (its mTLS peer certificate): the grant is
    honoured only for the identity the decision bound, on the host it was issued for, with the very
    body the decision let through, and once.
    """
    grant = Grant.decode(token, signer)
    if grant is None:
        return _refused("the grant is missing, forged or expired", "grant_invalid")
    host = authority.lower()
    if host != grant.authority.lower() and host.split(":", 1)[0] != grant.authority.lower().split(":", 1)[0]:
        return _refused(f"the grant is for {grant.authority}, not {authority}", "grant_wrong_host")
    if (method, path) != (grant.method, grant.path):
        return _refused(f"the grant is for {grant.method} {grant.path}, not {method} {path}", "grant_wrong_request")
    if peer is not None and (peer.namespace != grant.namespace
                             or (grant.service_account and peer.service_account != grant.service_account)):
        return _refused(f"the grant was issued to {grant.namespace}/{grant.service_account or grant.service}, "
                        f"not to {peer.describe()}", "grant_wrong_caller")
    if grant.body != ANY_BODY and body_digest(body) != grant.body:
        return _refused("the request is not the one the grant was issued for", "grant_wrong_body")
    provider = policy.providers.get(grant.provider)
    if provider is None:
        return _refused(f"provider {grant.provider!r} is not in the current policy", "grant_unknown_provider")
    if not await inflight.first_use("grant:" + grant.nonce, _NONCE_MEMORY_S):
        return _refused("the grant was already used", "grant_replayed")
    # A provider that takes no key gets nothing added: the grant still proved the policy decided this call.
    return await credential_headers(provider, credentials, cloud, path=path, body=body)


# Long enough to outlive any grant (a grant lives at most the longest call timeout plus a grace period).
_NONCE_MEMORY_S = 900.0


def _refused(message: str, code: str) -> ApiError:
    return ApiError(ErrorKind.PERMISSION, f"credential refused: {message}", code)
