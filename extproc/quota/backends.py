"""Counter stores. Both admit atomically: either every counter takes the call or none does."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

# One round trip per decision: check every counter, then increment all of them, or none.
_ADMIT = """
for i = 1, #KEYS do
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  if current + tonumber(ARGV[2 * i - 1]) > tonumber(ARGV[2 * i]) then
    return {i, current}
  end
end
local values = {0}
for i = 1, #KEYS do
  values[i + 1] = redis.call('INCRBY', KEYS[i], ARGV[2 * i - 1])
  redis.call('EXPIRE', KEYS[i], ARGV[2 * #KEYS + 1 + i], 'NX')
end
return values
"""

# Settlement: correct reservations by what was really used; never resurrect an expired window.
_ADJUST = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local value = redis.call('INCRBY', KEYS[i], ARGV[i])
    if value < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
end
return 0
"""


class BackendDown(Exception):
    pass


class Backend(Protocol):
    name: str

    async def admit(self, keys: Sequence[str], amounts: Sequence[int], limits: Sequence[int],
                    ttls: Sequence[int]) -> tuple[int, list[int]]:
        """(0, values after) when admitted; (i, current value) when counter i (1-based) would overflow."""
        ...

    async def adjust(self, keys: Sequence[str], deltas: Sequence[int]) -> None: ...

    async def read(self, keys: Sequence[str]) -> list[int]: ...


class MemoryBackend:
    """In-process counters: exact for one replica; also the backstop when Redis is down."""

    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._values: dict[str, tuple[int, float]] = {}

    def _get(self, key: str, now: float) -> int:
        entry = self._values.get(key)
        if entry is None or entry[1] <= now:
            return 0
        return entry[0]

    async def admit(self, keys: Sequence[str], amounts: Sequence[int], limits: Sequence[int],
                    ttls: Sequence[int]) -> tuple[int, list[int]]:
        now = self._clock()
        if len(self._values) > 100_000:
            self._expire(now)
        current = [self._get(k, now) for k in keys]
        for i, (value, amount, limit) in enumerate(zip(current, amounts, limits, strict=True)):
            if value + amount > limit:
                return i + 1, [value]
        after = []
        for key, value, amount, ttl in zip(keys, current, amounts, ttls, strict=True):
            expires = self._values[key][1] if key in self._values and value else now + ttl
            self._values[key] = (value + amount, expires)
            after.append(value + amount)
        return 0, after

    async def adjust(self, keys: Sequence[str], deltas: Sequence[int]) -> None:
        now = self._clock()
        for key, delta in zip(keys, deltas, strict=True):
            entry = self._values.get(key)
            if entry is not None and entry[1] > now:
                self._values[key] = (max(0, entry[0] + delta), entry[1])

    async def read(self, keys: Sequence[str]) -> list[int]:
        now = self._clock()
        return [self._get(k, now) for k in keys]

    def _expire(self, now: float) -> None:
        for key in [k for k, (_, expires) in self._values.items() if expires <= now]:
            del self._values[key]


class RedisBackend:
    """Counters shared by every replica; each decision is one EVALSHA round trip."""

    name = "redis"

    def __init__(self, url: str, timeout_s: float, max_connections: int = 32) -> None:
        # A bounded pool: a burst of calls queues for a connection instead of opening one socket each
        # (connection storms time out and would read as an outage).
        # No client-side retries: one failed round trip is an answer (fail open or closed), not a reason
        # to spend several timeouts on the caller's request.
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=max(timeout_s, 1.0), socket_timeout=timeout_s,
            socket_connect_timeout=max(timeout_s, 1.0), retry=Retry(NoBackoff(), 0))
        self._client = redis.Redis(connection_pool=pool)
        self._admit = self._client.register_script(_ADMIT)
        self._adjust = self._client.register_script(_ADJUST)

    async def admit(self, keys: Sequence[str], amounts: Sequence[int], limits: Sequence[int],
                    ttls: Sequence[int]) -> tuple[int, list[int]]:
        args: list[int] = [x for pair in zip(amounts, limits, strict=True) for x in pair]
        args += [0, *ttls]
        try:
            result = await self._admit(keys=list(keys), args=args)
        except (RedisError, OSError) as exc:
            raise BackendDown(str(exc)) from exc
        return int(result[0]), [int(v) for v in result[1:]]

    async def adjust(self, keys: Sequence[str], deltas: Sequence[int]) -> None:
        try:
            await self._adjust(keys=list(keys), args=list(deltas))
        except (RedisError, OSError) as exc:
            raise BackendDown(str(exc)) from exc

    async def read(self, keys: Sequence[str]) -> list[int]:
        try:
            values = await self._client.mget(list(keys)) if keys else []
        except (RedisError, OSError) as exc:
            raise BackendDown(str(exc)) from exc
        return [int(v) if v is not None else 0 for v in values]

    async def close(self) -> None:
        await self._client.aclose()
