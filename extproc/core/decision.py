"""The request's journey: identify caller → resolve policy → decide (route, cache, hops, admission) →
forward → observe.

Two entry points mirror what Envoy tells us and when: :meth:`Decider.on_headers` may answer on
headers alone (a pass-through path, an unknown caller, a bad content type); otherwise
:meth:`Exchange.on_body` decides on the complete body, stage by stage, each stage returning its
result or the local reply that ends the call. Both return plain data (:mod:`extproc.core.messages`)
that the gRPC layer turns into one ext_proc response. The stages' own work lives in their modules:
:mod:`~extproc.core.admission` (bulkhead, quota), :mod:`~extproc.core.fallback` (chains, breakers,
hop state), :mod:`~extproc.core.forwarding` (the request the provider receives),
:mod:`~extproc.core.async_calls` (jobs); the shared services are one :class:`Runtime`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import orjson

from extproc.base.apis import (
    ENDPOINTS,
    Api,
    ApiError,
    Endpoint,
    ErrorKind,
    api_of_caller,
    canonical_path,
    classify,
    native_api,
    relayed_endpoint,
)
from extproc.base.apis import resource as provider_resource
from extproc.base.wire import FALLBACK_HEADER, FALLBACK_HOPS_HEADER, JOB_HEADER, JOBS_PATH, USAGE_HEADER
from extproc.cache.entry import CacheEntry
from extproc.cache.key import CachePlan, plan_cache
from extproc.core import fallback
from extproc.core.admission import Admission, Held, release
from extproc.core.async_calls import JobLookup, submit, wants_async
from extproc.core.forwarding import Forwarder, asks_usage, format_api, usable_hops
from extproc.core.identity import Caller, bind_to_peer, identify
from extproc.core.messages import Decision, Forward, HttpRequest, LocalReply, reject
from extproc.core.paths import ProviderCall, allowed_path, provider_of
from extproc.core.records import b3_of, reply_record
from extproc.core.request_body import parse_body
from extproc.core.routing import Target, choose_target
from extproc.core.runtime import Runtime
from extproc.core.settlement import SettleInfo
from extproc.core.usage import estimate_request_tokens
from extproc.jobs.claim import JobClaim
from extproc.policy.compiled import PolicySet, ServiceModels
from extproc.policy.model import ModelRoute
from extproc.quota.plan import Estimate
from extproc.telemetry.record import Hop

log = logging.getLogger(__name__)

_JSON_TYPES = ("application/json",)
_MAX_PROMPT_CHARS = 4096  # captured content rides in the call's metadata: keep it bounded


@dataclass(slots=True)
class Exchange:
    """One AI call between its headers and its body; holds the policy snapshot it started with."""

    runtime: Runtime
    request: HttpRequest
    endpoint: Endpoint
    caller: Caller
    policy: PolicySet
    service: ServiceModels
    _strip: tuple[str, ...] = field(default=())
    claim: JobClaim | None = None  # this call executes an asynchronous job (verified x-ai-job token)
    _requested: str = ""
    _rewrite: bool = False  # the body must be re-serialised even if nothing in it changes (duplicate keys)
    _body: bytes = b""  # the request as it arrived (a grant covers the body that is sent on)

    @property
    def max_body_bytes(self) -> int:
        return self.policy.mesh.max_body_bytes

    @property
    def declared_length(self) -> int | None:
        """The request's content-length, if any: Envoy enforces it, so reaching it means the body is in."""
        value = self.request.headers.get("content-length", "")
        return int(value) if value.isdigit() else None

    def too_large(self) -> LocalReply:
        """Refuse a body over the mesh's limit, as soon as it is seen growing past it (counted and recorded)."""
        reply = self._too_large()
        self._refused(reply)
        return reply

    def reject(self, error: ApiError) -> LocalReply:
        return reject(self.endpoint.api, error)

    async def on_body(self, body: bytes) -> Decision:
        try:
            decision = await self._decide(body)
        except Exception:
            decision = self._failed()
        if isinstance(decision, LocalReply):
            self._refused(decision)
        else:
            self.runtime.count(decision, self.policy, self.caller)
        return decision

    def _too_large(self) -> LocalReply:
        return self.reject(ApiError(ErrorKind.TOO_LARGE, f"request body exceeds the limit of {self.max_body_bytes} "
                                    "bytes", "request_too_large"))

    def _refused(self, reply: LocalReply) -> None:
        """A call the processor answered itself: counted and recorded like every call."""
        self.runtime.count(reply, self.policy, self.caller)
        self.runtime.record(reply_record(self.request, self.caller, self.endpoint, reply, self.policy,
                                         self._requested))

    def _failed(self) -> LocalReply:
        """A request we could not decide (a defect of ours, met by a crafted body): refused, never forwarded,
        in the caller's format, without our internals; the traceback goes to our log under a reference."""
        reference = uuid.uuid4().hex[:12]
        log.exception("could not decide a call of %s (reference %s)", self.caller.describe(), reference)
        return self.reject(ApiError(
            ErrorKind.INVALID_REQUEST, f"this request could not be processed and was not sent to any provider "
            f"(reference {reference})", "unprocessable_request"))

    @property
    def _scope(self) -> tuple[str, str]:
        """(namespace, service) of the caller: what its breakers, bulkhead and telemetry are kept under."""
        return self.caller.namespace or "", self.caller.service or "unknown"

    @property
    def _admission(self) -> Admission:
        return Admission(self.runtime, self.policy, self.service, self.caller, self.endpoint)

    # --- the stages --------------------------------------------------------------------------------------

    async def _decide(self, body: bytes) -> Decision:
        data = self._parse(body)
        if isinstance(data, LocalReply):
            return data
        state = await self._relayed_state()
        if state is not None:
            return await self._next_hop(data, state)
        if self.endpoint.relayed_only:  # a provider's own path, without the fallback state that sent it here
            return self.reject(ApiError(ErrorKind.PERMISSION, "this path is a provider's own and is governed only "
                                        "as a fallback attempt; call an AI endpoint such as POST "
                                        "/v1/chat/completions", "path_not_allowed"))
        resolved = self._resolve(data)
        if isinstance(resolved, LocalReply):
            return resolved
        route, target = resolved
        cache = self._cache_plan(data, route, target)
        hit = await self._from_cache(cache, data, route, target)
        if hit is not None:
            return hit
        hops = fallback.chain(route, target, self.policy.providers)
        hops = hops[:usable_hops(self.endpoint, hops, data)]
        start, skipped = fallback.first_live(self.runtime, self.policy, self._scope, route, hops)
        if start is None:
            return self._all_failed(skipped)
        if self.claim is None and self.runtime.jobs is not None and wants_async(self.request.headers):
            return await submit(self._admission, self.request, body, data, route, hops[start])
        return await self._admit_and_send(data, route, hops, start, skipped, cache)

    def _parse(self, body: bytes) -> dict[str, object] | LocalReply:
        if len(body) > self.max_body_bytes:
            return self._too_large()
        self._body = body
        parsed = parse_body(body)
        if isinstance(parsed, ApiError):
            return self.reject(parsed)
        data, self._rewrite = parsed
        return data

    async def _relayed_state(self) -> fallback.HopState | None:
        """The state of a fallback attempt the relay moved on, if the call carries a genuine one for this
        caller, seen for the first time. Anything else is ignored: the call is decided afresh (and charged)."""
        token = self.request.headers.get(FALLBACK_HEADER)
        if token is None:
            return None
        state = fallback.HopState.decode(token, self.runtime.signer)
        if (state is not None and state.relayed and (state.namespace, state.service) == self._scope
                and await self.runtime.inflight.first_use(state.nonce, fallback.nonce_ttl(state))):
            return state
        self.runtime.metrics.tokens_refused.labels("fallback").inc()
        log.warning("fallback token refused for %s (%s): deciding the call afresh", self.caller.describe(),
                    "forged or expired" if state is None else "replayed, hop 0 or another caller's")
        return None

    def _resolve(self, data: dict[str, object]) -> tuple[ModelRoute, Target] | LocalReply:
        """The policy's model entry for the name the caller sent, and the provider (or A/B variant) chosen."""
        requested = data.get("model")
        self._requested = requested if isinstance(requested, str) else ""
        if not isinstance(requested, str) or not requested:
            return self.reject(ApiError(ErrorKind.INVALID_REQUEST, "'model' is required and must be a string",
                                        "missing_model", "model"))
        route = self.service.resolve(requested)
        if route is None:
            allowed = ", ".join(self.service.allowed)
            return self.reject(ApiError(
                ErrorKind.PERMISSION,
                f"model {requested!r} is not allowed for {self.caller.describe()}; allowed models: {allowed}",
                "model_not_allowed", "model"))
        return route, choose_target(route, self.policy.providers, self.request.headers)

    def _cache_plan(self, data: dict[str, object], route: ModelRoute, target: Target) -> CachePlan | None:
        namespace, service = self.service.scope or (self.caller.namespace, self.caller.service or "unknown")
        return plan_cache(
            prefix=self.policy.mesh.cache.key_prefix, scope=f"{namespace or '*'}/{service}",
            provider=target.provider.name, operation=self.endpoint.operation, route=route,
            body={**data, "model": target.model}, headers=self.request.headers)

    async def _from_cache(self, cache: CachePlan | None, data: dict[str, object], route: ModelRoute, target: Target
                          ) -> Decision | None:
        """The answer from the cache, in the caller's format (a stored stream is replayed whole); None on a miss."""
        if cache is None or not cache.read:
            return None
        entry = await self.runtime.cache.get(cache.key)
        self.runtime.metrics.cache_lookups.labels(*self._admission.labels, "miss" if entry is None else "hit").inc()
        if entry is None or native_api(target.provider.api) != self.endpoint.api:
            return None
        if self.policy.mesh.cache.charge_hits:
            refused = await self._charge_hit(entry, data, route, target)
            if refused is not None:
                return refused
        headers = [("content-type", entry.content_type), ("x-ai-cache", "hit"), ("age", str(entry.age_s())),
                   ("x-ai-provider", target.provider.name), ("x-ai-model", target.model), ("x-ai-route", route.name),
                   ("x-ai-policy-version", self.policy.version)]
        if target.variant:
            headers.append(("x-ai-variant", target.variant))
        return LocalReply(entry.status, entry.body, "ai_cache_hit", tuple(headers))

    async def _charge_hit(self, entry: CacheEntry, data: dict[str, object], route: ModelRoute, target: Target
                          ) -> LocalReply | None:
        """A cache hit counts against the quota as the call it answers did (mesh.cache.charge_hits)."""
        charge = await self._admission.charge(data, route, target)
        if isinstance(charge, LocalReply):
            return charge
        if charge is not None and charge.reservation is not None:
            price = self.policy.prices.lookup(target.provider.name, target.model)
            cost = price.micro_usd(entry.input_tokens, entry.output_tokens) if price is not None else 0
            await self.runtime.quota.settle(charge.reservation, Estimate(entry.input_tokens, entry.output_tokens, cost))
        return None

    async def _admit_and_send(self, data: dict[str, object], route: ModelRoute, hops: list[Target], start: int,
                              skipped: tuple[Hop, ...], cache: CachePlan | None) -> Decision:
        """Admit the call (slot, quota), then forward it; what it holds is given back if it is not sent."""
        admission = self._admission
        held = await admission.admit(data, route, hops[start], job=self.claim is not None,
                                     job_reservation=self.claim.reservation if self.claim else None)
        if isinstance(held, LocalReply):
            return held
        opened = False
        try:
            decision = await self._send(data, route, hops, start, skipped, cache, held)
            if isinstance(decision, Forward) and held.tracked:
                # From here on only close() releases it: if the caller goes away while the record is being
                # written, the write still completes (shielded) and the sweeper releases it, once.
                opened = True
                await asyncio.shield(self.runtime.inflight.open(held.call))
        except BaseException:  # a defect, or the caller gone mid-decision: give back what it holds
            await admission.release_unused(held, opened)
            raise
        if isinstance(decision, LocalReply):
            await admission.release_unused(held, opened)
        return decision

    async def _send(self, data: dict[str, object], route: ModelRoute, hops: list[Target], start: int,
              skipped: tuple[Hop, ...], cache: CachePlan | None, held: Held) -> Decision:
        """The forward to the first live hop, carrying what the response side and later hops need."""
        charge = held.charge
        target = hops[0]  # the chosen target: the call is recorded under it, whichever hop answers
        timeout = route.timeout or self.policy.mesh.resilience.default_timeout
        state = fallback.HopState(self._settle_info(data, route, target, cache, held, skipped),
                                  first=(target.provider.name, target.model), index=start,
                                  hop_started_at=time.time(), timeout_ms=timeout, limit=len(hops))
        extra = dict(charge.headers) if charge is not None else {}
        if cache is not None:
            extra["cache"] = "miss"
        return await self._forwarder.forward(data, route, hops, state, extra)

    def _settle_info(self, data: dict[str, object], route: ModelRoute, target: Target, cache: CachePlan | None,
                     held: Held, skipped: tuple[Hop, ...]) -> SettleInfo:
        """What the response side needs to know about this call (the hop actually used is set when forwarding)."""
        charge = held.charge
        store = cache if cache is not None and cache.write else None
        headers = self.request.headers
        return SettleInfo(
            reservation=charge.reservation if charge is not None and charge.settles_tokens else None,
            api=self.endpoint.body_format,
            input_estimate=charge.input_tokens if charge is not None else estimate_request_tokens(
                data, self.endpoint.api),
            provider=target.provider.name, model=target.model,
            cache_key=store.key if store else None, cache_ttl_s=store.ttl_s if store else 0,
            operation=self.endpoint.operation, route=route.name, decided_at=time.time(),
            service=self._scope[1], namespace=self._scope[0], caller_api=self.endpoint.body_format,
            include_usage=asks_usage(data), requested=self._requested, variant=target.variant or "",
            policy_version=self.policy.version, hops=skipped, call_id=held.call.call_id if held.tracked else "",
            request_id=headers.get("x-request-id", ""), traceparent=headers.get("traceparent", ""),
            b3=b3_of(headers), prompt=self._prompt(data), job_id=self.claim.job_id if self.claim else "",
            nonce=held.call.call_id)

    @property
    def _forwarder(self) -> Forwarder:
        return Forwarder(self.runtime, self.policy, self.request, self.endpoint, self.caller, self._strip,
                         self._rewrite, self._body)

    async def _next_hop(self, data: dict[str, object], state: fallback.HopState) -> Decision:
        """A fallback attempt, re-entering after the relay moved the call on: no second charge, no cache.

        A refusal here ends the call without a response stream to settle it: what it holds (its slot, its
        reservation) is given back now, not at the sweep.
        """
        decision = await self._hop(data, state)
        if isinstance(decision, LocalReply) and state.call_id:
            held = await self.runtime.inflight.take(state.call_id)
            if held is not None:
                await release(held, quota=self.runtime.quota, bulkhead=self.runtime.bulkhead, used=None)
        return decision

    async def _hop(self, data: dict[str, object], state: fallback.HopState) -> Decision:
        caller_api = format_api(state.caller_api)
        resumed = fallback.resume(self.policy, state)
        if resumed is None:
            return reject(caller_api, ApiError(
                ErrorKind.UNAVAILABLE, f"the policy changed during the call: model {state.route!r} is gone",
                "policy_changed"))
        route, hops = resumed
        start, skipped = fallback.first_live(self.runtime, self.policy, self._scope, route, hops, state.index,
                                             state.hops)
        if start is None:
            return self._all_failed(skipped, caller_api)
        # The body is in the format of the provider it was last sent to, which its path tells.
        return await self._forwarder.forward(data, route, hops, state.at(start, skipped), {})

    def _prompt(self, data: dict[str, object]) -> str:
        """The request's messages for the call record, redacted, only when content capture is on."""
        telemetry = self.runtime.telemetry
        if telemetry is None or not telemetry.capture_content:
            return ""
        text = orjson.dumps({k: data[k] for k in ("system", "messages", "input") if k in data}).decode()
        return telemetry.redactor.redact(text[:_MAX_PROMPT_CHARS])

    def _all_failed(self, hops: tuple[Hop, ...], api: Api | None = None) -> LocalReply:
        tried = ", ".join(f"{h.provider}/{h.model} ({h.outcome})" for h in hops)
        reply = reject(api or self.endpoint.api, ApiError(
            ErrorKind.UNAVAILABLE, f"no provider is available for this call: {tried}", "providers_unavailable"))
        return LocalReply(reply.status, reply.body, reply.details,
                          (*reply.headers, (FALLBACK_HOPS_HEADER, fallback.hops_header(hops, None))), hops)


