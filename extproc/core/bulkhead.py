"""Bulkheads: a cap on one service's AI calls in flight, so it cannot take all of the processor or
a provider from the others.

A call enters at the decision and leaves when its response has been read (the usage stream closes),
which may happen on another replica; calls are tracked by id with a deadline, so a call whose end is
never seen (its response stream was lost) stops counting after ``ttl_s`` instead of leaking
capacity forever. With several replicas the slots must be shared (:class:`SharedBulkhead`, in the
quota store's Redis): a slot taken on one replica is often given back on another.

A dead or frozen Redis is left alone for a moment after a failure (:class:`~extproc.base.outage.Outage`)
instead of costing every call its timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from extproc.base.outage import Outage

log = logging.getLogger(__name__)


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
            self._expire(calls, now)
            if len(calls) >= limit:
                return False
        calls[call_id] = now + self._ttl_s
        return True

    def leave(self, scope: tuple[str, str], call_id: str) -> bool:
        """Free the call's slot; False if it held none here."""
        calls = self._calls.get(scope)
        if calls is None or calls.pop(call_id, None) is None:
            return False
        if not calls:
            del self._calls[scope]
        return True

    def in_flight(self, scope: tuple[str, str]) -> int:
        calls = self._calls.get(scope)
        if not calls:
            return 0
        self._expire(calls, self._clock())
        return len(calls)

    @staticmethod
    def _expire(calls: dict[str, float], now: float) -> None:
        for key in [k for k, deadline in calls.items() if deadline <= now]:
            del calls[key]


# Enter atomically, on the server's clock (replicas' clocks may differ): drop expired slots, then
# take one if the scope has room. The set expires when its last slot would.
_ENTER = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
_MAX_DEFERRED = 10_000  # slots to give back once Redis answers again; beyond that they expire on their own


class SharedBulkhead:
    """Bulkhead slots in Redis, for several processor replicas: a call's slot is taken by the replica
    that decides it and given back by whichever replica reads its response.

    When Redis fails (down, or not answering within ``timeout_s``) each replica enforces the cap alone
    for ``retry_after_s`` before trying Redis again (:class:`Outage`): a dead Redis costs one timeout
    per second, not one per call. Slots taken locally meanwhile are given back locally, and keep
    counting against the cap on this replica once Redis is used again. Redis slots whose end is seen
    during the outage are given back when Redis answers again (or expire after ``ttl_s``).
    """

    def __init__(self, url: str, prefix: str, timeout_s: float, ttl_s: float = 300.0,
                 retry_after_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=16, timeout=max(timeout_s, 1.0), socket_timeout=timeout_s,
            socket_connect_timeout=max(timeout_s, 1.0), retry=Retry(NoBackoff(), 0))
        self._client = redis.Redis(connection_pool=pool)
        self._enter = self._client.register_script(_ENTER)
        self._prefix = prefix
        self._ttl_ms = int(ttl_s * 1000)
        self._local = Bulkhead(ttl_s, clock)  # while Redis is down: each replica enforces the cap alone
        self.outage = Outage("bulkhead store (Redis)", retry_after_s, clock=clock,
                             fallback="enforcing bulkheads per replica", logger=log)
        self._deferred: dict[tuple[tuple[str, str], str], None] = {}  # Redis slots left during an outage
        self._flushing: asyncio.Task[None] | None = None

    def _key(self, scope: tuple[str, str]) -> str:
        return f"{self._prefix}:bulkhead:{{{scope[0]}/{scope[1]}}}"

    async def enter(self, scope: tuple[str, str], call_id: str, limit: int) -> bool:
        from redis.exceptions import RedisError

        if self.outage.skip():
            return self._local.enter(scope, call_id, limit)
        # Slots taken here during an outage are not in Redis but still in flight: they count too.
        room = limit - self._local.in_flight(scope)
        if room <= 0:
            return False
        try:
            entered = bool(await self._enter(keys=[self._key(scope)], args=[call_id, room, self._ttl_ms]))
        except (RedisError, OSError) as exc:
            self.outage.failed(exc)
            return self._local.enter(scope, call_id, limit)
        self._recovered()
        return entered

    async def leave(self, scope: tuple[str, str], call_id: str) -> None:
        from redis.exceptions import RedisError

        local = self._local.leave(scope, call_id)
        if self.outage.skip():
            if not local:  # a Redis slot: give it back once Redis answers
                self._defer(scope, call_id)
            return
        try:
            # Also for a local slot: its Redis attempt may have timed out after Redis took it.
            await self._client.zrem(self._key(scope), call_id)
        except (RedisError, OSError) as exc:
            self.outage.failed(exc)
            if not local:
                self._defer(scope, call_id)
            return
        self._recovered()

    def in_flight_locally(self, scope: tuple[str, str]) -> int:
        """Slots this replica holds outside Redis (taken during an outage)."""
        return self._local.in_flight(scope)

    def _defer(self, scope: tuple[str, str], call_id: str) -> None:
        if len(self._deferred) < _MAX_DEFERRED:
            self._deferred[(scope, call_id)] = None

    def _recovered(self) -> None:
        self.outage.recovered()
        if self._deferred and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Give back the Redis slots whose calls ended during the outage, in the background."""
        from redis.exceptions import RedisError

        pending, self._deferred = self._deferred, {}
        by_scope: dict[tuple[str, str], list[str]] = {}
        for scope, call_id in pending:
            by_scope.setdefault(scope, []).append(call_id)
        try:
            for scope, call_ids in by_scope.items():
                await self._client.zrem(self._key(scope), *call_ids)
        except (RedisError, OSError) as exc:
            log.warning("bulkhead store: %d slot(s) left during the outage not given back (%s); they expire "
                        "on their own", len(pending), exc)

    async def close(self) -> None:
        if self._flushing is not None and not self._flushing.done():
            self._flushing.cancel()
        await self._client.aclose()


class LocalBulkhead:
    """The per-replica bulkhead behind the same asynchronous interface as :class:`SharedBulkhead`."""

    def __init__(self, bulkhead: Bulkhead | None = None) -> None:
        self.slots = bulkhead or Bulkhead()

    async def enter(self, scope: tuple[str, str], call_id: str, limit: int) -> bool:
        return self.slots.enter(scope, call_id, limit)

    async def leave(self, scope: tuple[str, str], call_id: str) -> None:
        self.slots.leave(scope, call_id)

    async def close(self) -> None:
        return None
