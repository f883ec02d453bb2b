"""The in-flight store: calls opened, closed once, swept after their deadline; nonces used once; and a
frozen Redis costing one timeout, not one per call."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

from extproc.core.inflight import MemoryInFlight, OpenCall, RedisInFlight
from extproc.quota.engine import Reservation
from tests.unit.test_bulkhead import private_redis  # noqa: F401 - the fixture

CALL = OpenCall("c1", "shop", "order-service", deadline=1000.0, slot=True,
                reservation=Reservation("redis", ("k",), ("total_tokens",), (500,)), input_estimate=7,
                provider="openai", model="gpt-4")


def test_record_round_trip() -> None:
    assert OpenCall.decode(CALL.encode()) == CALL


def test_memory_store_closes_once_and_sweeps_what_is_due() -> None:
    async def scenario() -> None:
        store = MemoryInFlight(clock=lambda: 0.0)
        await store.open(CALL)
        await store.open(OpenCall("c2", "shop", "order-service", 2000.0, slot=False, reservation=None))
        assert await store.expired(999.0) == []
        assert await store.expired(1000.0) == [CALL]  # handed out once...
        assert await store.close("c1") is False  # ...so a late settlement releases nothing
        assert await store.close("c2") is True and await store.close("c2") is False
        assert await store.first_use("n", 60) and not await store.first_use("n", 60)

    asyncio.run(scenario())


def test_redis_store_is_shared_and_single_use(private_redis: tuple[subprocess.Popen[bytes], int]) -> None:  # noqa: F811
    _, port = private_redis

    async def scenario() -> None:
        one, two = (RedisInFlight(f"redis://127.0.0.1:{port}/0", "t", 0.5) for _ in range(2))  # two replicas
        await one.open(CALL)
        assert await two.expired(999.0) == []
        assert await two.expired(1000.0) == [CALL]
        assert await one.expired(1000.0) == []  # only one replica's sweeper gets it
        assert await one.close("c1") is False
        await one.open(CALL)
        assert await two.close("c1") is True and await one.close("c1") is False
        assert await one.first_use("nonce", 60) and not await two.first_use("nonce", 60)
        await one.aclose()
        await two.aclose()

    asyncio.run(scenario())


def test_a_frozen_redis_costs_one_timeout_not_one_per_call(private_redis: tuple[subprocess.Popen[bytes], int],  # noqa: F811
                                                          ) -> None:
    process, port = private_redis

    async def scenario() -> None:
        store = RedisInFlight(f"redis://127.0.0.1:{port}/0", "t", 0.3)
        await store.open(CALL)  # a connection in the pool
        os.kill(process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            await store.open(OpenCall("c9", "shop", "order-service", 1000.0, slot=True, reservation=None))
            assert time.monotonic() - started >= 0.25  # the first pays the timeout...
            for n in range(20):
                started = time.monotonic()
                await store.open(OpenCall(f"d{n}", "shop", "order-service", 1000.0, slot=True, reservation=None))
                assert await store.first_use(f"n{n}", 60)
                assert await store.close(f"d{n}") is True
                assert time.monotonic() - started < 0.05  # ...the others are tracked on this replica at once
            assert store.outage.ongoing and store.outage.outages == 1
        finally:
            os.kill(process.pid, signal.SIGCONT)
        await asyncio.sleep(store.outage.retry_after_s + 0.1)
        await store.open(OpenCall("after", "shop", "order-service", 1000.0, slot=True, reservation=None))
        assert not store.outage.ongoing
        await store.aclose()

    asyncio.run(scenario())
