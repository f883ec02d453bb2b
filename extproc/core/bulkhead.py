"""Bulkheads: a cap on one service's AI calls in flight, so it cannot take all of the processor or
a provider from the others.

A call enters at the decision and leaves when its response has been read (the usage stream closes),
which may happen on another replica; calls are tracked by id with a deadline, so a call whose end is
never seen (its response stream was lost) stops counting after ``ttl_s`` instead of leaking
capacity forever. With several replicas the slots must be shared (:class:`SharedBulkhead`, in the
quota store's Redis): a slot taken on one replica is often given back on another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

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


class SharedBulkhead:
    """Bulkhead slots in Redis, for several processor replicas: a call's slot is taken by the replica
    that decides it and given back by whichever replica reads its response."""

    def __init__(self, url: str, prefix: str, timeout_s: float, ttl_s: float = 300.0) -> None:
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
        self._local = Bulkhead(ttl_s)  # while Redis is down: each replica enforces the cap alone

    def _key(self, scope: tuple[str, str]) -> str:
        return f"{self._prefix}:bulkhead:{{{scope[0]}/{scope[1]}}}"

    async def enter(self, scope: tuple[str, str], call_id: str, limit: int) -> bool:
        from redis.exceptions import RedisError

        try:
            return bool(await self._enter(keys=[self._key(scope)], args=[call_id, limit, self._ttl_ms]))
        except (RedisError, OSError) as exc:
            log.warning("bulkhead store unavailable (%s): enforcing the cap per replica", exc)
            return self._local.enter(scope, call_id, limit)

    async def leave(self, scope: tuple[str, str], call_id: str) -> None:
        from redis.exceptions import RedisError

        self._local.leave(scope, call_id)
        try:
            await self._client.zrem(self._key(scope), call_id)
        except (RedisError, OSError) as exc:
            log.warning("bulkhead store unavailable (%s): slot of %s expires on its own", exc, call_id)

    async def close(self) -> None:
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
