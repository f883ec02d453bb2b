"""Admitting a call (a bulkhead slot, then its quota) and giving back what it holds: when the decision
fails after admitting it, when its response has been read, or when its end was never seen (the
sweeper, after its deadline).

Whoever closes the call in the in-flight store first releases it; the others find it closed and do
nothing, so a slot is never left twice nor a reservation settled twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from extproc.base.apis import ApiError, Endpoint, ErrorKind
from extproc.core.identity import Caller
from extproc.core.inflight import GRACE_S, InFlightStore, OpenCall
from extproc.core.messages import LocalReply, reject
from extproc.core.routing import Target
from extproc.core.usage import estimate_request_tokens
from extproc.quota.engine import QuotaEngine, Refused, Reservation, Unavailable
from extproc.quota.plan import METRIC_REQUESTS, Estimate, plan_counters
from extproc.telemetry.metrics import CallLabels

if TYPE_CHECKING:
    from extproc.core.bulkhead import LocalBulkhead, SharedBulkhead
    from extproc.core.runtime import Runtime
    from extproc.policy.compiled import PolicySet, ServiceModels
    from extproc.policy.model import ModelRoute

log = logging.getLogger(__name__)
SWEEP_INTERVAL_S = 1.0
# Operations that cost no tokens (quota counts the request only, nothing is reserved or settled).
FREE_OPERATIONS = frozenset({"count_tokens"})


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


@dataclass(frozen=True, slots=True)
class Admission:
    """One call's admission: who asks, under which policy, for what."""

    runtime: Runtime
    policy: PolicySet
    service: ServiceModels
    caller: Caller
    endpoint: Endpoint

    @property
    def scope(self) -> tuple[str, str]:
        """(namespace, service) of the caller: what its bulkhead and in-flight calls are kept under."""
        return self.caller.namespace or "", self.caller.service or "unknown"

    @property
    def labels(self) -> tuple[str, str]:
        return CallLabels.of(self.policy, service=self.caller.service, namespace=self.caller.namespace).caller

    async def admit(self, data: dict[str, object], route: ModelRoute, target: Target, *, job_reservation: str | None
                    = None, job: bool = False) -> Held | LocalReply:
        """Take what the call needs, bulkhead slot then quota, or refuse it; nothing is kept on a refusal.

        A job's execution (``job``) was charged when it was submitted: it settles that reservation
        (``job_reservation``) instead, and the worker bounds each service's jobs itself.
        """
        # Made here, never taken from the caller: a caller-chosen id could share one slot among many calls.
        call_id = uuid.uuid4().hex
        limit = None if job else self.service.proxy.max_in_flight or self.policy.mesh.resilience.max_in_flight
        if limit is not None and not await self.runtime.bulkhead.enter(self.scope, call_id, limit):
            self.runtime.metrics.bulkhead_rejections.labels(*self.labels).inc()
            return reject(self.endpoint.api, ApiError(
                ErrorKind.RATE_LIMIT, f"{self.caller.describe()} already has {limit} AI calls in flight (its "
                "max_in_flight); retry when one has finished", "too_many_calls_in_flight", openai_type="requests"))
        try:
            # Quota last: a call refused for any other reason must not consume it.
            charge = (self._job_charge(data, job_reservation) if job else await self.charge(data, route, target))
        except BaseException:
            if limit is not None:
                await self.runtime.bulkhead.leave(self.scope, call_id)
            raise
        if isinstance(charge, LocalReply):
            if limit is not None:
                await self.runtime.bulkhead.leave(self.scope, call_id)
            return charge
        # A job's reservation belongs to the job (its worker retries): it is not ours to release.
        reservation = charge.reservation if charge is not None and not job else None
        timeout = route.timeout or self.policy.mesh.resilience.default_timeout
        call = OpenCall(call_id, *self.scope, time.time() + timeout / 1000 + GRACE_S,
                        slot=limit is not None, reservation=reservation,
                        input_estimate=charge.input_tokens if charge is not None else 0,
                        provider=target.provider.name, model=target.model)
        return Held(call, charge)

    async def release_unused(self, held: Held, opened: bool) -> None:
        """Undo an admission the call will not use; once opened, only if no one else released it first."""
        if not opened or await self.runtime.inflight.close(held.call.call_id):
            await release(held.call, quota=self.runtime.quota, bulkhead=self.runtime.bulkhead, used=None)

    def _job_charge(self, data: dict[str, object], reservation: str | None) -> Charge:
        return Charge(Reservation.decode(reservation) if reservation else None, {},
                      estimate_request_tokens(data, self.endpoint.api))

    async def charge(self, data: dict[str, object], route: ModelRoute, target: Target
                     ) -> Charge | LocalReply | None:
        """The call's quota: reserved on its estimate, refused (429 with retry-after), or None if it has none."""
        quota = self.runtime.quota
        proxy = self.service.proxy
        namespace, service = self.service.scope or (self.caller.namespace, self.caller.service or "unknown")
        counters = plan_counters(
            prefix=self.policy.mesh.quota.key_prefix, namespace=namespace, service=service, proxy=proxy,
            mesh=self.policy.mesh, route=route, provider=target.provider.name, now=quota.now())
        if not counters:
            return None
        estimate = self._estimate(data, target)
        fail_mode = proxy.on_quota_backend_failure or self.policy.mesh.quota.on_backend_failure
        admission = await quota.admit(counters, estimate, fail_mode)
        if isinstance(admission, Refused):
            counter = admission.counter
            self.runtime.metrics.quota_rejections.labels(*self.labels, counter.metric).inc()
            kind = "requests" if counter.metric == METRIC_REQUESTS else "tokens"
            return reject(self.endpoint.api, ApiError(
                ErrorKind.RATE_LIMIT, f"rate limit exceeded: {counter.label}; retry after {admission.retry_after_s}s",
                "rate_limit_exceeded", openai_type=kind)).with_headers(("retry-after", str(admission.retry_after_s)))
        if isinstance(admission, Unavailable):
            return reject(self.endpoint.api, ApiError(
                ErrorKind.UNAVAILABLE, f"quota cannot be checked: {admission.reason}", "quota_backend_unavailable"))
        return Charge(admission.reservation, admission.headers, estimate.input_tokens)

    def _estimate(self, data: dict[str, object], target: Target) -> Estimate:
        if self.endpoint.operation in FREE_OPERATIONS:
            input_tokens = output_tokens = 0  # counted as a request, never as tokens
        else:
            input_tokens = estimate_request_tokens(data, self.endpoint.body_format)
            output_tokens = max_output_tokens(data, self.endpoint, self.policy.mesh.quota.default_max_output_tokens)
        price = self.policy.prices.lookup(target.provider.name, target.model)
        return Estimate(input_tokens, output_tokens,
                        price.micro_usd(input_tokens, output_tokens) if price is not None else 0)


