"""What admitted calls hold until they end, and a backstop that frees it when their end is never seen.

A call admitted by the decision may hold a bulkhead slot and a token reservation. Both are given
back by the response side (the usage stream), which opens only when the provider's response
headers come back. A caller that gives up first, or an Envoy that dies, leaves no response stream:
without a backstop the slot and the reservation would stay taken until their window ends. So each
such call is registered with a deadline (its timeout, which Envoy enforces, plus a grace period),
closed by whoever releases it first, and swept after the deadline. Exactly one party releases a
call: ``close`` answers True to only one caller, whether that is the settlement, the decision
undoing itself, or the sweeper.

The same store keeps the nonces of single-use tokens (fallback hops): ``first_use`` is True once.

With the Redis quota store both live in Redis, so a call opened on one replica may be closed or
swept on another; with the memory store they are per replica, like the counters themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import orjson

from extproc.base.outage import Outage
from extproc.quota.engine import Reservation

log = logging.getLogger(__name__)

# Between a call's timeout and its sweep: Envoy's response stream and our settlement need a moment.
GRACE_S = 5.0
_SWEEP_BATCH = 200


@dataclass(frozen=True, slots=True)
class OpenCall:
    """What one admitted call holds, and when it is certainly over."""

    call_id: str  # made by the processor, never taken from the caller
    namespace: str
    service: str
    deadline: float  # epoch seconds
    slot: bool  # holds a bulkhead slot
    reservation: Reservation | None  # token/cost reservation to settle
    input_estimate: int = 0  # what the call is settled on if its end is never seen
    provider: str = ""
    model: str = ""

    @property
    def scope(self) -> tuple[str, str]:
        return self.namespace, self.service

    def encode(self) -> bytes:
        return orjson.dumps([self.call_id, self.namespace, self.service, self.deadline, self.slot,
                             self.reservation.encode() if self.reservation else None, self.input_estimate,
                             self.provider, self.model])

    @classmethod
    def decode(cls, raw: bytes | str) -> OpenCall:
        call_id, namespace, service, deadline, slot, reservation, estimate, provider, model = orjson.loads(raw)
        return cls(str(call_id), str(namespace), str(service), float(deadline), bool(slot),
                   Reservation.decode(reservation) if reservation else None, int(estimate), str(provider),
                   str(model))


class InFlightStore(Protocol):
    async def open(self, call: OpenCall) -> None: ...

    async def close(self, call_id: str) -> bool:
        """True for exactly one caller per opened call: that caller releases what it holds."""
        ...

    async def take(self, call_id: str) -> OpenCall | None:
        """Like close, returning what the call holds (for a releaser that does not know it)."""
        ...

    async def expired(self, now: float) -> list[OpenCall]:
        """Calls past their deadline, each handed out (and closed) once, for the sweeper to release."""
        ...

    async def first_use(self, nonce: str, ttl_s: float) -> bool:
        """True the first time ``nonce`` is seen within ``ttl_s``; False for a replay."""
        ...

    async def aclose(self) -> None: ...


class MemoryInFlight:
    """Per replica: right for one replica, as the memory quota store is."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._calls: dict[str, OpenCall] = {}
        self._nonces: dict[str, float] = {}
        self._clock = clock

    async def open(self, call: OpenCall) -> None:
        self._calls[call.call_id] = call

    async def close(self, call_id: str) -> bool:
        return self._calls.pop(call_id, None) is not None

    async def take(self, call_id: str) -> OpenCall | None:
        return self._calls.pop(call_id, None)

    async def expired(self, now: float) -> list[OpenCall]:
        due = [c for c in self._calls.values() if c.deadline <= now][:_SWEEP_BATCH]
        for call in due:
            del self._calls[call.call_id]
        for nonce in [n for n, until in self._nonces.items() if until <= now]:
            del self._nonces[nonce]
        return due

    async def first_use(self, nonce: str, ttl_s: float) -> bool:
        now = self._clock()
        until = self._nonces.get(nonce)
        if until is not None and until > now:
            return False
        self._nonces[nonce] = now + ttl_s
        return True

    def __len__(self) -> int:
        return len(self._calls)

    async def aclose(self) -> None:
        return None


