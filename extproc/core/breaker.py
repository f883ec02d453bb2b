"""Circuit breakers per (namespace, service, provider, model).

State is per calling service on purpose: one service hammering a failing model never changes where
another service's calls go. Each processor replica keeps its own breakers (they learn from the
calls they see, which under Envoy's per-stream load balancing is a fair sample of all calls).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from extproc.policy.model import BreakerSettings

BreakerKey = tuple[str, str, str, str]  # namespace, service, provider, model


class State(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(slots=True)
class Breaker:
    settings: BreakerSettings
    state: State = State.CLOSED
    consecutive: int = 0
    opened_at: float = 0.0
    probe_at: float = 0.0  # when the half-open probe was let through (0: none outstanding)
    outcomes: deque[tuple[float, bool]] = field(default_factory=deque)  # (time, failed) within the window

    def allow(self, now: float) -> bool:
        """May a call go to this target now? In half-open, exactly one probe at a time."""
        if self.state == State.CLOSED:
            return True
        open_for = self.settings.open_for / 1000
        if self.state == State.OPEN:
            if now - self.opened_at < open_for:
                return False
            self.state = State.HALF_OPEN
            self.probe_at = 0.0
        # A probe that never reported (its response was lost) does not block the breaker forever.
        if self.probe_at and now - self.probe_at < open_for:
            return False
        self.probe_at = now
        return True

    def record(self, failed: bool, now: float) -> None:
        if self.state == State.HALF_OPEN:
            if failed:
                self._open(now)
            else:
                self._close()
            return
        if self.state == State.OPEN:
            return  # a late answer from before the breaker opened
        self.consecutive = self.consecutive + 1 if failed else 0
        window = self.settings.window / 1000
        self.outcomes.append((now, failed))
        while self.outcomes and now - self.outcomes[0][0] > window:
            self.outcomes.popleft()
        failures = sum(1 for _, f in self.outcomes if f)
        rate_tripped = (len(self.outcomes) >= self.settings.min_calls
                        and failures / len(self.outcomes) >= self.settings.error_rate)
        if self.consecutive >= self.settings.consecutive_failures or rate_tripped:
            self._open(now)

    def _open(self, now: float) -> None:
        self.state, self.opened_at, self.probe_at = State.OPEN, now, 0.0
        self.outcomes.clear()

    def _close(self) -> None:
        self.state, self.consecutive, self.probe_at = State.CLOSED, 0, 0.0
        self.outcomes.clear()


class Breakers:
    """The explicit registry of breakers; ``on_change`` reports state changes (for the metrics gauge)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[BreakerKey, State], None] | None = None) -> None:
        self._breakers: dict[BreakerKey, Breaker] = {}
        self._clock = clock
        self._on_change = on_change

    def _get(self, key: BreakerKey, settings: BreakerSettings) -> Breaker:
        breaker = self._breakers.get(key)
        if breaker is None or breaker.settings != settings:  # a policy change resets the breaker
            breaker = self._breakers[key] = Breaker(settings)
        return breaker

    def allow(self, key: BreakerKey, settings: BreakerSettings) -> bool:
        if not settings.enabled:
            return True
        before = self.state(key)  # read before _get: new settings replace the breaker with a closed one
        breaker = self._get(key, settings)
        allowed = breaker.allow(self._clock())
        self._changed(key, before, breaker.state)
        return allowed

    def record(self, key: BreakerKey, settings: BreakerSettings, *, failed: bool) -> None:
        if not settings.enabled:
            return
        before = self.state(key)
        breaker = self._get(key, settings)
        breaker.record(failed, self._clock())
        self._changed(key, before, breaker.state)

    def state(self, key: BreakerKey) -> State:
        breaker = self._breakers.get(key)
        return breaker.state if breaker is not None else State.CLOSED

    def snapshot(self) -> dict[BreakerKey, State]:
        return {key: b.state for key, b in self._breakers.items()}

    def _changed(self, key: BreakerKey, before: State, after: State) -> None:
        if before != after and self._on_change is not None:
            self._on_change(key, after)
