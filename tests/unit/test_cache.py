"""Cache keys, entry framing and the in-process store, without Envoy."""

from __future__ import annotations

import asyncio

import pytest

from extproc.cache.entry import CacheEntry, decode_entry
from extproc.cache.key import plan_cache
from extproc.cache.store import ResponseCache
from extproc.policy.model import CacheSettings, ModelRoute


def route(**kwargs: object) -> ModelRoute:
    return ModelRoute.model_validate({"name": "m", "provider": "openai", "model": "gpt-4", "cache_ttl": 60,
                                      **kwargs})


def plan(body: dict[str, object], headers: dict[str, str] | None = None, scope: str = "shop/a",
         operation: str = "chat_completions", **kwargs: object):  # type: ignore[no-untyped-def]
    return plan_cache(prefix="c", scope=scope, provider="openai", operation=operation, route=route(**kwargs),
                      body=body, headers=headers or {})


BODY = {"model": "gpt-4", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}


def test_key_ignores_order_but_not_content() -> None:
    reordered = {"messages": [{"content": "hi", "role": "user"}], "temperature": 0.0, "model": "gpt-4"}
    assert plan(BODY).key == plan(reordered).key
    assert plan(BODY).key != plan({**BODY, "max_tokens": 5}).key
    assert plan(BODY).key != plan({**BODY, "stream": True}).key
    assert plan(BODY, scope="shop/b").key != plan(BODY).key  # per service...
    shared = {"cache": {"share_as": "retail"}}
    assert plan(BODY, scope="shop/b", **shared).key == plan(BODY, **shared).key  # ...unless pooled
    assert plan(BODY).ttl_s == 60


def test_what_may_be_cached() -> None:
    assert plan({**BODY, "temperature": 0.7}) is None
    assert plan({k: v for k, v in BODY.items() if k != "temperature"}) is None
    assert plan({**BODY, "n": 3}) is None
    assert plan({**BODY, "temperature": 0.7}, cache={"nondeterministic": True}) is not None
    assert plan({"model": "e", "input": "x"}, operation="embeddings") is not None
    assert plan(BODY, cache_ttl=None) is None
    assert plan(BODY, {"x-ai-cache": "bypass"}) is None
    assert plan(BODY, {"cache-control": "no-store"}) is None
    no_cache = plan(BODY, {"cache-control": "max-age=0, no-cache"})
    assert no_cache is not None and not no_cache.read and no_cache.write


def entry(body: bytes = b'{"ok":true}') -> CacheEntry:
    return CacheEntry(200, "application/json", body, 10, 5, 1000.0)


def test_entries_round_trip_and_damage_is_detected() -> None:
    raw = entry().encode()
    assert decode_entry(raw, 1024) == entry()
    assert decode_entry(raw[:-1], 1024) is None  # truncated
    assert decode_entry(raw[:-3] + b"xyz", 1024) is None  # same length, other bytes
    assert decode_entry(b"not ours at all", 1024) is None
    assert decode_entry(entry(b"x" * 2000).encode(), 1024) is None  # over the size limit


def test_memory_store_evicts_least_recently_used_and_expires() -> None:
    now = [0.0]
    cache = ResponseCache(CacheSettings(max_entries=2, max_entry_bytes=1024), clock=lambda: now[0])

    async def run() -> None:
        for key in ("a", "b"):
            assert await cache.put(key, entry(key.encode()), ttl_s=10)
        assert await cache.get("a") is not None  # a is now the most recently used
        await cache.put("c", entry(b"c"), ttl_s=10)
        assert await cache.get("b") is None and await cache.get("a") is not None
        now[0] = 11
        assert await cache.get("a") is None and await cache.get("c") is None
        assert not await cache.put("big", entry(b"x" * 2000), ttl_s=10)  # never stored

    asyncio.run(run())
    assert cache.stats.stores == 3


@pytest.mark.parametrize("size", [600, 1500])
def test_memory_store_is_bounded_in_bytes(size: int) -> None:
    cache = ResponseCache(CacheSettings(max_bytes=2048, max_entry_bytes=2048))

    async def run() -> int:
        for i in range(5):
            await cache.put(str(i), entry(b"x" * size), ttl_s=10)
        return sum([await cache.get(str(i)) is not None for i in range(5)])

    kept = asyncio.run(run())
    assert kept == (2 if size == 600 else 1)