def max_output_tokens(data: dict[str, object], endpoint: Endpoint, default: int) -> int:
    if endpoint.operation == "embeddings":
        return 0
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


async def release(call: OpenCall, *, quota: QuotaEngine, bulkhead: LocalBulkhead | SharedBulkhead,
                  used: Estimate | None) -> None:
    """Give back the call's slot and settle its reservation on ``used`` (None: refund it whole)."""
    if call.slot:
        await bulkhead.leave(call.scope, call.call_id)
    if call.reservation is not None:
        try:
            if used is None:
                await quota.refund(call.reservation)
            else:
                await quota.settle(call.reservation, used)
        except Exception:  # the backstop must go on with the other calls
            log.exception("could not release the reservation of call %s", call.call_id)


async def sweep_once(inflight: InFlightStore, *, quota: QuotaEngine, bulkhead: LocalBulkhead | SharedBulkhead,
                     policy: Callable[[], PolicySet], now: float | None = None) -> int:
    """Release every call past its deadline; how many there were."""
    due = await inflight.expired(time.time() if now is None else now)
    prices = policy().prices
    for call in due:
        # Nothing says how far it got: what was sent is charged, the reserved output is given back.
        price = prices.lookup(call.provider, call.model)
        cost = price.micro_usd(call.input_estimate, 0) if price is not None else 0
        await release(call, quota=quota, bulkhead=bulkhead, used=Estimate(call.input_estimate, 0, cost))
        log.info("call %s of %s/%s ended unseen (caller gone or response lost): its slot and reservation "
                 "were released after its deadline", call.call_id, call.namespace, call.service)
    return len(due)


async def sweep_forever(inflight: InFlightStore, *, quota: QuotaEngine, bulkhead: LocalBulkhead | SharedBulkhead,
                        policy: Callable[[], PolicySet], on_swept: Callable[[int], None] | None = None,
                        interval_s: float = SWEEP_INTERVAL_S) -> None:
    """The backstop task: never dies on an error, only when cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            swept = await sweep_once(inflight, quota=quota, bulkhead=bulkhead, policy=policy)
            if swept and on_swept is not None:
                on_swept(swept)
        except Exception:
            log.exception("in-flight sweep failed; retrying")
