"""Response caching end to end: real Envoy, two replicas sharing Redis, the official SDKs."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import anthropic
import httpx
import openai
import pytest
import redis as sync_redis

from devtools.stack import Stack
from tests.e2e.conftest import Mock

SERVICE = """\
service: {name}
ai_proxy:
  limits: {{tokens: 1000000/min}}
  models:
  - {{name: classify, provider: openai, model: gpt-4o-mini, cache_ttl: 60}}
  - {{name: brief, provider: openai, model: gpt-4o-mini, cache_ttl: 2}}
  - {{name: stories, provider: openai, model: gpt-4o, cache_ttl: 60, cache: {{nondeterministic: true}}}}
  - {{name: shared, provider: openai, model: gpt-4.1-mini, cache_ttl: 60, cache: {{share_as: retail}}}}
  - {{name: embed, provider: openai, model: text-embedding-3-small, cache_ttl: 60}}
  - {{name: summary, provider: claude, model: claude-3, cache_ttl: 60}}
"""


@pytest.fixture(scope="module")
def cache_stack(envoy_binary: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prefix = f"cache-{uuid.uuid4().hex[:8]}"
    policies = tmp_path_factory.mktemp("cache-policies")
    (policies / "mesh.yaml").write_text(f"""\
mesh:
  cache: {{backend: redis, redis_url: '{redis_url}', key_prefix: {prefix}}}
