"""The outage back-off and a replica's own bulkhead (fake clock: the cap per scope, leaving, entries that
expire), and the shared bulkhead against a private redis-server that is frozen (SIGSTOP) mid-test: one call
may pay Redis's timeout, the ones after it use the replica's own slots at once, and Redis is used again
after it thaws."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from devtools.launch import free_port
from extproc.base.outage import Outage
from extproc.core.bulkhead import Bulkhead, SharedBulkhead
from tests.conftest import _redis_answers, missing
from tests.unit.resilience_support import OTHER_SCOPE, SCOPE, Clock

# --- Outage --------------------------------------------------------------------------------------------

def test_outage_backs_off_then_lets_one_probe_through(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    outage = Outage("store", 1.0, clock=clock)
    assert not outage.skip() and not outage.ongoing
    outage.failed("timeout")
    assert outage.ongoing and outage.skip()
    clock.now += 0.99
    assert outage.skip()
    clock.now += 0.02
    assert not outage.skip()  # the window is over: this caller probes...
    assert outage.skip() and outage.skip()  # ...and the others keep skipping until its answer
    outage.failed("timeout again")
    clock.now += 0.5
    assert outage.skip()
    clock.now += 0.6
    assert not outage.skip()
    outage.recovered()
    assert not outage.ongoing and not outage.skip() and not outage.skip()


def test_outage_logs_once_per_outage_not_per_failure(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    outage = Outage("store", 1.0, clock=clock, fallback="doing it alone")
    with caplog.at_level(logging.INFO, logger="extproc.core.bulkhead"):
        for _ in range(50):
            outage.failed("timeout")
            clock.now += 0.1
        outage.recovered()
        outage.recovered()  # nothing to say: not in an outage
        outage.failed("refused")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert "store unavailable (timeout); doing it alone" in messages[0]
    assert "reachable again after 5.0s (50 failed attempt(s))" in messages[1]
    assert "store unavailable (refused)" in messages[2] and outage.outages == 2


def test_a_known_outage_without_back_off_is_logged_but_not_waited_out() -> None:
    outage = Outage("store", 1.0, clock=Clock())
    outage.failed("reconnecting", back_off=False)
    assert outage.ongoing and not outage.skip()


# --- Bulkhead (one replica's own slots) -------------------------------------------------------------------


def test_bulkhead_cap_is_enforced_per_scope() -> None:
    bulkhead = Bulkhead(clock=Clock())
    assert bulkhead.enter(SCOPE, "a", 2)
    assert bulkhead.enter(SCOPE, "b", 2)
    assert not bulkhead.enter(SCOPE, "c", 2)
    assert bulkhead.in_flight(SCOPE) == 2
    # Another scope has its own slots.
    assert bulkhead.enter(OTHER_SCOPE, "c", 2)
    assert bulkhead.enter(OTHER_SCOPE, "d", 2)
    assert not bulkhead.enter(OTHER_SCOPE, "e", 2)
    assert bulkhead.in_flight(SCOPE) == 2 and bulkhead.in_flight(OTHER_SCOPE) == 2


def test_bulkhead_leave_frees_a_slot() -> None:
    bulkhead = Bulkhead(clock=Clock())
    assert bulkhead.enter(SCOPE, "a", 1)
    assert not bulkhead.enter(SCOPE, "b", 1)
    bulkhead.leave(OTHER_SCOPE, "a")  # another scope's leave frees nothing here
    bulkhead.leave(SCOPE, "unknown")
    assert not bulkhead.enter(SCOPE, "b", 1)
    bulkhead.leave(SCOPE, "a")
    assert bulkhead.in_flight(SCOPE) == 0
    assert bulkhead.enter(SCOPE, "b", 1)
    assert bulkhead.in_flight(SCOPE) == 1


def test_bulkhead_entries_expire_after_ttl() -> None:
    clock = Clock(1000.0)
    bulkhead = Bulkhead(ttl_s=60.0, clock=clock)
    assert bulkhead.enter(SCOPE, "lost", 1)  # its end is never seen
    clock.now = 1059.0
    assert not bulkhead.enter(SCOPE, "b", 1)
    clock.now = 1060.0
    assert bulkhead.enter(SCOPE, "b", 1)
    assert bulkhead.in_flight(SCOPE) == 1  # "lost" is gone, "b" holds the slot
    clock.now = 1100.0
    assert not bulkhead.enter(SCOPE, "c", 1)  # "b" entered at 1060: counts until 1120


# --- SharedBulkhead on a frozen Redis ---------------------------------------------------------------------

TIMEOUT_S = 0.5  # the quota store's default timeout_ms: 500
FAST_S = 0.05


@pytest.fixture
def private_redis() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A redis-server of this test's own: it gets frozen, which the machine's shared one must never be."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing("no redis-server binary to start a private Redis")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _redis_answers(port):
            if time.monotonic() > deadline:
                missing("a private redis-server did not start")
            time.sleep(0.05)
        yield process, port
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.terminate()
        process.wait(10)


def test_a_frozen_redis_costs_one_timeout_then_the_replica_enforces_the_cap_alone(
        private_redis: tuple[subprocess.Popen[bytes], int], caplog: pytest.LogCaptureFixture) -> None:
    process, port = private_redis
    url = f"redis://127.0.0.1:{port}/0"
    direct = redis.Redis.from_url(url)
    key = f"bh-test:bulkhead:{{{SCOPE[0]}/{SCOPE[1]}}}"

    def in_redis(call_id: str) -> bool:
        return direct.zscore(key, call_id) is not None

    async def timed(call: object) -> tuple[object, float]:
        started = time.perf_counter()
        result = await call  # type: ignore[misc]
        return result, time.perf_counter() - started

    async def scenario() -> None:
        bulkhead = SharedBulkhead(url, "bh-test", TIMEOUT_S)
        try:
            # Healthy: slots live in Redis.
            assert await bulkhead.enter(SCOPE, "before", 3)
            assert await bulkhead.enter(SCOPE, "left-during-outage", 3)
            assert in_redis("before") and in_redis("left-during-outage")
            await bulkhead.leave(SCOPE, "before")
            assert not in_redis("before")

            os.kill(process.pid, signal.SIGSTOP)
            # The first call finds out: it waits Redis's timeout, then takes a slot of this replica.
            entered, first_s = await timed(bulkhead.enter(SCOPE, "first", 3))
            assert entered and TIMEOUT_S * 0.8 <= first_s < TIMEOUT_S + 0.5, first_s
            # Every call in the back-off window is decided locally, at once.
            durations = []
            for n in range(20):
                entered, took = await timed(bulkhead.enter(SCOPE, f"call-{n}", 3))
                assert entered
                durations.append(took)
                _, took = await timed(bulkhead.leave(SCOPE, f"call-{n}"))  # entered locally: left locally
                durations.append(took)
            assert max(durations) < FAST_S, durations
            # The cap still holds, per replica: "first" and "second" fill it (the Redis slot of
            # "left-during-outage" is not seen from here).
            assert (await timed(bulkhead.enter(SCOPE, "second", 2)))[0]
            refused, took = await timed(bulkhead.enter(SCOPE, "third", 2))
            assert not refused and took < FAST_S
            # A Redis slot whose call ends meanwhile: nothing waits on Redis, it is given back later.
            _, took = await timed(bulkhead.leave(SCOPE, "left-during-outage"))
            assert took < FAST_S
            assert bulkhead.in_flight_locally(SCOPE) == 2  # "first" and "second"
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "extproc.core.bulkhead"]
            assert len(errors) == 1, [r.getMessage() for r in errors]  # once per outage, not per call

            os.kill(process.pid, signal.SIGCONT)
            await asyncio.sleep(bulkhead.outage.retry_after_s + 0.1)
            # Redis again: a new slot is taken there, and the outage is over.
            entered, took = await timed(bulkhead.enter(SCOPE, "after", 10))
            assert entered and took < TIMEOUT_S and in_redis("after") and not bulkhead.outage.ongoing
            # The slots taken locally still count against the cap after the outage: 2 here + "after" in Redis.
            assert bulkhead.in_flight_locally(SCOPE) == 2 and not await bulkhead.enter(SCOPE, "over-the-cap", 3)
            # The Redis slot left during the outage is given back now that Redis answers again.
            for _ in range(50):
                if not in_redis("left-during-outage"):
                    break
                await asyncio.sleep(0.02)
            assert not in_redis("left-during-outage")
            # Local slots are given back locally (and in Redis, in case "first"'s timed-out attempt landed
            # there once Redis thawed).
            await bulkhead.leave(SCOPE, "first")
            await bulkhead.leave(SCOPE, "second")
            assert bulkhead.in_flight_locally(SCOPE) == 0
            assert not in_redis("first") and not in_redis("second")
            assert await bulkhead.enter(SCOPE, "fits-again", 3)
            assert set(direct.zrange(key, 0, -1)) == {b"after", b"fits-again"}
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
            await bulkhead.close()
            direct.close()

    with caplog.at_level(logging.INFO, logger="extproc.core.bulkhead"):
        asyncio.run(asyncio.wait_for(scenario(), 30))
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_a_dead_redis_is_not_retried_on_every_call(private_redis: tuple[subprocess.Popen[bytes], int]) -> None:
    process, port = private_redis

    async def scenario() -> None:
        bulkhead = SharedBulkhead(f"redis://127.0.0.1:{port}/0", "bh-test", TIMEOUT_S)
        try:
            assert await bulkhead.enter(SCOPE, "warm", 5)
            process.terminate()
            process.wait(10)
            assert await bulkhead.enter(SCOPE, "first", 5)  # connection refused or reset: quick anyway
            started = time.perf_counter()
            for n in range(50):
                assert await bulkhead.enter(SCOPE, f"c{n}", 100)
                await bulkhead.leave(SCOPE, f"c{n}")
            assert time.perf_counter() - started < 0.2
            assert bulkhead.outage.ongoing and bulkhead.outage.failures == 1  # tried once, not 100 times
        finally:
            await bulkhead.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
