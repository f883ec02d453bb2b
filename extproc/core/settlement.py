"""The response side of an AI call: read what the provider really used and settle the reservation.

Runs on a separate ext_proc stream (Envoy's usage filter), possibly on another replica than the
decision: everything it needs travels in the decision's dynamic metadata, nothing in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson

from extproc.core.usage import Usage, UsageTracker
from extproc.policy.compiled import PolicySet
from extproc.quota.engine import QuotaEngine, Reservation
from extproc.quota.plan import Estimate

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SettleInfo:
    reservation: Reservation
    api: str
    input_estimate: int
    provider: str
    model: str

    def encode(self) -> str:
        return orjson.dumps({"r": self.reservation.encode(), "api": self.api, "in": self.input_estimate,
                             "p": self.provider, "m": self.model}).decode()

    @classmethod
    def decode(cls, text: str) -> SettleInfo:
        raw = orjson.loads(text)
        return cls(Reservation.decode(raw["r"]), raw["api"], int(raw["in"]), raw["p"], raw["m"])


class Settlement:
    def __init__(self, info: SettleInfo, policy: PolicySet, quota: QuotaEngine, strip: bool) -> None:
        self.info = info
        self._policy = policy
        self._quota = quota
        self._strip = strip
        self._status = 0
        self._tracker: UsageTracker | None = None
        self.settled: Usage | None = None

    def on_headers(self, status: int, content_type: str) -> None:
        self._status = status
        streaming = content_type.startswith("text/event-stream")
        self._tracker = UsageTracker(self.info.api, streaming=streaming, strip_injected_usage=self._strip and streaming)

    def feed(self, chunk: bytes) -> bytes:
        return self._tracker.feed(chunk) if self._tracker is not None else chunk

    def flush(self) -> bytes:
        return self._tracker.finish() if self._tracker is not None else b""

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
        try:
            await self._quota.settle(self.info.reservation, Estimate(usage.input_tokens, usage.output_tokens, cost))
        except Exception:  # settlement must never break a response
            log.exception("settlement failed")
        return usage
