"""Where entries live: in-process (LRU, bounded in entries and bytes) or Redis (shared by replicas).

A cache problem is never the caller's problem: a store error reads as a miss and a skipped write.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from extproc.cache.entry import CacheEntry, decode_entry
from extproc.policy.model import CacheSettings

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    rejected_entries: int = 0  # corrupt, foreign or oversized: ignored
    errors: int = 0


class ResponseCache:
    def __init__(self, settings: CacheSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self.stats = CacheStats()
        self._memory: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._redis: redis.Redis | None = None
        if settings.backend == "redis":
            timeout = settings.timeout_ms / 1000
            pool = redis.BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=32, timeout=max(timeout, 1.0), socket_timeout=timeout,
                socket_connect_timeout=max(timeout, 1.0), retry=Retry(NoBackoff(), 0))
            self._redis = redis.Redis(connection_pool=pool)

    @property
    def backend_name(self) -> str:
        return "redis" if self._redis is not None else "memory"

    async def get(self, key: str) -> CacheEntry | None:
        raw = await self._get_raw(key)
        if raw is None:
            self.stats.misses += 1
            return None
        entry = decode_entry(raw, self.settings.max_entry_bytes)
        if entry is None:
            self.stats.rejected_entries += 1
            self.stats.misses += 1
            log.warning("ignoring a damaged or oversized cache entry %s", key)
            return None
        self.stats.hits += 1
        return entry

    async def put(self, key: str, entry: CacheEntry, ttl_s: int) -> bool:
        if len(entry.body) > self.settings.max_entry_bytes:
            return False
        raw = entry.encode()
        if self._redis is not None:
            try:
                await self._redis.set(key, raw, ex=ttl_s)
            except (RedisError, OSError) as exc:
                self.stats.errors += 1
                log.warning("cache write failed: %s", exc)
                return False
        else:
            self._put_memory(key, raw, self._clock() + ttl_s)
        self.stats.stores += 1
        return True

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def _get_raw(self, key: str) -> bytes | None:
        if self._redis is not None:
            try:
                value = await self._redis.get(key)
            except (RedisError, OSError) as exc:
                self.stats.errors += 1
                log.warning("cache read failed, treating as a miss: %s", exc)
                return None
            if value is None:
                return None
            # The pool does not decode responses, so this is bytes; redis types it as bytes | str.
            return value.encode() if isinstance(value, str) else bytes(value)
        found = self._memory.get(key)
        if found is None:
            return None
        raw, expires = found
        if expires <= self._clock():
            self._drop(key)
            return None
        self._memory.move_to_end(key)
        return raw

    def _put_memory(self, key: str, raw: bytes, expires: float) -> None:
        if key in self._memory:
            self._drop(key)
        self._memory[key] = (raw, expires)
        self._bytes += len(raw)
        while self._memory and (len(self._memory) > self.settings.max_entries or self._bytes > self.settings.max_bytes):
            self._drop(next(iter(self._memory)))  # least recently used first

    def _drop(self, key: str) -> None:
        raw, _ = self._memory.pop(key)
        self._bytes -= len(raw)
