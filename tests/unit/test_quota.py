"""Quota planning, windows and admission/settlement on both counter stores (Redis is the real one)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from extproc.policy.model import AIProxy, Limits, MeshSettings, ModelRoute, QuotaSettings
from extproc.quota.backends import MemoryBackend
from extproc.quota.engine import Admitted, QuotaEngine, Refused, Unavailable
from extproc.quota.plan import Estimate, plan_counters
from extproc.quota.windows import MONTH, reset_text, window


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_windows_are_aligned_in_utc() -> None:
    assert window(60, ts("2026-11-22T08:15:42")) == (ts("2026-11-22T08:15:00"), ts("2026-11-22T08:16:00"))
    assert window(86400, ts("2026-11-22T23:59:59")) == (ts("2026-11-22T00:00:00"), ts("2026-11-23T00:00:00"))
    assert window(MONTH, ts("2026-12-31T12:00:00")) == (ts("2026-12-01T00:00:00"), ts("2027-01-01T00:00:00"))
    assert window(300, ts("2026-11-22T08:17:00"))[0] == ts("2026-11-22T08:15:00")
    assert [reset_text(s) for s in (0.4, 1, 61, 3723)] == ["0s", "1s", "1m1s", "1h2m3s"]


def route(**kwargs: object) -> ModelRoute:
    return ModelRoute.model_validate({"name": "chat", "provider": "openai", "model": "gpt-4", **kwargs})


def counters(proxy: AIProxy, mesh: MeshSettings | None = None) -> list[tuple[str, int, str]]:
    planned = plan_counters(prefix="q", namespace="shop", service="orders", proxy=proxy, mesh=mesh or MeshSettings(),
                            route=proxy.models[0], provider="openai", now=ts("2026-11-22T08:15:42"))
    return [(c.metric, c.limit, c.key) for c in planned]


def test_plan_scopes_and_shorthand() -> None:
    proxy = AIProxy.model_validate({
        "models": [route(rate_limit="100/min", limits={"tokens": "5000/min"}).model_dump()],
        "limits": {"requests": ["1000/hour"], "cost": {"usd": 2.5, "per": "day"}},
        "provider_limits": {"openai": {"tokens": [{"rate": "100000/day", "type": "output"}]}},
    })
    planned = counters(proxy)
    metrics = [(m, limit) for m, limit, _ in planned]
    assert metrics == [("requests", 1000), ("cost", 2_500_000), ("requests", 100), ("total_tokens", 5000),
                       ("output_tokens", 100000)]
    keys = [k for _, _, k in planned]
    assert keys[0] == f"q:{{shop/orders}}:svc:requests:3600:{int(ts('2026-11-22T08:00:00'))}"
    assert keys[2].startswith("q:{shop/orders}:model=chat:requests:60:")
    assert keys[4].startswith("q:{shop/orders}:provider=openai:output_tokens:86400:")


def test_mesh_default_limits_apply_only_without_service_limits() -> None:
    mesh = MeshSettings(default_limits=Limits.model_validate({"requests": "10/min"}))
    plain = AIProxy.model_validate({"models": [route().model_dump()]})
    assert [m for m, _, _ in counters(plain, mesh)] == ["requests"]
    own = AIProxy.model_validate({"models": [route().model_dump()], "limits": {"tokens": "50/min"}})
    assert [m for m, _, _ in counters(own, mesh)] == ["total_tokens"]


def plan_for(limits: dict[str, object], clock: Clock, prefix: str = "t") -> tuple:  # type: ignore[type-arg]
    proxy = AIProxy.model_validate({"models": [route().model_dump()], "limits": limits})
    return plan_counters(prefix=prefix, namespace="ns", service="svc", proxy=proxy, mesh=MeshSettings(),
                         route=proxy.models[0], provider="openai", now=clock())


def test_memory_admission_is_exact_and_resets_with_the_window() -> None:
    clock = Clock(ts("2026-11-22T08:15:10"))
    engine = QuotaEngine(QuotaSettings(), clock=clock)
    planned = plan_for({"requests": "3/min"}, clock)

    async def run() -> list[object]:
        return [await engine.admit(planned, Estimate(10, 10, 0), "open") for _ in range(4)]

    results = asyncio.run(run())
    assert [type(r).__name__ for r in results] == ["Admitted", "Admitted", "Admitted", "Refused"]
    first = results[0]
    assert isinstance(first, Admitted)
    assert first.headers == {"limit_requests": "3", "remaining_requests": "2", "reset_requests": "50s"}
    refused = results[3]
    assert isinstance(refused, Refused)
    assert refused.retry_after_s == 50 and "requests per minute (3) for ns/svc" in refused.counter.label
    clock.now = ts("2026-11-22T08:16:00")
    assert isinstance(asyncio.run(engine.admit(plan_for({"requests": "3/min"}, clock), Estimate(1, 1, 0), "open")),
                      Admitted)


def test_refusal_leaves_other_counters_untouched_and_settlement_corrects() -> None:
    clock = Clock(ts("2026-11-22T08:15:10"))
    engine = QuotaEngine(QuotaSettings(), clock=clock)
    planned = plan_for({"requests": "100/min", "tokens": "1000/min"}, clock)

    async def run() -> None:
        admitted = await engine.admit(planned, Estimate(100, 500, 0), "open")  # reserves 600 tokens
        assert isinstance(admitted, Admitted) and admitted.reservation is not None
        refused = await engine.admit(planned, Estimate(100, 400, 0), "open")  # 600 + 500 > 1000
        assert isinstance(refused, Refused) and refused.counter.metric == "total_tokens"
        assert await engine.read([c.key for c in planned]) == [1, 600]  # the refused call counted nothing
        await engine.settle(admitted.reservation, Estimate(120, 80, 0))  # really used 200
        assert await engine.read([c.key for c in planned]) == [1, 200]
        assert isinstance(await engine.admit(planned, Estimate(100, 400, 0), "open"), Admitted)

    asyncio.run(run())


@pytest.fixture
def prefix() -> Iterator[str]:
    yield f"test-{uuid.uuid4().hex[:8]}"


def test_redis_admits_exactly_the_limit_under_concurrency(redis_url: str, prefix: str) -> None:
    clock = Clock(ts("2026-11-22T08:15:10"))
    settings = QuotaSettings(backend="redis", redis_url=redis_url, key_prefix=prefix)
    planned = plan_for({"requests": "100/min"}, clock, prefix)

    async def run() -> list[object]:
        engines = [QuotaEngine(settings, clock=clock) for _ in range(2)]  # two replicas, one store
        try:
            return await asyncio.gather(*(engines[i % 2].admit(planned, Estimate(1, 1, 0), "closed")
                                          for i in range(200)))
        finally:
            for engine in engines:
                await engine.close()

    results = asyncio.run(run())
    assert sum(isinstance(r, Admitted) for r in results) == 100
    assert sum(isinstance(r, Refused) for r in results) == 100


def test_redis_counters_expire_after_their_window(redis_url: str, prefix: str) -> None:
    import redis as sync_redis

    clock = Clock(ts("2026-11-22T08:15:10"))
    engine = QuotaEngine(QuotaSettings(backend="redis", redis_url=redis_url, key_prefix=prefix), clock=clock)
    planned = plan_for({"requests": "5/min"}, clock, prefix)
    asyncio.run(engine.admit(planned, Estimate(1, 1, 0), "closed"))
    ttl = sync_redis.Redis.from_url(redis_url).ttl(planned[0].key)
    assert 50 < ttl <= 50 + 60  # until the window ends, plus a margin for late settlements


def test_dead_redis_fails_open_to_a_backstop_or_closed(prefix: str) -> None:
    from devtools.launch import free_port

    clock = Clock(ts("2026-11-22T08:15:10"))
    dead = f"redis://127.0.0.1:{free_port()}/0"
    planned = plan_for({"requests": "2/min"}, clock, prefix)

    async def run(mode: str) -> list[object]:
        engine = QuotaEngine(QuotaSettings(backend="redis", redis_url=dead, timeout_ms=200), clock=clock)
        try:
            return [await engine.admit(planned, Estimate(1, 1, 0), mode) for _ in range(3)]
        finally:
            await engine.close()

    opened = asyncio.run(run("open"))
    # The local backstop still enforces the limit (per replica).
    assert [type(r).__name__ for r in opened] == ["Admitted", "Admitted", "Refused"]
    closed = asyncio.run(run("closed"))
    assert all(isinstance(r, Unavailable) for r in closed)
    assert "unreachable" in closed[0].reason  # type: ignore[union-attr]


def test_recovers_when_the_store_comes_back(prefix: str) -> None:
    clock = Clock(ts("2026-11-22T08:15:10"))
    planned = plan_for({"requests": "50/min"}, clock, prefix)
    backend = MemoryBackend(clock)
    broken = {"on": True}

    class Flaky:
        name = "redis"

        async def admit(self, *args: object) -> tuple[int, list[int]]:
            if broken["on"]:
                from extproc.quota.backends import BackendDown
                raise BackendDown("connection refused")
            return await backend.admit(*args)  # type: ignore[arg-type]

    engine = QuotaEngine(QuotaSettings(backend="redis"), clock=clock, shared=Flaky())  # type: ignore[arg-type]

    async def run() -> None:
        assert isinstance(await engine.admit(planned, Estimate(1, 1, 0), "closed"), Unavailable)
        broken["on"] = False
        # Within the back-off the dead store is not even tried.
        assert isinstance(await engine.admit(planned, Estimate(1, 1, 0), "closed"), Unavailable)
        clock.now += 1.5
        assert isinstance(await engine.admit(planned, Estimate(1, 1, 0), "closed"), Admitted)
        assert engine.stats.backend_errors == 1

    asyncio.run(run())