class RedisInFlight:
    """Shared by every replica: a sorted set of call ids by deadline, and each call's record."""

    def __init__(self, url: str, prefix: str, timeout_s: float) -> None:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=16, timeout=max(timeout_s, 1.0), socket_timeout=timeout_s,
            socket_connect_timeout=max(timeout_s, 1.0), retry=Retry(NoBackoff(), 0))
        self._client = redis.Redis(connection_pool=pool)
        # One hash slot for both keys (Redis Cluster): the braces.
        self._deadlines = f"{prefix}:{{inflight}}:deadlines"
        self._records = f"{prefix}:{{inflight}}:calls"
        self._nonce_prefix = f"{prefix}:nonce:"
        self._local = MemoryInFlight()  # calls opened while Redis was down are tracked here
        self.outage = Outage("in-flight store (Redis)", fallback="calls and token nonces are tracked per replica",
                             logger=log)

    async def open(self, call: OpenCall) -> None:
        from redis.exceptions import RedisError

        if self.outage.skip():
            await self._local.open(call)
            return
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zadd(self._deadlines, {call.call_id: call.deadline})
                pipe.hset(self._records, call.call_id, call.encode())
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.outage.failed(exc)
            await self._local.open(call)
        else:
            self.outage.recovered()

    async def close(self, call_id: str) -> bool:
        from redis.exceptions import RedisError

        if await self._local.close(call_id):
            return True
        if self.outage.skip():
            return True  # as below: release now rather than leak
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zrem(self._deadlines, call_id)
                pipe.hdel(self._records, call_id)
                removed, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            # Nobody can tell whether the sweeper got there first: release now rather than leak; the
            # sweeper's record, if any, is freed once more at worst.
            self.outage.failed(exc)
            return True
        self.outage.recovered()
        return bool(removed)

    async def take(self, call_id: str) -> OpenCall | None:
        from redis.exceptions import RedisError

        local = await self._local.take(call_id)
        if local is not None or self.outage.skip():
            return local
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zrem(self._deadlines, call_id)
                pipe.hget(self._records, call_id)
                pipe.hdel(self._records, call_id)
                removed, record, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.outage.failed(exc)
            return None  # the sweeper releases it after its deadline
        self.outage.recovered()
        return OpenCall.decode(record) if removed and record is not None else None

    async def expired(self, now: float) -> list[OpenCall]:
        from redis.exceptions import RedisError

        due = await self._local.expired(now)
        if self.outage.skip():
            return due
        try:
            ids = await self._client.zrangebyscore(self._deadlines, "-inf", now, start=0, num=_SWEEP_BATCH)
            # Without withscores the reply is the members alone; redis types it with the scored form too.
            for raw_id in cast("list[bytes]", ids):
                # ZREM decides which replica's sweeper owns the call: only one gets 1.
                if not await self._client.zrem(self._deadlines, raw_id):
                    continue
                record = await self._client.hget(self._records, raw_id)
                await self._client.hdel(self._records, raw_id)
                if record is not None:
                    due.append(OpenCall.decode(record))
        except (RedisError, OSError) as exc:
            self.outage.failed(exc)
        return due

    async def first_use(self, nonce: str, ttl_s: float) -> bool:
        from redis.exceptions import RedisError

        if self.outage.skip():
            return await self._local.first_use(nonce, ttl_s)  # during an outage: per replica
        try:
            first = bool(await self._client.set(self._nonce_prefix + nonce, b"1", nx=True,
                                                px=max(1, int(ttl_s * 1000))))
        except (RedisError, OSError) as exc:
            self.outage.failed(exc)
            return await self._local.first_use(nonce, ttl_s)
        self.outage.recovered()
        return first

    async def aclose(self) -> None:
        await self._client.aclose()
