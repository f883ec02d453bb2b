"""The response side of an AI call: read what the provider really used and settle the reservation.

Runs on a separate ext_proc stream (Envoy's usage filter), possibly on another replica than the
decision: everything it needs travels in the decision's dynamic metadata, nothing in memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import orjson

from extproc.cache.entry import CacheEntry
from extproc.cache.store import ResponseCache
from extproc.core.usage import Usage, UsageTracker
from extproc.policy.compiled import PolicySet
from extproc.quota.engine import QuotaEngine, Reservation
from extproc.quota.plan import Estimate
from extproc.telemetry.metrics import CallLabels, Metrics, record_usage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SettleInfo:
    """What the response side needs to know about a call, carried in its dynamic metadata."""

    reservation: Reservation | None  # quota to settle
    api: str
    input_estimate: int
    provider: str
    model: str
    cache_key: str | None = None  # store a complete, successful response here
    cache_ttl_s: int = 0
    operation: str = ""
    route: str = ""
    decided_at: float = 0.0  # epoch seconds: durations are measured across replicas by the wall clock
    service: str = ""
    namespace: str = ""

    def encode(self) -> str:
        return orjson.dumps({"r": self.reservation.encode() if self.reservation else None, "api": self.api,
                             "in": self.input_estimate, "p": self.provider, "m": self.model,
                             "ck": self.cache_key, "ct": self.cache_ttl_s, "op": self.operation,
                             "rt": self.route, "t0": self.decided_at, "sv": self.service,
                             "ns": self.namespace}).decode()

    @classmethod
    def decode(cls, text: str) -> SettleInfo:
        raw = orjson.loads(text)
        reservation = Reservation.decode(raw["r"]) if raw.get("r") else None
        return cls(reservation, raw["api"], int(raw["in"]), raw["p"], raw["m"], raw.get("ck"), int(raw.get("ct", 0)),
                   raw.get("op", ""), raw.get("rt", ""), float(raw.get("t0", 0.0)), raw.get("sv", ""),
                   raw.get("ns", ""))


class Settlement:
    def __init__(self, info: SettleInfo, policy: PolicySet, quota: QuotaEngine, cache: ResponseCache,
                 strip: bool, metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        self._first_byte_at: float | None = None
        self.info = info
        self._policy = policy
        self._quota = quota
        self._cache = cache
        self._strip = strip
        self._status = 0
        self._content_type = ""
        self._tracker: UsageTracker | None = None
        # What the caller received, kept only while it may still be cached.
        self._body: bytearray | None = bytearray() if info.cache_key else None
        self.settled: Usage | None = None

    def on_headers(self, status: int, content_type: str) -> None:
        self._status = status
        self._content_type = content_type
        streaming = content_type.startswith("text/event-stream")
        self._tracker = UsageTracker(self.info.api, streaming=streaming, strip_injected_usage=self._strip and streaming)

    def feed(self, chunk: bytes) -> bytes:
        if self._first_byte_at is None and chunk:
            self._first_byte_at = time.time()
        return self._keep(self._tracker.feed(chunk) if self._tracker is not None else chunk)

    def flush(self) -> bytes:
        return self._keep(self._tracker.finish() if self._tracker is not None else b"")

    def _keep(self, forwarded: bytes) -> bytes:
        if self._body is not None:
            if len(self._body) + len(forwarded) > self._cache.settings.max_entry_bytes:
                self._body = None  # too large to cache: stop holding it
            else:
                self._body += forwarded
        return forwarded

    async def settle(self, complete: bool) -> Usage:
        """Settle once: real usage if the provider reported it, else an estimate; nothing for errors."""
        if self.settled is not None:
            return self.settled
        tracker = self._tracker
        if not 200 <= self._status < 300 or tracker is None:
            usage = Usage(0, 0, reported=False)  # the provider refused or never answered: refund
        elif complete and tracker.complete and tracker.usage is not None:
            usage = tracker.usage  # the provider's final count (an Anthropic message_start alone is not)
        else:
            usage = tracker.estimate(self.info.input_estimate)
        self.settled = usage
        price = self._policy.prices.lookup(self.info.provider, self.info.model)
        cost = price.micro_usd(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens) if price else 0
        if self.info.reservation is not None:
            try:
                await self._quota.settle(self.info.reservation,
                                         Estimate(usage.input_tokens, usage.output_tokens, cost))
            except Exception:  # settlement must never break a response
                log.exception("settlement failed")
        if self._metrics is not None:
            self._observe(usage, cost)
        if complete and self._body is not None and self._status == 200 and self.info.cache_key:
            # Only whole successful answers: never an error, never a cut stream (no end of stream).
            entry = CacheEntry(self._status, self._content_type, bytes(self._body), usage.input_tokens,
                               usage.output_tokens, time.time())
            await self._cache.put(self.info.cache_key, entry, self.info.cache_ttl_s)
        return usage

    def _observe(self, usage: Usage, cost_micro_usd: int) -> None:
        info, metrics = self.info, self._metrics
        assert metrics is not None
        labels = CallLabels.of(self._policy, service=info.service, namespace=info.namespace, provider=info.provider,
                               request_model=info.route, response_model=info.model)
        genai = (info.operation, labels.provider, labels.request_model, labels.response_model)
        record_usage(metrics, labels, info.operation, usage)
        metrics.cost.labels(*labels.caller, labels.provider, labels.response_model).inc(cost_micro_usd / 1e6)
        if info.decided_at:
            now = time.time()
            metrics.duration.labels(*labels.caller, *genai, str(self._status)).observe(max(0.0, now - info.decided_at))
            if self._first_byte_at is not None and self._content_type.startswith("text/event-stream"):
                metrics.ttft.labels(*labels.caller, *genai).observe(max(0.0, self._first_byte_at - info.decided_at))
