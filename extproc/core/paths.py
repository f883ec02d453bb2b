"""Provider calls outside the AI endpoints: resources a provider keeps (GET /v1/models, a stored response)
and the paths a service's policy allows (``ai_proxy.allow_paths``: files, batches, ...).

They carry no model, so there is nothing to route on: the call goes to the service's provider of that
API (or the one its allow_paths entry names) with that provider's credential, under the service's
request limits, and is recorded as one call. Every other path is denied unless the mesh says
``unknown_paths: pass``.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from extproc.base.apis import Api, ApiError, Endpoint, ErrorKind, canonical_path, split_path
from extproc.base.wire import GRANT_HEADER, SETTLE_KEY, USAGE_HEADER, USAGE_OBSERVE
from extproc.core.credentials import api_headers
from extproc.core.grants import ANY_BODY, Grant, body_digest, through_gateway
from extproc.core.identity import Caller
from extproc.core.messages import Decision, Forward, HttpRequest, LocalReply
from extproc.core.provider_request import credential_headers
from extproc.core.records import reply_record
from extproc.core.settlement import SettleInfo
from extproc.policy.compiled import PolicySet, ServiceModels
from extproc.policy.model import AllowedPath, Provider
from extproc.quota.engine import Refused, Unavailable
from extproc.quota.plan import METRIC_REQUESTS, Estimate, plan_counters

if TYPE_CHECKING:
    from extproc.core.runtime import Runtime

NO_USAGE = "none"  # SettleInfo.api of a call whose answer carries no token usage
_CALL_TTL_S = 600.0


@lru_cache(maxsize=256)
def _pattern(path: str) -> re.Pattern[str]:
    """``*`` within one segment, ``**`` across segments (a trailing ``/**`` also matches the path itself)."""
    tail = ""
    if path.endswith("/**"):
        path, tail = path[:-3], "(?:/.*)?"
    parts = [".*" if p == "**" else "[^/]*" if p == "*" else re.escape(p) for p in re.split(r"(\*\*|\*)", path)]
    return re.compile("".join(parts) + tail + r"\Z")


def allowed_path(entries: Iterable[AllowedPath], method: str, path: str) -> AllowedPath | None:
    canonical = canonical_path(path)
    return next((e for e in entries if method in e.methods and _pattern(e.path).match(canonical)), None)


def provider_of(service: ServiceModels, policy: PolicySet, api: Api) -> Provider | None:
    """The service's provider of that API: the first its model entries name (hop 0 before fallbacks)."""
    names: list[str] = []
    for route in service.proxy.models:
        names += [route.provider, *(v.provider for v in route.variants if v.provider),
                  *(f.provider for f in route.fallback)]
    for name in names:
        provider = policy.providers.get(name)
        if provider is not None and provider.api == api:
            return provider
    return None


@dataclass(slots=True)
class ProviderCall:
    """One call to a provider path without a model: decided on its headers (its body, if any, streams on)."""

    runtime: Runtime
    request: HttpRequest
    caller: Caller
    policy: PolicySet
    service: ServiceModels
    provider: Provider
    endpoint: Endpoint  # the caller's API, an operation name for metrics and records, the path suffix
    strip: tuple[str, ...]
    any_body: bool  # an allowed path may carry a body the decision never sees

    async def decide(self) -> Decision:
        refused = await self._charge()
        if refused is not None:
            reply = LocalReply(refused.kind.status, refused.render(self.endpoint.api), f"ai_{refused.code}")
            self.runtime.count(reply, self.policy, self.caller)
            self.runtime.record(reply_record(self.request, self.caller, self.endpoint, reply, self.policy, ""))
            return reply
        provider = self.provider
        namespace, service = self.caller.namespace or "", self.caller.service or "unknown"
        path = provider.base_path + self.endpoint.suffix + split_path(self.request.path)[1]
        headers: list[tuple[str, str]] = [(":authority", provider.authority), (":path", path)]
        remove = [*self.strip, "authorization", "x-api-key", GRANT_HEADER]  # only ours go on
        credential = await self._credential(path)
        if isinstance(credential, ApiError):
            return LocalReply(credential.kind.status, credential.render(self.endpoint.api), f"ai_{credential.code}")
        headers += credential
        set_names = {name for name, _ in headers}
        remove = [name for name in remove if name not in set_names]  # never remove what is set here
        metadata = {"service": service, "namespace": namespace, "provider": provider.name,
                    "route": self.endpoint.operation, "policy_version": self.policy.version}
        if self.runtime.observe_all:  # one record per call: read when its answer ends
            info = SettleInfo(None, NO_USAGE, 0, provider.name, "", operation=self.endpoint.operation,
                              decided_at=time.time(), service=service, namespace=namespace,
                              caller_api=NO_USAGE, policy_version=self.policy.version,
                              request_id=self.request.headers.get("x-request-id", ""),
                              traceparent=self.request.headers.get("traceparent", ""), nonce=uuid.uuid4().hex)
            metadata[SETTLE_KEY] = info.seal(self.runtime.signer, _CALL_TTL_S)
            headers.append((USAGE_HEADER, USAGE_OBSERVE))
        forward = Forward(tuple(headers), tuple(remove), None, metadata)
        self.runtime.count(forward, self.policy, self.caller)
        return forward

    async def _charge(self) -> ApiError | None:
        """The service's request limits (its own and on this provider); tokens are not known here."""
        quota = self.runtime.quota
        namespace, service = self.service.scope or (self.caller.namespace, self.caller.service or "unknown")
        counters = tuple(c for c in plan_counters(
            prefix=self.policy.mesh.quota.key_prefix, namespace=namespace, service=service, proxy=self.service.proxy,
            mesh=self.policy.mesh, route=None, provider=self.provider.name, now=quota.now())
            if c.metric == METRIC_REQUESTS)
        if not counters:
            return None
        fail_mode = self.service.proxy.on_quota_backend_failure or self.policy.mesh.quota.on_backend_failure
        admission = await quota.admit(counters, Estimate(0, 0, 0), fail_mode)
        if isinstance(admission, Refused):
            return ApiError(ErrorKind.RATE_LIMIT, f"rate limit exceeded: {admission.counter.label}; retry after "
                            f"{admission.retry_after_s}s", "rate_limit_exceeded", openai_type="requests")
        if isinstance(admission, Unavailable):
            return ApiError(ErrorKind.UNAVAILABLE, f"quota cannot be checked: {admission.reason}",
                            "quota_backend_unavailable")
        return None

    async def _credential(self, path: str) -> list[tuple[str, str]] | ApiError:
        provider = self.provider
        extra = api_headers(provider, self.request.headers)
        mesh = self.policy.mesh
        if mesh.credential_injection == "gateway" and through_gateway(provider, mesh.cluster_domain):
            # The gateway wants a grant for every call, keyed provider or not: it is what proves the policy
            # decided this very request (its method and path; its body unless an allowed path's).
            peer = self.request.peer
            grant = Grant(provider.name, provider.authority, peer.namespace if peer else self.caller.namespace or "",
                          self.caller.service or "", peer.service_account if peer else "", uuid.uuid4().hex,
                          ANY_BODY if self.any_body else body_digest(b""), self.request.method, path)
            return [*extra, (GRANT_HEADER, grant.encode(self.runtime.signer, _CALL_TTL_S))]
        if provider.credential is not None and provider.credential.type == "aws":
            # SigV4 covers the body, which a call without a model streams on unread: it cannot be signed.
            return ApiError(ErrorKind.INVALID_REQUEST, f"provider {provider.name!r} signs every request over its "
                            "body (SigV4); it serves AI endpoints only, not this path", "path_not_signable")
        # Nothing here is signed over a body: keys and tokens as each provider API takes them.
        return await credential_headers(provider, self.runtime.credentials, self.runtime.cloud, path=path, body=b"",
                                        extra=extra)

