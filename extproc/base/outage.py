"""Back-off for a shared store that calls wait on (Redis for the bulkhead and the in-flight store, NATS
for the job store): a store that stops answering costs one timeout per back-off period, not one per
call, and its outage is logged once, not once per call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Outage:
    """Back-off after a failure of a shared store, with one probe at a time and one log line per outage.

    ``skip()`` says whether to leave the store alone now (use the fallback, or fail at once): true
    for ``retry_after_s`` after the last failure. When that has passed, the next caller (one only)
    probes the store: the others keep skipping until its answer, so a dead store costs one timeout
    per ``retry_after_s``, not one per call. Callers report ``failed()`` and ``recovered()``.
    """

    def __init__(self, what: str, retry_after_s: float = 1.0, *, fallback: str = "",
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger | None = None) -> None:
        self.what = what
        self.retry_after_s = retry_after_s
        self._fallback = fallback
        self._clock = clock
        self._log = logger or log
        self._since = 0.0  # when the outage began; 0 while the store is healthy
        self._retry_at = 0.0  # until when calls skip the store; 0 when they may use it
        self.failures = 0  # failed attempts in the current outage
        self.outages = 0  # outages since start (metrics, tests)
        self.reason = ""  # what the last failure said

    @property
    def ongoing(self) -> bool:
        return bool(self._since)

    def skip(self) -> bool:
        if not self._retry_at:
            return False
        now = self._clock()
        if now < self._retry_at:
            return True
        self._retry_at = now + self.retry_after_s  # this caller probes; the others keep skipping meanwhile
        return False

    def failed(self, reason: object, *, back_off: bool = True) -> None:
        """A failed attempt. ``back_off=False`` when the caller already knows the store is down without
        trying it (a client that is reconnecting): logged, but nothing to wait out."""
        now = self._clock()
        self.failures += 1
        self.reason = str(reason or "error")
        if back_off:
            self._retry_at = now + self.retry_after_s
        if not self._since:
            self._since = now
            self.outages += 1
            instead = f"; {self._fallback}" if self._fallback else ""
            self._log.error("%s unavailable (%s)%s; retrying every %gs until it answers", self.what,
                            self.reason, instead, self.retry_after_s)

    def recovered(self) -> None:
        if self._since:
            self._log.warning("%s reachable again after %.1fs (%d failed attempt(s))", self.what,
                              self._clock() - self._since, self.failures)
        self._since = self._retry_at = 0.0
        self.failures = 0
        self.reason = ""
