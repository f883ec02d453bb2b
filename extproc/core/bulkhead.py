"""Bulkheads: a cap on one service's AI calls in flight, so it cannot take all of the processor or
a provider from the others.

A call enters at the decision and leaves when its response has been read (the usage stream closes),
which may happen on another replica; calls are tracked by id with a deadline, so a call whose end is
never seen (its response stream went to another replica, or was lost) stops counting after
``ttl_s`` instead of leaking capacity forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Bulkhead:
    def __init__(self, ttl_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._calls: dict[tuple[str, str], dict[str, float]] = {}
        self._ttl_s = ttl_s
        self._clock = clock

    def enter(self, scope: tuple[str, str], call_id: str, limit: int) -> bool:
        """Admit the call if the scope has room; False means refuse it."""
        now = self._clock()
        calls = self._calls.setdefault(scope, {})
        if len(calls) >= limit:
            for key in [k for k, deadline in calls.items() if deadline <= now]:
                del calls[key]
            if len(calls) >= limit:
                return False
        calls[call_id] = now + self._ttl_s
        return True

    def leave(self, scope: tuple[str, str], call_id: str) -> None:
        calls = self._calls.get(scope)
        if calls is not None:
            calls.pop(call_id, None)

    def in_flight(self, scope: tuple[str, str]) -> int:
        return len(self._calls.get(scope, ()))