providers:
- {{name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {{env: OPENAI_API_KEY}}}}
- {{name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {{env: ANTHROPIC_API_KEY}}}}
""")
    (policies / "services.yaml").write_text(SERVICE.format(name="catalog") + "---\n" + SERVICE.format(name="reviews"))
    running = Stack(policies, tmp_path_factory.mktemp("cache"), services=["catalog", "reviews"], replicas=2)
    running.cache_prefix = prefix  # type: ignore[attr-defined]
    yield running
    running.close()


@pytest.fixture
def cache_mock(cache_stack: Stack) -> Mock:
    recorder = Mock(cache_stack)
    recorder.clear()
    return recorder


def cache_stats(stack: Stack, replica: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_ports[replica]}/cache", timeout=5) as reply:
        return dict(json.load(reply)["stats"])


def client(stack: Stack, service: str = "catalog") -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url(service) + "/v1", api_key="x", max_retries=0)


def until_hit(call: Callable[[], tuple[str, object]], seconds: float = 5.0) -> object:
    """The first call stores its answer on the response side, just after the caller has it."""
    deadline = time.monotonic() + seconds
    while True:
        status, value = call()
        if status == "hit" or time.monotonic() > deadline:
            assert status == "hit", "never served from the cache"
            return value
        time.sleep(0.05)


def chat(stack: Stack, model: str, text: str, service: str = "catalog", **extra: object) -> tuple[str, object]:
    raw = client(stack, service).chat.completions.with_raw_response.create(
        model=model, temperature=0, messages=[{"role": "user", "content": text}], **extra)  # type: ignore[call-overload]
    return raw.headers.get("x-ai-cache", "-"), (raw.parse(), raw.headers)


def test_repeated_call_is_a_hit_with_identical_content(cache_stack: Stack, cache_mock: Mock) -> None:
    status, (first, _) = chat(cache_stack, "classify", "is this a shoe?")  # type: ignore[misc]
    assert status == "miss"
    second, headers = until_hit(lambda: chat(cache_stack, "classify", "is this a shoe?"))  # type: ignore[misc]
    assert second.model_dump() == first.model_dump()  # the very same response, id included
    assert int(headers["age"]) >= 0 and headers["x-ai-model"] == "gpt-4o-mini"
    assert len(cache_mock.requests("openai")) == 1  # the provider answered once
    # Key order and whitespace do not matter: the same call spelled differently is the same entry.
    body = b'{ "messages":[{"content":"is this a shoe?","role":"user"}],  "temperature":0, "model":"classify"}'
    response = httpx.post(cache_stack.base_url("catalog") + "/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"})
    assert response.headers["x-ai-cache"] == "hit" and response.json()["id"] == first.id


def test_streamed_calls_are_replayed(cache_stack: Stack, cache_mock: Mock) -> None:
    def streamed() -> tuple[str, object]:
        raw = client(cache_stack).chat.completions.with_raw_response.create(
            model="classify", temperature=0, stream=True, messages=[{"role": "user", "content": "stream it"}])
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        return raw.headers.get("x-ai-cache", "-"), text

    status, text = streamed()
    assert status == "miss" and text
    assert until_hit(streamed) == text
    claude = anthropic.Anthropic(base_url=cache_stack.base_url("catalog"), api_key="x", max_retries=0)

    def anthropic_stream() -> tuple[str, object]:
        with claude.messages.stream(model="summary", max_tokens=50, extra_body={"temperature": 0},
                                    messages=[{"role": "user", "content": "summarise"}]) as stream:
            final = stream.get_final_message()
            return stream.response.headers.get("x-ai-cache", "-"), (final.content[0].text, final.usage.output_tokens)  # type: ignore[union-attr]

    assert anthropic_stream()[0] == "miss"
    replayed = until_hit(anthropic_stream)
    assert replayed[0].startswith("mock reply from claude-3")  # type: ignore[index]
    assert len(cache_mock.requests("anthropic")) == 1


def test_ttl_expiry(cache_stack: Stack, cache_mock: Mock) -> None:
    assert chat(cache_stack, "brief", "short lived")[0] == "miss"
    until_hit(lambda: chat(cache_stack, "brief", "short lived"))
    time.sleep(2.2)  # cache_ttl: 2
    assert chat(cache_stack, "brief", "short lived")[0] == "miss"


def test_bypass_and_no_cache(cache_stack: Stack, cache_mock: Mock) -> None:
    chat(cache_stack, "classify", "bypass me")
    until_hit(lambda: chat(cache_stack, "classify", "bypass me"))
    before = len(cache_mock.requests("openai"))
    assert chat(cache_stack, "classify", "bypass me", extra_headers={"x-ai-cache": "bypass"})[0] == "-"
    assert chat(cache_stack, "classify", "bypass me", extra_headers={"cache-control": "no-cache"})[0] == "miss"
    assert len(cache_mock.requests("openai")) == before + 2  # both went to the provider


def test_only_deterministic_calls_by_default(cache_stack: Stack, cache_mock: Mock) -> None:
    def sampled(model: str) -> str:
        raw = client(cache_stack).chat.completions.with_raw_response.create(
            model=model, temperature=0.7, messages=[{"role": "user", "content": "be creative"}])
        return raw.headers.get("x-ai-cache", "-")

    assert [sampled("classify") for _ in range(3)] == ["-", "-", "-"]
    assert sampled("stories") == "miss"  # this model opted in
    until_hit(lambda: (sampled("stories"), None))


def test_isolated_per_service_unless_shared(cache_stack: Stack, cache_mock: Mock) -> None:
    chat(cache_stack, "classify", "whose cache?")
    until_hit(lambda: chat(cache_stack, "classify", "whose cache?"))
    assert chat(cache_stack, "classify", "whose cache?", service="reviews")[0] == "miss"
    chat(cache_stack, "shared", "pooled answer")
    until_hit(lambda: chat(cache_stack, "shared", "pooled answer"))
    assert chat(cache_stack, "shared", "pooled answer", service="reviews")[0] == "hit"


def test_two_replicas_share_hits_and_hits_cost_no_tokens(cache_stack: Stack, cache_mock: Mock) -> None:
    chat(cache_stack, "classify", "warm-up")
    until_hit(lambda: chat(cache_stack, "classify", "warm-up"))  # settled before we count
    before = [cache_stats(cache_stack, r) for r in (0, 1)]
    for i in range(6):
        emb = client(cache_stack).embeddings.with_raw_response.create(model="embed", input=[f"red shoes {i}"])
        assert emb.headers["x-ai-cache"] == "miss"
        until_hit(lambda i=i: (client(cache_stack).embeddings.with_raw_response.create(
            model="embed", input=[f"red shoes {i}"]).headers.get("x-ai-cache", "-"), None))
    after = [cache_stats(cache_stack, r) for r in (0, 1)]
    hits = [after[r]["hits"] - before[r]["hits"] for r in (0, 1)]
    stores = [after[r]["stores"] - before[r]["stores"] for r in (0, 1)]
    assert sum(stores) == 6 and all(h > 0 for h in hits), (hits, stores)
    # With the Redis store the replicas keep nothing locally: each one's hits are the shared entries.
    tokens = _used_tokens(cache_stack, "catalog")
    for _ in range(3):
        client(cache_stack).embeddings.create(model="embed", input=["red shoes 0"])
    assert _used_tokens(cache_stack, "catalog") == tokens  # hits count zero provider tokens


def _used_tokens(stack: Stack, service: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_port}/quota?service={service}", timeout=5) as r:
        return sum(int(line["used"]) for line in json.load(r)["limits"] if line["metric"] == "total_tokens")


def test_corrupt_entries_are_ignored(cache_stack: Stack, cache_mock: Mock, redis_url: str) -> None:
    chat(cache_stack, "classify", "corrupt me")
    until_hit(lambda: chat(cache_stack, "classify", "corrupt me"))
    store = sync_redis.Redis.from_url(redis_url)
    prefix = cache_stack.cache_prefix  # type: ignore[attr-defined]
    corrupted = 0
    for key in store.keys(f"{prefix}:*"):
        raw = store.get(key)
        if raw is None:  # an entry of another test's 2 s TTL that expired since KEYS listed it
            continue
        store.set(key, raw[:-5] + b"XXXXX", keepttl=True)  # same length, wrong bytes: the checksum fails
        corrupted += 1
    assert corrupted >= 1  # at least this test's own entry
    before = len(cache_mock.requests("openai"))
    status, (reply, _) = chat(cache_stack, "classify", "corrupt me")  # type: ignore[misc]
    assert status == "miss" and reply.choices[0].message.content.startswith("mock reply")
    assert len(cache_mock.requests("openai")) == before + 1
    assert sum(cache_stats(cache_stack, r)["rejected_entries"] for r in (0, 1)) >= 1
