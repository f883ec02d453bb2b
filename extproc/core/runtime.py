"""The services every stage of a call shares, in one explicit object.

The decision, the relay, the credential port and the response side are handed a :class:`Runtime`
rather than reaching into each other for what they need.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from extproc.base.tokens import Signer
from extproc.cache.store import ResponseCache
from extproc.core.breaker import BreakerKey, Breakers, State
from extproc.core.bulkhead import LocalBulkhead, SharedBulkhead
from extproc.core.cloud_auth import CloudAuth
from extproc.core.credentials import CredentialStore
from extproc.core.identity import Caller
from extproc.core.inflight import InFlightStore, MemoryInFlight
from extproc.core.messages import Decision, Forward
from extproc.policy.compiled import PolicySet
from extproc.quota.engine import QuotaEngine
from extproc.telemetry.metrics import CallLabels, Metrics
from extproc.telemetry.record import CallRecord, CallTelemetry

if TYPE_CHECKING:
    from extproc.jobs.store import JobStore

log = logging.getLogger(__name__)


class Runtime:
    """The current policy snapshot and the shared services: credentials, quota, cache, breakers,
    bulkhead, in-flight store, signer, metrics, telemetry and the job store."""

    def __init__(self, policies: Callable[[], PolicySet], credentials: CredentialStore, quota: QuotaEngine,
                 cache: ResponseCache, metrics: Metrics | None = None, *, signer: Signer | None = None,
                 breakers: Breakers | None = None, bulkhead: LocalBulkhead | SharedBulkhead | None = None,
                 telemetry: CallTelemetry | None = None, jobs: JobStore | None = None,
                 job_workers: frozenset[str] = frozenset({"ai-extproc-worker"}),
                 inflight: InFlightStore | None = None, peer_identity: bool = False,
                 cloud: CloudAuth | None = None) -> None:
        self._policies = policies
        self.credentials = credentials
        self.cloud = cloud or CloudAuth()  # AWS and Google credentials, resolved off the event loop
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
        self.observe_all = telemetry is not None and bool(telemetry.sinks)
        self.jobs = jobs  # asynchronous calls are on when a job store is connected
        self.job_workers = job_workers  # identities whose calls may carry a job token for another service

    def policy(self) -> PolicySet:
        return self._policies()

    def record(self, record: CallRecord) -> None:
        """A finished call, for the access log, traces and usage events (never raises)."""
        if self.telemetry is not None:
            try:
                self.telemetry.emit(record)
            except Exception:  # telemetry must never break a call
                log.exception("telemetry failed")

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
        self.metrics.calls.labels(*labels.caller, *labels.providers, labels.request_model, outcome).inc()

    def _breaker_changed(self, key: BreakerKey, state: State) -> None:
        namespace, service, provider, model = key
        labels = CallLabels.of(self._policies(), service=service, namespace=namespace, provider=provider,
                               request_model=model)
        self.metrics.breaker_state.labels(*labels.caller, *labels.providers, labels.request_model).set(int(state))
        log.warning("circuit breaker for %s/%s → %s/%s is now %s", namespace, service, provider, model,
                    state.name.lower())
