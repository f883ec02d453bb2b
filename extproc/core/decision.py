"""The request's journey: identify caller → resolve policy → decide (route, cache, quota) → mutations → observe.

Two entry points mirror what Envoy tells us and when: :meth:`Decider.on_headers` may answer on
headers alone (a pass-through path, an unknown caller, a bad content type); otherwise
:meth:`Exchange.on_body` decides on the complete body. Both return plain data that the gRPC
layer turns into one ext_proc response.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import orjson

from extproc.cache.entry import CacheEntry
from extproc.cache.key import CachePlan, plan_cache
from extproc.cache.store import ResponseCache
from extproc.core import fallback
from extproc.core.admission import release
from extproc.core.apis import (
    ENDPOINTS,
    RESPONSES_FORMAT,
    Api,
    ApiError,
    Endpoint,
    ErrorKind,
    api_of_caller,
    canonical_path,
    classify,
    resource,
    split_path,
)
from extproc.core.async_calls import JOB_HEADER, JOBS_PATH, JobClaim, JobLookup, accepted, wants_async
from extproc.core.breaker import BreakerKey, Breakers, State
from extproc.core.bulkhead import LocalBulkhead, SharedBulkhead
from extproc.core.credentials import CredentialStore, api_headers, key_headers
from extproc.core.grants import GRANT_HEADER, Grant, body_digest, through_gateway
from extproc.core.identity import Caller, bind_to_peer, identify
from extproc.core.inflight import GRACE_S, InFlightStore, MemoryInFlight, OpenCall
from extproc.core.paths import NO_USAGE, ProviderCall, allowed_path, provider_of
from extproc.core.peer import Peer
from extproc.core.routing import Target, choose_target
from extproc.core.settlement import SettleInfo
from extproc.core.tokens import Signer
from extproc.core.usage import estimate_request_tokens
from extproc.policy.compiled import PolicySet, ServiceModels
from extproc.policy.model import MeshSettings, ModelRoute
from extproc.quota.engine import QuotaEngine, Refused, Reservation, Unavailable
from extproc.quota.plan import METRIC_REQUESTS, Estimate, plan_counters
from extproc.telemetry.metrics import CallLabels, Metrics, bounded
from extproc.telemetry.record import CallRecord, CallSink, Hop
from extproc.translate import TranslationError, anthropic_to_openai, openai_to_anthropic, responses_to_anthropic

if TYPE_CHECKING:
    from extproc.jobs.store import JobStore

log = logging.getLogger(__name__)

METADATA_NAMESPACE = "ai.extproc"
# Set on calls whose response must be read for token settlement; Envoy's usage filter keys on it
# ("observe": read without touching; "strip": also remove the usage chunk we asked for on the caller's behalf).
USAGE_HEADER = "x-ai-usage"
USAGE_OBSERVE = "observe"
USAGE_STRIP = "strip"
USAGE_TRANSLATE = "translate"  # the provider speaks another API than the caller: rewrite the response
SETTLE_KEY = "settle"
TIMEOUT_HEADER = "x-envoy-upstream-rq-timeout-ms"
PER_TRY_TIMEOUT_HEADER = "x-envoy-upstream-rq-per-try-timeout-ms"  # Envoy ignores it once the response started
RETRIABLE_CODES_HEADER = "x-envoy-retriable-status-codes"
# Envoy-control headers only policy may set; an internal redirect adds x-envoy-original-url.
_UNTRUSTED = (TIMEOUT_HEADER, PER_TRY_TIMEOUT_HEADER, RETRIABLE_CODES_HEADER, "x-envoy-original-url")
_JSON_TYPES = ("application/json",)
_MAX_PROMPT_CHARS = 4096  # captured content rides in the call's metadata: keep it bounded
# Chat in each API: the operations translation maps onto each other.
_CHAT_OPERATION = {Api.OPENAI: "chat_completions", Api.ANTHROPIC: "messages"}
_CHAT = frozenset(_CHAT_OPERATION.values())
# Request translations that exist, (caller's body format, provider's format); the response side
# (translate.response) covers the same pairs the other way round.
_TRANSLATIONS = frozenset({("openai", "anthropic"), ("anthropic", "openai"), (RESPONSES_FORMAT, "anthropic")})
# Operations that cost no tokens (quota counts the request only, nothing is reserved or settled).
_FREE_OPERATIONS = frozenset({"count_tokens"})
# A Responses request that names state one provider keeps, or tools only OpenAI runs, stays with OpenAI.
_RESPONSES_STATE = ("previous_response_id", "conversation")


def provider_form(endpoint: Endpoint, provider_api: Api) -> tuple[str, str] | None:
    """(operation, body format) in which a provider of ``provider_api`` serves a call to ``endpoint``;
    None when it cannot (an operation only the caller's API has)."""
    if endpoint.operation in _CHAT:
        return _CHAT_OPERATION[provider_api], str(provider_api)
    if endpoint.operation == "responses":
        return ("responses", RESPONSES_FORMAT) if provider_api == Api.OPENAI else ("messages", str(provider_api))
    return (endpoint.operation, endpoint.body_format) if provider_api == endpoint.api else None


def format_api(body_format: str) -> Api:
    """The API whose error envelope a body format's callers understand."""
    return Api.OPENAI if body_format == RESPONSES_FORMAT else Api(body_format)


def _stays_with_openai(data: dict[str, object]) -> bool:
    if any(data.get(key) not in (None, "") for key in _RESPONSES_STATE):
        return True
    tools = data.get("tools")
    if isinstance(tools, list) and any(isinstance(t, dict) and t.get("type") != "function" for t in tools):
        return True  # built-in tools (web_search, file_search, computer use, ...) run at OpenAI
    items = data.get("input")
    return isinstance(items, list) and any(isinstance(i, dict) and i.get("type") == "item_reference" for i in items)


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


Decision = Forward | LocalReply


@dataclass(frozen=True, slots=True)
class Charge:
    """What quota admission reserved for a call, and what the caller is told about its limits."""

    reservation: Reservation | None
    headers: dict[str, str]
    input_tokens: int

    @property
    def settles_tokens(self) -> bool:
        return self.reservation is not None and any(m != METRIC_REQUESTS for m in self.reservation.metrics)


@dataclass(frozen=True, slots=True)
class Held:
    """An admitted call: what it holds (released exactly once) and what it was charged."""

    call: OpenCall
    charge: Charge | None

    @property
    def tracked(self) -> bool:
        """Whether anything must be given back when the call ends: a slot, or reserved tokens or cost."""
        return self.call.slot or (self.charge is not None and self.charge.settles_tokens
                                  and self.call.reservation is not None)


@dataclass(slots=True)
class Exchange:
    """One AI call between its headers and its body; holds the policy snapshot it started with."""

    decider: Decider
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
        limit = self.max_body_bytes
        return self.reject(ApiError(ErrorKind.TOO_LARGE, f"request body exceeds the limit of {limit} bytes",
                                    "request_too_large"))

    def reject(self, error: ApiError) -> LocalReply:
        return _reject(self.endpoint.api, error)

    async def on_body(self, body: bytes) -> Decision:
        try:
            decision = await self._decide(body)
        except Exception:
            decision = self._failed()
        self.decider.count(decision, self.policy, self.caller)
        if isinstance(decision, LocalReply):
            self.decider.record(reply_record(self.request, self.caller, self.endpoint, decision, self.policy,
                                             self._requested))
        return decision

    def _failed(self) -> LocalReply:
        """A request we could not decide (a defect of ours, met by a crafted body): refused, never forwarded,
        in the caller's format, without our internals; the traceback goes to our log under a reference."""
        reference = uuid.uuid4().hex[:12]
        log.exception("could not decide a call of %s (reference %s)", self.caller.describe(), reference)
        return self.reject(ApiError(
            ErrorKind.INVALID_REQUEST, f"this request could not be processed and was not sent to any provider "
            f"(reference {reference})", "unprocessable_request"))

    @property
    def caller_labels(self) -> tuple[str, str]:
        labels = CallLabels.of(self.policy, service=self.caller.service, namespace=self.caller.namespace)
        return labels.caller

    @property
    def _scope(self) -> tuple[str, str]:
        """(namespace, service) of the caller: what its breakers, bulkhead and telemetry are kept under."""
        return self.caller.namespace or "", self.caller.service or "unknown"

    async def _decide(self, body: bytes) -> Decision:
        if len(body) > self.max_body_bytes:
            return self.too_large()
        self._body = body
        parsed = parse_body(body)
        if isinstance(parsed, ApiError):
            return self.reject(parsed)
        data, self._rewrite = parsed
        token = self.request.headers.get(fallback.HEADER)
        if token is not None:
            state = fallback.HopState.decode(token, self.decider.signer)
            if state is not None and state.relayed and self._owns(state) and await self.decider.inflight.first_use(
                    state.nonce, fallback.nonce_ttl(state)):
                return await self._next_hop(data, state)
            # A forged, expired, replayed or foreign token is ignored: the call is decided afresh (and charged).
            self.decider.metrics.tokens_refused.labels("fallback").inc()
            log.warning("fallback token refused for %s (%s): deciding the call afresh", self.caller.describe(),
                        "forged or expired" if state is None else "replayed, hop 0 or another caller's")
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
        target = choose_target(route, self.policy.providers, self.request.headers)
        cache = self._cache_plan(data, route, target)
        if cache is not None and cache.read:
            entry = await self.decider.cache.get(cache.key)
            self.decider.metrics.cache_lookups.labels(*self.caller_labels, "miss" if entry is None else "hit").inc()
            if entry is not None and target.provider.api == self.endpoint.api:
                return await self._cache_hit(entry, data, requested, route, target)
        hops = fallback.chain(route, target, self.policy.providers)
        hops = hops[:self._usable(hops, data)]
        start, skipped = self._first_live(hops, route, 0, ())
        if start is None:
            return self._all_failed(skipped)
        if self.claim is None and self.decider.jobs is not None and wants_async(self.request.headers):
            return await self._submit(body, data, route, hops[start])
        held = await self._admit(data, route, hops[start])
        if isinstance(held, LocalReply):
            return held
        opened = False
        try:
            decision = self._send(data, route, hops, start, skipped, target, cache, held)
            if isinstance(decision, Forward) and held.tracked:
                # From here on only close() releases it: if the caller goes away while the record is being
                # written, the write still completes (shielded) and the sweeper releases it, once.
                opened = True
                await asyncio.shield(self.decider.inflight.open(held.call))
        except BaseException:  # a defect, or the caller gone mid-decision: give back what it holds
            await self._release(held, opened)
            raise
        if isinstance(decision, LocalReply):
            await self._release(held, opened)
        return decision

    async def _admit(self, data: dict[str, object], route: ModelRoute, target: Target) -> Held | LocalReply:
        """Take what the call needs, bulkhead slot then quota, or refuse it; nothing is kept on a refusal."""
        # Made here, never taken from the caller: a caller-chosen id could share one slot among many calls.
        call_id = uuid.uuid4().hex
        limit = self.service.proxy.max_in_flight or self.policy.mesh.resilience.max_in_flight
        if self.claim is not None:
            limit = None  # the worker bounds each service's jobs itself
        if limit is not None and not await self.decider.bulkhead.enter(self._scope, call_id, limit):
            self.decider.metrics.bulkhead_rejections.labels(*self.caller_labels).inc()
            return self.reject(ApiError(
                ErrorKind.RATE_LIMIT, f"{self.caller.describe()} already has {limit} AI calls in flight (its "
                "max_in_flight); retry when one has finished", "too_many_calls_in_flight", openai_type="requests"))
        try:
            # Quota last: a call refused for any other reason must not consume it. A job was charged when
            # it was submitted: its execution settles that reservation instead.
            charge = self._job_charge(data) if self.claim is not None else await self._charge(data, route, target)
        except BaseException:
            if limit is not None:
                await self.decider.bulkhead.leave(self._scope, call_id)
            raise
        if isinstance(charge, LocalReply):
            if limit is not None:
                await self.decider.bulkhead.leave(self._scope, call_id)
            return charge
        # A job's reservation belongs to the job (its worker retries): it is not ours to release.
        reservation = charge.reservation if charge is not None and self.claim is None else None
        timeout = route.timeout or self.policy.mesh.resilience.default_timeout
        call = OpenCall(call_id, self._scope[0], self._scope[1], time.time() + timeout / 1000 + GRACE_S,
                        slot=limit is not None, reservation=reservation,
                        input_estimate=charge.input_tokens if charge is not None else 0,
                        provider=target.provider.name, model=target.model)
        return Held(call, charge)

    async def _release(self, held: Held, opened: bool) -> None:
        """Undo an admission the call will not use; once opened, only if no one else released it first."""
        if not opened or await self.decider.inflight.close(held.call.call_id):
            await release(held.call, quota=self.decider.quota, bulkhead=self.decider.bulkhead, used=None)

    def _send(self, data: dict[str, object], route: ModelRoute, hops: list[Target], start: int,
              skipped: tuple[Hop, ...], target: Target, cache: CachePlan | None, held: Held) -> Decision:
        """The forward to the first live hop, carrying what the response side and later hops need."""
        charge = held.charge
        now = time.time()
        store = cache if cache is not None and cache.write else None
        requested = self._requested
        settle = SettleInfo(
            reservation=charge.reservation if charge is not None and charge.settles_tokens else None,
            api=self.endpoint.body_format,
            input_estimate=charge.input_tokens if charge is not None else estimate_request_tokens(
                data, self.endpoint.api),
            provider=target.provider.name, model=target.model,  # the hop actually used is set by _forward
            cache_key=store.key if store else None, cache_ttl_s=store.ttl_s if store else 0,
            operation=self.endpoint.operation, route=route.name, decided_at=now,
            service=self._scope[1], namespace=self._scope[0], caller_api=self.endpoint.body_format,
            include_usage=_asks_usage(data), requested=requested, variant=target.variant or "",
            policy_version=self.policy.version, call_id=held.call.call_id if held.tracked else "",
            request_id=self.request.headers.get("x-request-id", ""),
            traceparent=self.request.headers.get("traceparent", ""), b3=_b3_of(self.request.headers),
            prompt=self._prompt(data), job_id=self.claim.job_id if self.claim else "", nonce=held.call.call_id)
        timeout = route.timeout or self.policy.mesh.resilience.default_timeout
        state = fallback.HopState(
            namespace=self._scope[0], service=self._scope[1], route=route.name, requested=requested,
            caller_api=self.endpoint.body_format, first=(target.provider.name, target.model),
            variant=target.variant or "", index=start, hops=skipped, started_at=now, hop_started_at=now,
            call_id=held.call.call_id, settle=settle, policy_version=self.policy.version, timeout_ms=timeout,
            limit=len(hops))
        extra = dict(charge.headers) if charge is not None else {}
        if cache is not None:
            extra["cache"] = "miss"
        return self._forward(data, self.endpoint.body_format, route, hops, state, extra)

    def _usable(self, hops: list[Target], data: dict[str, object]) -> int:
        """How many hops of the chain this request can be sent to and answered from in the caller's format.

        Each hop gets the body the previous one was sent (Envoy re-sends it), so a hop is usable only if
        that body translates to its API and its answer translates back; the chain stops at the first
        that is not. A Responses request naming state one provider keeps stays with its first hop.
        """
        caller = self.endpoint.body_format
        if caller == RESPONSES_FORMAT and _stays_with_openai(data):
            if any(data.get(key) not in (None, "") for key in _RESPONSES_STATE):
                return 1
            return max(1, next((n for n, hop in enumerate(hops) if hop.provider.api != Api.OPENAI), len(hops)))
        endpoint, body = self.endpoint, caller
        for n, hop in enumerate(hops):
            form = provider_form(endpoint, Api(hop.provider.api))
            if form is None:
                return max(1, n)
            operation, provider_format = form
            if any(a != b and (a, b) not in _TRANSLATIONS for a, b in ((body, provider_format),
                                                                        (caller, provider_format))):
                return max(1, n)
            endpoint = next(e for e in ENDPOINTS.values() if e.api == hop.provider.api and e.operation == operation)
            body = provider_format
        return len(hops)

    def _job_charge(self, data: dict[str, object]) -> Charge:
        assert self.claim is not None
        reservation = Reservation.decode(self.claim.reservation) if self.claim.reservation else None
        return Charge(reservation, {}, estimate_request_tokens(data, self.endpoint.api))

    async def _submit(self, body: bytes, data: dict[str, object], route: ModelRoute, target: Target) -> LocalReply:
        """Check and charge the call as a synchronous one, then queue it as a job: 202 at once."""
        charge = await self._charge(data, route, target)
        if isinstance(charge, LocalReply):
            return charge
        try:
            reply = await self._queue(body, charge)
        except BaseException:
            if charge is not None and charge.reservation is not None:
                await self.decider.quota.refund(charge.reservation)
            raise
        if reply.status != 202 and charge is not None and charge.reservation is not None:
            await self.decider.quota.refund(charge.reservation)  # not queued: nothing will settle it
        return reply

    async def _queue(self, body: bytes, charge: Charge | None) -> LocalReply:
        from extproc.jobs.errors import JobError
        from extproc.jobs.model import Job

        jobs = self.decider.jobs
        assert jobs is not None
        reservation = charge.reservation.encode() if charge is not None and charge.settles_tokens else None
        headers = [(":authority", self.request.authority), *self.request.headers.items()]
        job = Job.new(service=self._scope[1], namespace=self._scope[0], api=self.endpoint.api, path=self.request.path,
                      headers=headers, body=body, reservation=reservation, policy_version=self.policy.version)
        try:
            limits = self.service.proxy.async_calls
            submitted = await jobs.submit(job, max_queued=limits.max_queued, max_body_bytes=limits.max_body_bytes)
        except JobError as exc:
            return self.reject(exc.api_error())
        except Exception as exc:  # NATS unreachable: a clear 503, the call is not lost silently
            log.warning("job submission failed: %s", exc)
            return self.reject(ApiError(ErrorKind.UNAVAILABLE, "asynchronous calls are unavailable: the job "
                                        f"queue cannot be reached ({type(exc).__name__})", "job_queue_unavailable"))
        status, reply, headers_out = accepted(submitted.job_id, submitted.location, submitted.subject,
                                              submitted.dead_subject)
        return LocalReply(status, reply, "ai_job_accepted", headers_out)

    def _observed(self, route: ModelRoute, settle: SettleInfo) -> bool:
        """Whether the response must be read: token quotas, a cache fill, a breaker, a bulkhead slot,
        a job's result, or telemetry that records every call."""
        return bool(self.decider.observe_all or settle.reservation is not None or settle.cache_key
                    or settle.call_id or settle.job_id
                    or route.breaker(self.policy.mesh.resilience.circuit_breaker) is not None)

    def _owns(self, state: fallback.HopState) -> bool:
        """A hop token is honoured only for its own caller (and only once: its nonce, checked next)."""
        return (state.namespace, state.service) == self._scope

    async def _next_hop(self, data: dict[str, object], state: fallback.HopState) -> Decision:
        """A fallback attempt, re-entering after the relay moved the call on: no second charge, no cache.

        A refusal here ends the call without a response stream to settle it: what it holds (its slot, its
        reservation) is given back now, not at the sweep.
        """
        decision = self._hop(data, state)
        if isinstance(decision, LocalReply) and state.settle.call_id:
            held = await self.decider.inflight.take(state.settle.call_id)
            if held is not None:
                await release(held, quota=self.decider.quota, bulkhead=self.decider.bulkhead, used=None)
        return decision

    def _hop(self, data: dict[str, object], state: fallback.HopState) -> Decision:
        caller_api = format_api(state.caller_api)
        route = self.service.resolve(state.route)
        first = self.policy.providers.get(state.first[0])
        if route is None or first is None:
            return _reject(caller_api, ApiError(
                ErrorKind.UNAVAILABLE, f"the policy changed during the call: model {state.route!r} is gone",
                "policy_changed"))
        hops = fallback.chain(route, Target(first, state.first[1], state.variant or None), self.policy.providers)
        hops = hops[:state.limit]
        start, skipped = self._first_live(hops, route, state.index, state.hops)
        if start is None:
            return self._all_failed(skipped, caller_api)
        state = replace(state, index=start, hops=skipped)
        # The body is in the format of the provider it was last sent to, which its path tells.
        return self._forward(data, self.endpoint.body_format, route, hops, state, {})

    def _prompt(self, data: dict[str, object]) -> str:
        """The request's messages for the call record, redacted, only when content capture is on."""
        telemetry = self.decider.telemetry
        if telemetry is None or not getattr(telemetry, "capture_content", False):
            return ""
        text = orjson.dumps({k: data[k] for k in ("system", "messages", "input") if k in data}).decode()
        return telemetry.redactor.redact(text[:_MAX_PROMPT_CHARS])

    def _first_live(self, hops: list[Target], route: ModelRoute, index: int, before: tuple[Hop, ...]
                    ) -> tuple[int | None, tuple[Hop, ...]]:
        """The first hop from ``index`` whose breaker lets a call through; the hops skipped on the way."""
        settings = route.breaker(self.policy.mesh.resilience.circuit_breaker)
        skipped = list(before)
        for i in range(index, len(hops)):
            target = hops[i]
            key = (*self._scope, target.provider.name, target.model)
            if settings is None or self.decider.breakers.allow(key, settings):
                for hop in skipped[len(before):]:
                    self.decider.metrics.fallbacks.labels(*self.caller_labels, bounded(self.policy, hop.provider),
                                                          bounded(self.policy, target.provider.name),
                                                          hop.outcome).inc()
                return i, tuple(skipped)
            skipped.append(Hop(target.provider.name, target.model, "breaker_open", time.time()))
        return None, tuple(skipped)

    def _all_failed(self, hops: tuple[Hop, ...], api: Api | None = None) -> LocalReply:
        tried = ", ".join(f"{h.provider}/{h.model} ({h.outcome})" for h in hops)
        reply = _reject(api or self.endpoint.api, ApiError(
            ErrorKind.UNAVAILABLE, f"no provider is available for this call: {tried}", "providers_unavailable"))
        return LocalReply(reply.status, reply.body, reply.details,
                          (*reply.headers, ("x-ai-fallback-hops", fallback.hops_header(hops, None))), hops)

    def _cache_plan(self, data: dict[str, object], route: ModelRoute, target: Target) -> CachePlan | None:
        namespace, service = self.service.scope or (self.caller.namespace, self.caller.service or "unknown")
        return plan_cache(
            prefix=self.policy.mesh.cache.key_prefix, scope=f"{namespace or '*'}/{service}",
            provider=target.provider.name, operation=self.endpoint.operation, route=route,
            body={**data, "model": target.model}, headers=self.request.headers)

    async def _cache_hit(self, entry: CacheEntry, data: dict[str, object], requested: str, route: ModelRoute,
                         target: Target) -> Decision:
        """Answer from the cache, in the caller's format (a stored stream is replayed whole)."""
        if self.policy.mesh.cache.charge_hits:
            charge = await self._charge(data, route, target)
            if isinstance(charge, LocalReply):
                return charge
            if charge is not None and charge.reservation is not None:
                price = self.policy.prices.lookup(target.provider.name, target.model)
                cost = price.micro_usd(entry.input_tokens, entry.output_tokens) if price is not None else 0
                await self.decider.quota.settle(charge.reservation,
                                                Estimate(entry.input_tokens, entry.output_tokens, cost))
        headers = [("content-type", entry.content_type), ("x-ai-cache", "hit"), ("age", str(entry.age_s())),
                   ("x-ai-provider", target.provider.name), ("x-ai-model", target.model), ("x-ai-route", route.name),
                   ("x-ai-policy-version", self.policy.version)]
        if target.variant:
            headers.append(("x-ai-variant", target.variant))
        return LocalReply(entry.status, entry.body, "ai_cache_hit", tuple(headers))

    def _credential_headers(self, target: Target) -> list[tuple[str, str]] | ApiError:
        key = key_headers(target.provider, self.decider.credentials)
        return key if isinstance(key, ApiError) else [*key, *api_headers(target.provider, self.request.headers)]

    async def _charge(self, data: dict[str, object], route: ModelRoute, target: Target) -> Charge | LocalReply | None:
        quota = self.decider.quota
        proxy = self.service.proxy
        namespace, service = self.service.scope or (self.caller.namespace, self.caller.service or "unknown")
        counters = plan_counters(
            prefix=self.policy.mesh.quota.key_prefix, namespace=namespace, service=service, proxy=proxy,
            mesh=self.policy.mesh, route=route, provider=target.provider.name, now=quota.now())
        if not counters:
            return None
        if self.endpoint.operation in _FREE_OPERATIONS:
            input_tokens = output_tokens = 0  # counted as a request, never as tokens
        else:
            input_tokens = estimate_request_tokens(data, self.endpoint.body_format)
            output_tokens = _max_output_tokens(data, self.endpoint, self.policy.mesh.quota.default_max_output_tokens)
        price = self.policy.prices.lookup(target.provider.name, target.model)
        estimate = Estimate(input_tokens, output_tokens,
                            price.micro_usd(input_tokens, output_tokens) if price is not None else 0)
        fail_mode = proxy.on_quota_backend_failure or self.policy.mesh.quota.on_backend_failure
        admission = await quota.admit(counters, estimate, fail_mode)
        if isinstance(admission, Refused):
            counter = admission.counter
            self.decider.metrics.quota_rejections.labels(*self.caller_labels, counter.metric).inc()
            kind = "requests" if counter.metric == METRIC_REQUESTS else "tokens"
            reject = self.reject(ApiError(
                ErrorKind.RATE_LIMIT,
                f"rate limit exceeded: {counter.label}; retry after {admission.retry_after_s}s",
                "rate_limit_exceeded", openai_type=kind))
            return LocalReply(reject.status, reject.body, reject.details,
                          (*reject.headers, ("retry-after", str(admission.retry_after_s))))
        if isinstance(admission, Unavailable):
            return self.reject(ApiError(ErrorKind.UNAVAILABLE, f"quota cannot be checked: {admission.reason}",
                                        "quota_backend_unavailable"))
        return Charge(admission.reservation, admission.headers, input_tokens)

    def _forward(self, data: dict[str, object], body_format: str, route: ModelRoute, hops: list[Target],
                 state: fallback.HopState, extra: Mapping[str, str]) -> Decision:
        """Send the call to ``hops[state.index]``, in that provider's format, ready to fall back further."""
        target = hops[state.index]
        provider = target.provider
        caller_api = format_api(state.caller_api)
        mesh = self.policy.mesh
        at_gateway = mesh.credential_injection == "gateway" and through_gateway(provider, mesh.cluster_domain)
        credential = api_headers(provider, self.request.headers) if at_gateway else self._credential_headers(target)
        if isinstance(credential, ApiError):
            return _reject(caller_api, credential)
        form = provider_form(self.endpoint, Api(provider.api))
        if form is None:
            return _reject(caller_api, ApiError(
                ErrorKind.INVALID_REQUEST, f"{self.endpoint.operation} is not served by the {provider.api} API of "
                f"provider {provider.name!r}", "untranslatable_request"))
        operation, provider_format = form
        body = _for_provider(data, body_format, provider_format, target.model, self.policy.mesh)
        if isinstance(body, ApiError):
            return _reject(caller_api, body)
        data, rewrite = body
        rewrite = rewrite or self._rewrite
        suffix = next(e.suffix for e in ENDPOINTS.values() if e.api == provider.api and e.operation == operation)
        headers: list[tuple[str, str]] = [
            (":authority", provider.authority),
            (":path", provider.base_path + suffix + split_path(self.request.path)[1]),
            *credential,
        ]
        remove = [*self._strip, *_UNTRUSTED]
        if at_gateway:
            remove += ["authorization", "x-api-key"]  # the gateway adds the provider's; the caller's never goes
        else:
            remove.append("authorization" if provider.api == Api.ANTHROPIC else "x-api-key")
            remove.append(GRANT_HEADER)
        if provider.api != Api.ANTHROPIC and caller_api != Api.ANTHROPIC:
            # Left by an earlier Anthropic hop. (An Anthropic caller keeps it: Envoy's own error
            # replies pick the caller's format by this header.)
            remove.append("anthropic-version")
        # The timeout is the budget of the whole call, fallbacks included; the mesh's default when the
        # model sets none, so that a hung provider never holds the caller (or its slot) for long.
        left = state.timeout_ms - int((time.time() - state.started_at) * 1000)
        headers.append((TIMEOUT_HEADER, str(max(left, 1))))
        if route.first_byte_timeout is not None:
            headers.append((PER_TRY_TIMEOUT_HEADER, str(route.first_byte_timeout)))
        more = state.index + 1 < len(hops)
        hop_token = ""
        if more:
            # Envoy retries only calls carrying this header; the retry reaches the relay, which moves on.
            # The provider sees only the marker: the state itself rides in the call's metadata, and
            # Envoy puts it on the relay's attempt alone (filter.failover_protocol_options).
            hop_token = replace(state, hop_started_at=time.time(), nonce=fallback.new_nonce(),
                                relayed=False).encode(self.decider.signer)  # good only at the relay
            headers.append((fallback.HEADER, fallback.MARKER))
            if route.fallback_on_context_length:
                headers.append((RETRIABLE_CODES_HEADER, "400"))
        else:
            remove.append(fallback.HEADER)
        same_api = state.caller_api == provider_format
        if same_api and state.settle.reservation is not None and provider.api == Api.OPENAI:
            # Token quotas settle on the provider's own count: ask a stream for it.
            rewrite = _inject_stream_usage(data, operation) or rewrite
        # A free operation's answer (count_tokens: {"input_tokens": n}) is not usage: nothing to read.
        usage_format = NO_USAGE if operation in _FREE_OPERATIONS else provider_format
        settle = replace(state.settle, api=usage_format, provider=provider.name, model=target.model,
                         hops=state.hops)
        if not same_api:
            usage_mode: str | None = USAGE_TRANSLATE
        elif data.get("stream") is True and _asks_usage(data) and not settle.include_usage:
            usage_mode = USAGE_STRIP  # the usage chunk is ours (injected or left by a translation): remove it
        elif self._observed(route, settle):
            usage_mode = USAGE_OBSERVE
        else:
            usage_mode = None  # nothing reads this response: no second stream (it costs the processor CPU)
        if usage_mode is not None:
            headers.append((USAGE_HEADER, usage_mode))
        elif USAGE_HEADER in self.request.headers:
            remove.append(USAGE_HEADER)
        metadata = {
            "service": self.caller.service or "",
            "namespace": self.caller.namespace or "",
            "provider": provider.name,
            "model": target.model,
            "requested_model": state.requested,
            "route": route.name,
            "variant": state.variant,
            "policy_version": self.policy.version,
            SETTLE_KEY: settle.seal(self.decider.signer, max(1.0, state.started_at + state.timeout_ms / 1000
                                                             + GRACE_S + 60 - time.time())),
            **({fallback.STATE_KEY: hop_token} if hop_token else {}),
            **extra,
        }
        if state.hops:
            metadata["fallback_hops"] = fallback.hops_header(state.hops, target)
        new_body: bytes | None = None
        if rewrite:
            new_body = dump_json(data)
            headers.append(("content-length", str(len(new_body))))
        if at_gateway:
            path = provider.base_path + suffix + split_path(self.request.path)[1]
            headers.append((GRANT_HEADER, self._grant(target, state, self._body if new_body is None else new_body,
                                                      path)))
        return Forward(tuple(headers), tuple(remove), new_body, metadata)

    def _grant(self, target: Target, state: fallback.HopState, body: bytes, path: str) -> str:
        """This attempt's single-use grant for the provider's credential, redeemed at the egress gateway."""
        # Bound to the workload whose sidecar presents it (a worker replaying a job presents its own).
        peer = self.request.peer
        namespace = peer.namespace if peer is not None else self._scope[0]
        account = peer.service_account if peer is not None else (self.caller.service_account or "")
        grant = Grant(target.provider.name, target.provider.authority, namespace, self._scope[1], account,
                      fallback.new_nonce(), body_digest(body), "POST", path)
        ttl = max(1.0, state.started_at + state.timeout_ms / 1000 + GRACE_S - time.time())
        return grant.encode(self.decider.signer, ttl)


class Decider:
    """Stateless apart from the current policy snapshot, the credential cache and the breakers."""

    def __init__(self, policies: Callable[[], PolicySet], credentials: CredentialStore, quota: QuotaEngine,
                 cache: ResponseCache, metrics: Metrics | None = None, *, signer: Signer | None = None,
                 breakers: Breakers | None = None, bulkhead: LocalBulkhead | SharedBulkhead | None = None,
                 telemetry: CallSink | None = None, jobs: JobStore | None = None,
                 job_workers: frozenset[str] = frozenset({"ai-extproc-worker"}),
                 inflight: InFlightStore | None = None, peer_identity: bool = False) -> None:
        self._policies = policies
        self.credentials = credentials
        self.quota = quota
        self.cache = cache
        self.metrics = metrics or Metrics()
        self.signer = signer or Signer.from_environment()
        self.breakers = breakers or Breakers(on_change=self._breaker_changed)
        self.bulkhead = bulkhead or LocalBulkhead()
        self.inflight: InFlightStore = inflight or MemoryInFlight()  # what admitted calls hold, until they end
        # In the mesh: every call must come with a verified mTLS peer, and its caller is bound to it.
        self.peer_identity = peer_identity
        self.telemetry = telemetry
        # With a telemetry sink every call is read to its end (one record per call); without, only
        # calls whose policy needs their response, since that second stream costs processor CPU.
        self.observe_all = bool(getattr(telemetry, "sinks", telemetry is not None))
        self.jobs = jobs  # asynchronous calls are on when a job store is connected
        self.job_workers = job_workers  # identities whose calls may carry a job token for another service

    def record(self, record: CallRecord) -> None:
        """A finished call, for the access log, traces and usage events (never raises)."""
        if self.telemetry is not None:
            try:
                self.telemetry.emit(record)
            except Exception:  # telemetry must never break a call
                log.exception("telemetry failed")

    def _breaker_changed(self, key: BreakerKey, state: State) -> None:
        namespace, service, provider, model = key
        labels = CallLabels.of(self._policies(), service=service, namespace=namespace, provider=provider,
                               request_model=model)
        self.metrics.breaker_state.labels(*labels.caller, labels.provider, labels.request_model).set(int(state))
        log.warning("circuit breaker for %s/%s → %s/%s is now %s", namespace, service, provider, model,
                    state.name.lower())

    def policy(self) -> PolicySet:
        return self._policies()

    def count(self, decision: Decision, policy: PolicySet, caller: Caller) -> None:
        """One AI call decided: forwarded, answered from the cache, or refused (by its code)."""
        if isinstance(decision, Forward):
            meta = decision.metadata
            labels = CallLabels.of(policy, service=caller.service, namespace=caller.namespace,
                                   provider=meta.get("provider"), request_model=meta.get("route"))
            outcome = "forwarded"
        else:
            labels = CallLabels.of(policy, service=caller.service, namespace=caller.namespace)
            outcome = decision.details.removeprefix("ai_")
        self.metrics.calls.labels(*labels.caller, labels.provider, labels.request_model, outcome).inc()

    def on_headers(self, request: HttpRequest, end_of_stream: bool
                   ) -> Decision | Exchange | JobLookup | ProviderCall:
        """Decide on headers alone, or return the :class:`Exchange` that waits for the body (or the
        :class:`JobLookup` that answers a poll for an asynchronous call's result)."""
        result = self._on_headers(request, end_of_stream)
        if isinstance(result, LocalReply):
            policy = self._policies()
            caller = identify(request.attributes, request.headers, policy.mesh.identity)
            self.count(result, policy, caller)
            endpoint = classify(request.path)
            if endpoint is not None:  # a refused AI call; other paths are not AI calls
                self.record(reply_record(request, caller, endpoint, result, policy, ""))
        return result

    def _other_path(self, request: HttpRequest, policy: PolicySet, strip: tuple[str, ...]
                    ) -> Decision | ProviderCall:
        """A path that is not an AI endpoint: a provider resource, a path the caller's policy allows, or denied."""
        headers = dict(request.headers)
        api = api_of_caller(request.path, headers)
        found = resource(request.method, request.path, headers)
        caller = identify(request.attributes, request.headers, policy.mesh.identity)
        bound = self._bind(request, caller, policy)
        if isinstance(bound, ApiError):
            return _reject(api, bound)
        service = policy.for_caller(bound.service, bound.namespace)
        allowed = allowed_path(service.proxy.allow_paths, request.method, request.path) if service else None
        if service is not None and (found is not None or allowed is not None):
            if allowed is not None:
                provider = policy.providers.get(allowed.provider)
                canonical = canonical_path(request.path)
                endpoint = Endpoint(api, "allowed_path", canonical.removeprefix("/v1"))
            else:
                assert found is not None
                provider = provider_of(service, policy, found.api)
                endpoint = Endpoint(found.api, found.operation, found.suffix.removeprefix("/v1"))
            if provider is None:
                return _reject(api, ApiError(ErrorKind.NOT_FOUND, f"{bound.describe()}'s policy names no "
                                             f"{endpoint.api} provider to send {request.method} "
                                             f"{canonical_path(request.path)} to", "no_provider"))
            return ProviderCall(self, request, bound, policy, service, provider, endpoint, strip,
                                any_body=allowed is not None)
        if policy.mesh.unknown_paths == "pass":
            return Forward((), strip, None, {}, clear_route_cache=False)
        path = canonical_path(request.path)
        governed = ", ".join(f"POST {p}" for p in ENDPOINTS)
        return _reject(api, ApiError(
            ErrorKind.PERMISSION, f"{request.method} {path} is not an AI endpoint governed here ({governed}, "
            f"GET /v1/models, the Responses API's stored responses); a service may allow more paths in its "
            "policy (ai_proxy.allow_paths)", "path_not_allowed"))

    def _bind(self, request: HttpRequest, caller: Caller, policy: PolicySet) -> Caller | ApiError:
        """The caller bound to its connection's mTLS identity, when the processor verifies peers."""
        if request.peer is None:
            if not self.peer_identity:
                return caller  # standalone: node metadata is all there is (said at startup)
            log.warning("refused a call of %s: no verified mTLS peer identity (is the processor's sidecar "
                        "forwarding x-forwarded-client-cert?)", caller.describe())
            self.metrics.identity_refusals.labels("no_peer").inc()
            return ApiError(ErrorKind.PERMISSION, "the caller's identity could not be verified", "unverified_caller")
        models = policy.for_caller(caller.service, caller.namespace or request.peer.namespace)
        accounts = models.proxy.service_accounts if models is not None and models.scope is not None else None
        bound = bind_to_peer(caller, request.peer, accounts)
        if isinstance(bound, str):
            log.warning("refused a call: the caller %s", bound)
            self.metrics.identity_refusals.labels("mismatch").inc()
            return ApiError(ErrorKind.PERMISSION, f"the caller {bound}", "identity_mismatch")
        return bound

    def _on_headers(self, request: HttpRequest, end_of_stream: bool
                    ) -> Decision | Exchange | JobLookup | ProviderCall:
        policy = self._policies()
        mesh = policy.mesh
        # Headers only we may set: the identity header (unless trusted), the usage-filter switch, a job token.
        strip = (USAGE_HEADER, JOB_HEADER) if mesh.identity.trust_header else (
            mesh.identity.header, USAGE_HEADER, JOB_HEADER)
        strip = tuple(h for h in strip if h in request.headers)
        if self.jobs is not None and request.path.startswith(JOBS_PATH):
            caller = identify(request.attributes, request.headers, mesh.identity)
            bound = self._bind(request, caller, policy)
            if isinstance(bound, ApiError):
                return _reject(api_of_caller(request.path, dict(request.headers)), bound)
            if request.method != "GET":
                return _reject(api_of_caller(request.path, dict(request.headers)), ApiError(
                    ErrorKind.METHOD, f"{request.method} is not allowed on {JOBS_PATH}<id>; use GET", "method"))
            return JobLookup(self.jobs, request.path, request.headers, bound)
        endpoint = classify(request.path)
        if endpoint is None or (request.method != "POST" and resource(
                request.method, request.path, dict(request.headers)) is not None):
            return self._other_path(request, policy, strip)
        if request.method != "POST":
            return _reject(endpoint.api, ApiError(
                ErrorKind.METHOD, f"{request.method} is not allowed on {endpoint.suffix}; use POST", "method"))
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type not in _JSON_TYPES:
            return _reject(endpoint.api, ApiError(
                ErrorKind.MEDIA_TYPE, f"content-type must be application/json, got {content_type or 'none'!r}",
                "unsupported_media_type"))
        if end_of_stream:
            return _reject(endpoint.api, ApiError(ErrorKind.INVALID_REQUEST, "request body is empty",
                                                  "empty_body"))
        caller = identify(request.attributes, request.headers, mesh.identity)
        bound = self._bind(request, caller, policy)
        if isinstance(bound, ApiError):
            return _reject(endpoint.api, bound)
        caller = bound
        claim = JobClaim.verify(request.headers, self.signer, caller, self.job_workers)
        if claim is not None:
            caller = claim.as_caller(caller)  # the worker replays the job as the service that submitted it
        service = policy.for_caller(caller.service, caller.namespace)
        if service is None:
            return _reject(endpoint.api, ApiError(
                ErrorKind.PERMISSION, f"{caller.describe()} has no AI policy in this mesh", "no_policy"))
        return Exchange(self, request, endpoint, caller, policy, service, strip, claim)


# Calls the processor answers itself that are not refusals: served from the cache, or queued as a job.
_LOCAL_OUTCOMES = {"cache_hit": "cache_hit", "job_accepted": "queued"}


def reply_record(request: HttpRequest, caller: Caller, endpoint: Endpoint, reply: LocalReply, policy: PolicySet,
                 requested: str) -> CallRecord:
    """The record of a call answered by the processor itself: refused, or served from the cache."""
    now = time.time()
    headers = dict(reply.headers)
    code = reply.details.removeprefix("ai_")
    return CallRecord(
        service=caller.service or "", namespace=caller.namespace or "", operation=endpoint.operation,
        caller_api=str(endpoint.api), requested_model=requested, route=headers.get("x-ai-route", ""),
        provider=headers.get("x-ai-provider", ""), response_model=headers.get("x-ai-model", ""),
        status=reply.status, outcome=_LOCAL_OUTCOMES.get(code, f"refused:{code}"),
        streamed=headers.get("content-type", "").startswith("text/event-stream"), started_at=now, ended_at=now,
        cache="hit" if code == "cache_hit" else "", variant=headers.get("x-ai-variant", ""),
        hops=reply.hops,
        policy_version=policy.version, request_id=request.headers.get("x-request-id", ""),
        traceparent=request.headers.get("traceparent", ""), b3=_b3_of(request.headers),
        error="" if code in _LOCAL_OUTCOMES else code)


def _for_provider(data: dict[str, object], body_format: str, provider_format: str, model: str, mesh: MeshSettings
                  ) -> tuple[dict[str, object], bool] | ApiError:
    """The request body in the provider's format, for ``model``; True when it had to change."""
    if body_format == provider_format:
        if data.get("model") == model:
            return data, False
        return {**data, "model": model}, True
    default_max = mesh.quota.default_max_output_tokens
    try:
        if (body_format, provider_format) == ("openai", "anthropic"):
            return openai_to_anthropic.request(data, model=model, default_max_tokens=default_max), True
        if (body_format, provider_format) == ("anthropic", "openai"):
            return anthropic_to_openai.request(data, model=model), True
        if (body_format, provider_format) == (RESPONSES_FORMAT, "anthropic"):
            return responses_to_anthropic.request(data, model=model, default_max_tokens=default_max), True
    except TranslationError as exc:
        return ApiError(ErrorKind.INVALID_REQUEST, f"the model is served through the {provider_format} API and this "
                        f"call cannot be translated to it: {exc.message}", "untranslatable_request")
    return ApiError(ErrorKind.INVALID_REQUEST, f"the model is served through the {provider_format} API, and a "
                    f"{body_format} call is not translated to it", "untranslatable_request")


def _asks_usage(data: dict[str, object]) -> bool:
    options = data.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _b3_of(headers: Mapping[str, str]) -> str:
    """The B3 trace context in its single-header form, from either B3 encoding."""
    single = headers.get("b3", "")
    if single:
        return single
    trace, span = headers.get("x-b3-traceid", ""), headers.get("x-b3-spanid", "")
    if not (trace and span):
        return ""
    sampled = headers.get("x-b3-sampled", "")
    return "-".join(part for part in (trace, span, sampled) if part)


def _max_output_tokens(data: dict[str, object], endpoint: Endpoint, default: int) -> int:
    if endpoint.operation == "embeddings":
        return 0
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def _inject_stream_usage(data: dict[str, object], operation: str) -> bool:
    """Ask an OpenAI stream for its usage chunk when the caller did not; True if we had to."""
    if operation not in ("chat_completions", "completions") or data.get("stream") is not True:
        return False
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    data["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True


def _reject(api: Api, error: ApiError) -> LocalReply:
    return LocalReply(error.kind.status, error.render(api), f"ai_{error.code}")


# Deeper nesting than any real request needs; orjson reads up to 1024 levels but writes only 254, and
# a deep body costs every stage that walks it.
MAX_JSON_DEPTH = 64
# Integers orjson cannot hold exactly (it reads them as floats): such bodies are read by the stdlib.
_BIG_INT = re.compile(rb"\d{20}|-\d{19}")
# Fields the decision reads: if one appears twice, the provider might read the other copy than we did
# (first key wins in some parsers, last in ours), so such a body is always re-serialised with one copy.
_DECISIVE_KEYS = (b'"model"', b'"stream"', b'"stream_options"', b'"max_tokens"', b'"max_completion_tokens"')


def parse_body(body: bytes) -> tuple[dict[str, object], bool] | ApiError:
    """The request object, and whether it must be re-serialised before it is sent on."""
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _too_deep(body):
        return ApiError(ErrorKind.INVALID_REQUEST, f"request body nests deeper than {MAX_JSON_DEPTH} levels",
                        "invalid_json")
    data = _parse_json(body)
    if isinstance(data, ApiError):
        return data
    return data, any(body.count(key) > 1 for key in _DECISIVE_KEYS)


def _too_deep(body: bytes) -> bool:
    """Bracket depth outside strings: a byte scan, run only for bodies with many brackets."""
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


def dump_json(data: object) -> bytes:
    try:
        return orjson.dumps(data)
    except TypeError:  # an integer beyond 64 bits, read exactly by the stdlib
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(body: bytes) -> dict[str, object] | ApiError:
    try:
        if _BIG_INT.search(body) is not None:
            data = json.loads(body, parse_constant=_no_constant)
        else:
            data = orjson.loads(body)
    except (orjson.JSONDecodeError, ValueError) as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            return ApiError(ErrorKind.INVALID_REQUEST, f"request body is not valid UTF-8 (byte {bad.start})",
                            "invalid_utf8")
        return ApiError(ErrorKind.INVALID_REQUEST, f"request body is not valid JSON: {exc}", "invalid_json")
    if not isinstance(data, dict):
        return ApiError(ErrorKind.INVALID_REQUEST, "request body must be a JSON object", "invalid_json")
    return data