class Decider:
    """The journey's entry on a request's headers: who calls, under which policy, and what comes next."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def on_headers(self, request: HttpRequest, end_of_stream: bool
                   ) -> Decision | Exchange | JobLookup | ProviderCall:
        """Decide on headers alone, or return the :class:`Exchange` that waits for the body (or the
        :class:`JobLookup` that answers a poll for an asynchronous call's result)."""
        result = self._on_headers(request, end_of_stream)
        if isinstance(result, LocalReply):
            policy = self.runtime.policy()
            caller = identify(request.attributes, request.headers, policy.mesh.identity)
            self.runtime.count(result, policy, caller)
            endpoint = classify(request.path)
            if endpoint is not None:  # a refused AI call; other paths are not AI calls
                self.runtime.record(reply_record(request, caller, endpoint, result, policy, ""))
        return result

    def _on_headers(self, request: HttpRequest, end_of_stream: bool
                    ) -> Decision | Exchange | JobLookup | ProviderCall:
        policy = self.runtime.policy()
        strip = self._ours(request, policy)
        if self.runtime.jobs is not None and request.path.startswith(JOBS_PATH):
            return self._job_poll(request, policy)
        endpoint = classify(request.path)
        if endpoint is None and FALLBACK_HEADER in request.headers:
            endpoint = relayed_endpoint(request.path)  # a fallback attempt re-sent to the failed hop's path
        if endpoint is None or (request.method != "POST" and provider_resource(
                request.method, request.path, dict(request.headers)) is not None):
            return self._other_path(request, policy, strip)
        refused = _unfit(request, endpoint, end_of_stream)
        if refused is not None:
            return reject(endpoint.api, refused)
        caller = self._bind(request, identify(request.attributes, request.headers, policy.mesh.identity), policy)
        if isinstance(caller, ApiError):
            return reject(endpoint.api, caller)
        claim = JobClaim.verify(request.headers, self.runtime.signer, caller.service, self.runtime.job_workers)
        if claim is not None:  # the worker replays the job as the service that submitted it
            caller = Caller(claim.service, claim.namespace or None, caller.service_account, "job")
        service = policy.for_caller(caller.service, caller.namespace)
        if service is None:
            return reject(endpoint.api, ApiError(
                ErrorKind.PERMISSION, f"{caller.describe()} has no AI policy in this mesh", "no_policy"))
        return Exchange(self.runtime, request, endpoint, caller, policy, service, strip, claim)

    @staticmethod
    def _ours(request: HttpRequest, policy: PolicySet) -> tuple[str, ...]:
        """Headers only we may set, when the caller sent them: the identity header (unless trusted), the
        usage-filter switch, a job token."""
        identity = policy.mesh.identity
        names = (USAGE_HEADER, JOB_HEADER) if identity.trust_header else (identity.header, USAGE_HEADER, JOB_HEADER)
        return tuple(h for h in names if h in request.headers)

    def _job_poll(self, request: HttpRequest, policy: PolicySet) -> Decision | JobLookup:
        api = api_of_caller(request.path, dict(request.headers))
        bound = self._bind(request, identify(request.attributes, request.headers, policy.mesh.identity), policy)
        if isinstance(bound, ApiError):
            return reject(api, bound)
        if request.method != "GET":
            return reject(api, ApiError(ErrorKind.METHOD, f"{request.method} is not allowed on {JOBS_PATH}<id>; "
                                        "use GET", "method"))
        assert self.runtime.jobs is not None
        return JobLookup(self.runtime.jobs, request.path, request.headers, bound)

    def _other_path(self, request: HttpRequest, policy: PolicySet, strip: tuple[str, ...]
                    ) -> Decision | ProviderCall:
        """A path that is not an AI endpoint: a provider resource, a path the caller's policy allows, or denied."""
        api = api_of_caller(request.path, dict(request.headers))
        bound = self._bind(request, identify(request.attributes, request.headers, policy.mesh.identity), policy)
        if isinstance(bound, ApiError):
            return reject(api, bound)
        service = policy.for_caller(bound.service, bound.namespace)
        if service is not None:
            call = self._provider_call(request, policy, service, bound, api, strip)
            if call is not None:
                return call
        if policy.mesh.unknown_paths == "pass":
            return Forward((), strip, None, {}, clear_route_cache=False)
        governed = ", ".join(f"POST {p}" for p in ENDPOINTS)
        return reject(api, ApiError(
            ErrorKind.PERMISSION, f"{request.method} {canonical_path(request.path)} is not an AI endpoint governed "
            f"here ({governed}, GET /v1/models, the Responses API's stored responses); a service may allow more "
            "paths in its policy (ai_proxy.allow_paths)", "path_not_allowed"))

    def _provider_call(self, request: HttpRequest, policy: PolicySet, service: ServiceModels, caller: Caller,
                       api: Api, strip: tuple[str, ...]) -> Decision | ProviderCall | None:
        """A provider resource (models, stored responses) or an allowed path, sent to the service's provider."""
        found = provider_resource(request.method, request.path, dict(request.headers))
        allowed = allowed_path(service.proxy.allow_paths, request.method, request.path)
        if allowed is not None:
            provider = policy.providers.get(allowed.provider)
            endpoint = Endpoint(api, "allowed_path", canonical_path(request.path).removeprefix("/v1"))
        elif found is not None:
            provider = provider_of(service, policy, found.api)
            endpoint = Endpoint(found.api, found.operation, found.suffix.removeprefix("/v1"))
        else:
            return None
        if provider is None:
            return reject(api, ApiError(ErrorKind.NOT_FOUND, f"{caller.describe()}'s policy names no "
                                        f"{endpoint.api} provider to send {request.method} "
                                        f"{canonical_path(request.path)} to", "no_provider"))
        return ProviderCall(self.runtime, request, caller, policy, service, provider, endpoint, strip,
                            any_body=allowed is not None)

    def _bind(self, request: HttpRequest, caller: Caller, policy: PolicySet) -> Caller | ApiError:
        """The caller bound to its connection's mTLS identity, when the processor verifies peers."""
        if request.peer is None:
            if not self.runtime.peer_identity:
                return caller  # standalone: node metadata is all there is (said at startup)
            log.warning("refused a call of %s: no verified mTLS peer identity (is the processor's sidecar "
                        "forwarding x-forwarded-client-cert?)", caller.describe())
            self.runtime.metrics.identity_refusals.labels("no_peer").inc()
            return ApiError(ErrorKind.PERMISSION, "the caller's identity could not be verified", "unverified_caller")
        models = policy.for_caller(caller.service, caller.namespace or request.peer.namespace)
        accounts = models.proxy.service_accounts if models is not None and models.scope is not None else None
        bound = bind_to_peer(caller, request.peer, accounts)
        if isinstance(bound, str):
            log.warning("refused a call: the caller %s", bound)
            self.runtime.metrics.identity_refusals.labels("mismatch").inc()
            return ApiError(ErrorKind.PERMISSION, f"the caller {bound}", "identity_mismatch")
        return bound


def _unfit(request: HttpRequest, endpoint: Endpoint, end_of_stream: bool) -> ApiError | None:
    """What makes a request to an AI endpoint impossible to decide, before any policy is read."""
    if request.method != "POST":
        return ApiError(ErrorKind.METHOD, f"{request.method} is not allowed on {endpoint.suffix}; use POST", "method")
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type not in _JSON_TYPES:
        return ApiError(ErrorKind.MEDIA_TYPE, f"content-type must be application/json, got {content_type or 'none'!r}",
                        "unsupported_media_type")
    if end_of_stream:
        return ApiError(ErrorKind.INVALID_REQUEST, "request body is empty", "empty_body")
    return None

