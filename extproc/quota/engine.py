"""Admission and settlement against the configured counter store, with a defined answer when it is down."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson

from extproc.policy.model import QuotaSettings
from extproc.quota.backends import Backend, BackendDown, MemoryBackend, RedisBackend
from extproc.quota.plan import METRIC_REQUESTS, Counter, Estimate
from extproc.quota.windows import reset_text

log = logging.getLogger(__name__)
_RETRY_BACKEND_AFTER_S = 1.0
_TTL_MARGIN_S = 60  # keep a window's counter a little past its end so late settlements still land


@dataclass(frozen=True, slots=True)
class Reservation:
    """What an admitted call charged, so the response side can settle it (on any replica)."""

    backend: str
    keys: tuple[str, ...]
    metrics: tuple[str, ...]
    amounts: tuple[int, ...]

    def encode(self) -> str:
        return orjson.dumps([self.backend, self.keys, self.metrics, self.amounts]).decode()

    @classmethod
    def decode(cls, text: str) -> Reservation:
        backend, keys, metrics, amounts = orjson.loads(text)
        return cls(backend, tuple(keys), tuple(metrics), tuple(int(a) for a in amounts))


@dataclass(frozen=True, slots=True)
class Admitted:
    reservation: Reservation | None
    headers: dict[str, str]  # x-ratelimit-* values for the caller


@dataclass(frozen=True, slots=True)
class Refused:
    counter: Counter
    retry_after_s: int
    current: int


@dataclass(frozen=True, slots=True)
class Unavailable:
    reason: str


Admission = Admitted | Refused | Unavailable


@dataclass
class QuotaStats:
    admitted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    backend_errors: int = 0
    backstop_admissions: int = 0
    refused_backend_down: int = 0


class QuotaEngine:
    def __init__(self, settings: QuotaSettings, clock: Callable[[], float] = time.time,
                 shared: Backend | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._local = MemoryBackend(clock)
        if shared is not None:
            self._shared: Backend | None = shared
        elif settings.backend == "redis":
            self._shared = RedisBackend(settings.redis_url, settings.timeout_ms / 1000)
        else:
            self._shared = None
        self._down_until = 0.0
        self.stats = QuotaStats()

    def now(self) -> float:
        return self._clock()

    @property
    def backend_name(self) -> str:
        return self._shared.name if self._shared is not None else self._local.name

    async def admit(self, counters: Sequence[Counter], estimate: Estimate, fail_mode: str) -> Admission:
        if not counters:
            return Admitted(None, {})
        now = self._clock()
        keys = [c.key for c in counters]
        amounts = [estimate.amount(c.metric) for c in counters]
        limits = [c.limit for c in counters]
        ttls = [max(1, math.ceil(c.window_end - now)) + _TTL_MARGIN_S for c in counters]
        backend: Backend = self._local
        try:
            if self._shared is not None:
                backend = self._shared_or_raise()
            failed, values = await backend.admit(keys, amounts, limits, ttls)
        except BackendDown as exc:
            if backend is not self._local:
                self._mark_down(exc)
            if fail_mode == "closed":
                self.stats.refused_backend_down += 1
                return Unavailable(f"the shared quota store is unreachable ({exc})")
            backend = self._local
            self.stats.backstop_admissions += 1
            failed, values = await backend.admit(keys, amounts, limits, ttls)
        if backend is self._shared:
            self._mark_recovered()
        if failed:
            counter = counters[failed - 1]
            self.stats.refused[counter.metric] = self.stats.refused.get(counter.metric, 0) + 1
            return Refused(counter, max(1, math.ceil(counter.window_end - now)), values[0])
        self.stats.admitted += 1
        reservation = Reservation(backend.name, tuple(keys), tuple(c.metric for c in counters), tuple(amounts))
        return Admitted(reservation, _headers(counters, values, now))

    async def settle(self, reservation: Reservation, actual: Estimate) -> None:
        """Replace the reserved estimate by what was really used (requests are final at admission)."""
        deltas = [0 if m == METRIC_REQUESTS else actual.amount(m) - a
                  for m, a in zip(reservation.metrics, reservation.amounts, strict=True)]
        keys = [k for k, d in zip(reservation.keys, deltas, strict=True) if d]
        deltas = [d for d in deltas if d]
        if not keys:
            return
        backend = self._local if reservation.backend == self._local.name or self._shared is None else self._shared
        try:
            await backend.adjust(keys, deltas)
        except BackendDown as exc:
            self._mark_down(exc)
            log.warning("could not settle %d counter(s): %s", len(keys), exc)

    async def refund(self, reservation: Reservation) -> None:
        """Give back everything a call reserved, requests included: it was never sent."""
        backend = self._local if reservation.backend == self._local.name or self._shared is None else self._shared
        try:
            await backend.adjust(list(reservation.keys), [-a for a in reservation.amounts])
        except BackendDown as exc:
            self._mark_down(exc)
            log.warning("could not refund %d counter(s): %s", len(reservation.keys), exc)

    async def read(self, keys: Sequence[str]) -> list[int]:
        return await (self._shared or self._local).read(keys)

    async def close(self) -> None:
        if isinstance(self._shared, RedisBackend):
            await self._shared.close()

    def _shared_or_raise(self) -> Backend:
        assert self._shared is not None
        if self._down_until:
            if self._clock() < self._down_until:
                # During the back-off a dead store costs no timeout per call.
                raise BackendDown("unreachable, retrying shortly")
            log.info("retrying the shared quota store")
        return self._shared

    def _mark_recovered(self) -> None:
        if self._down_until:
            log.info("quota store reachable again")
            self._down_until = 0.0

    def _mark_down(self, exc: Exception) -> None:
        self.stats.backend_errors += 1
        if not self._down_until or self._clock() >= self._down_until:
            log.error("quota store unreachable (%s); retrying in %.0fs", exc, _RETRY_BACKEND_AFTER_S)
        self._down_until = self._clock() + _RETRY_BACKEND_AFTER_S


def _headers(counters: Sequence[Counter], values: Sequence[int], now: float) -> dict[str, str]:
    """OpenAI-style x-ratelimit-* for the tightest request and token counters."""
    headers: dict[str, str] = {}
    for kind, metrics in (("requests", {METRIC_REQUESTS}), ("tokens", {"input_tokens", "output_tokens",
                                                                        "total_tokens"})):
        candidates = [(c.limit - v, c) for c, v in zip(counters, values, strict=True) if c.metric in metrics]
        if candidates:
            remaining, counter = min(candidates, key=lambda pair: pair[0])
            headers[f"limit_{kind}"] = str(counter.limit)
            headers[f"remaining_{kind}"] = str(max(0, remaining))
            headers[f"reset_{kind}"] = reset_text(counter.window_end - now)
    return headers
