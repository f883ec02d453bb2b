"""Quotas end to end: real Envoy, two processor replicas, real Redis, the official SDKs."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import redis as sync_redis

from devtools.launch import free_port
from devtools.stack import Stack
from tests.conftest import missing

PROVIDERS = """\
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_API_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_API_KEY}}
"""
SERVICES = """\
service: limited
ai_proxy:
  models:
  - {name: chat, provider: openai, model: gpt-4, rate_limit: 100/min}
---
service: budget
ai_proxy:
  limits: {tokens: 2000/min}
  models:
  - {name: chat, provider: openai, model: gpt-4}
---
service: metered
ai_proxy:
  limits: {tokens: 10000000/day, cost: {usd: 100, per: day}}
  models:
  - {name: chat, provider: openai, model: gpt-4}
  - {name: claude, provider: claude, model: claude-3}
"""


def write_policies(directory: Path, redis_url: str, prefix: str, services: str = SERVICES) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mesh.yaml").write_text(
        f"mesh:\n  quota: {{backend: redis, redis_url: '{redis_url}', key_prefix: {prefix}}}\n" + PROVIDERS)
    (directory / "services.yaml").write_text(services)
    return directory


@pytest.fixture(scope="module")
def quota_stack(envoy_binary: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    policies = write_policies(tmp_path_factory.mktemp("quota-policies"), redis_url, prefix)
    running = Stack(policies, tmp_path_factory.mktemp("quota"), services=["limited", "budget", "metered"],
                    replicas=2)
    yield running
    running.close()


def admin(stack: Stack, replica: int = 0) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_ports[replica]}/quota", timeout=5) as reply:
        return dict(json.load(reply))


def used(stack: Stack, service: str, metric: str) -> int:
    for line in admin(stack)["limits"]:  # type: ignore[attr-defined]
        if line["service"] == service and line["metric"] == metric:
            return int(line["used"])
    raise AssertionError(f"no {metric} limit for {service}")


def wait_for(read: Callable[[], int], expected: int, seconds: float = 6.0) -> int:
    """Settlement happens on the response stream after the caller has its answer: poll for it."""
    deadline = time.monotonic() + seconds
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


def away_from_minute_boundary() -> None:
    """Per-minute windows are fixed: start a counting test well inside one, not astride two."""
    second = time.time() % 60
    if second > 45:
        time.sleep(60 - second + 0.5)


def test_two_replicas_sharing_redis_admit_exactly_the_limit(quota_stack: Stack) -> None:
    away_from_minute_boundary()
    client = openai.AsyncOpenAI(base_url=quota_stack.base_url("limited") + "/v1", api_key="x", max_retries=0,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=200)))

    async def call() -> str:
        try:
            await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
            return "ok"
        except openai.RateLimitError as exc:
            assert exc.response.headers["retry-after"].isdigit()
            assert "requests per minute (100) for limited" in exc.message
            return "429"

    async def run() -> list[str]:
        return await asyncio.gather(*(call() for _ in range(200)))

    outcomes = asyncio.run(run())
    assert outcomes.count("ok") == 100
    assert outcomes.count("429") == 100
    stats = [admin(quota_stack, r)["stats"] for r in (0, 1)]
    decided = [int(st["admitted"]) + sum(st["refused"].values()) for st in stats]  # type: ignore[index,union-attr]
    assert all(n > 0 for n in decided), stats  # both replicas decided...
    assert sum(int(st["admitted"]) for st in stats) == 100  # type: ignore[index]  # ...against one shared count


def test_admitted_calls_carry_ratelimit_headers(quota_stack: Stack) -> None:
    raw = openai.OpenAI(base_url=quota_stack.base_url("budget") + "/v1", api_key="x", max_retries=0
                        ).chat.completions.with_raw_response.create(
        model="chat", max_tokens=50, messages=[{"role": "user", "content": "headers please"}])
    assert raw.headers["x-ratelimit-limit-tokens"] == "2000"
    assert 0 <= int(raw.headers["x-ratelimit-remaining-tokens"]) < 2000
    assert raw.headers["x-ratelimit-reset-tokens"].endswith("s")
    assert "x-ratelimit-limit-requests" not in raw.headers  # budget has no request limit


def test_settlement_equals_reported_usage(quota_stack: Stack) -> None:
    """JSON, SSE and Anthropic responses: the counter moves by exactly what the provider reported."""
    oai = openai.OpenAI(base_url=quota_stack.base_url("metered") + "/v1", api_key="x", max_retries=0)
    claude = anthropic.Anthropic(base_url=quota_stack.base_url("metered"), api_key="x", max_retries=0)

    def check(call: Callable[[], int]) -> None:
        before = used(quota_stack, "metered", "total_tokens")
        reported = call()
        assert wait_for(lambda: used(quota_stack, "metered", "total_tokens"), before + reported) == before + reported

    def json_call() -> int:
        usage = oai.chat.completions.create(model="chat", max_tokens=300,
                                            messages=[{"role": "user", "content": "settle json"}]).usage
        assert usage is not None
        return usage.total_tokens

    def sse_call() -> int:
        stream = oai.chat.completions.create(model="chat", max_tokens=300, stream=True,
                                             stream_options={"include_usage": True},
                                             messages=[{"role": "user", "content": "settle a stream please"}])
        usage = [c.usage for c in stream if c.usage is not None]
        assert len(usage) == 1
        return usage[0].total_tokens

    def anthropic_json() -> int:
        message = claude.messages.create(model="claude", max_tokens=300,
                                         messages=[{"role": "user", "content": "settle claude"}])
        return message.usage.input_tokens + message.usage.output_tokens

    def anthropic_stream() -> int:
        with claude.messages.stream(model="claude", max_tokens=300,
                                    messages=[{"role": "user", "content": "settle a claude stream"}]) as stream:
            final = stream.get_final_message()
        return final.usage.input_tokens + final.usage.output_tokens

    for call in (json_call, sse_call, anthropic_json, anthropic_stream):
        check(call)
    assert used(quota_stack, "metered", "cost") > 0


def test_injected_usage_chunk_never_reaches_the_client(quota_stack: Stack) -> None:
    url = quota_stack.base_url("metered") + "/v1/chat/completions"
    body = {"model": "chat", "max_tokens": 300, "stream": True,
            "messages": [{"role": "user", "content": "the same question twice"}]}
    # With include_usage asked by the client: the usage chunk is theirs, we only read it.
    start = used(quota_stack, "metered", "total_tokens")
    asked = openai.OpenAI(base_url=quota_stack.base_url("metered") + "/v1", api_key="x", max_retries=0
                          ).chat.completions.create(**body, stream_options={"include_usage": True})  # type: ignore[call-overload]
    reported = next(c.usage for c in asked if c.usage is not None).total_tokens
    before = wait_for(lambda: used(quota_stack, "metered", "total_tokens"), start + reported)
    assert before == start + reported
    with httpx.stream("POST", url, json=body, timeout=10) as response:
        raw = b"".join(response.iter_raw())
    assert response.status_code == 200
    events = [e for e in raw.split(b"\n\n") if e]
    assert b"usage" not in raw  # neither the usage-only chunk nor the "usage":null members we caused
    assert events[-1] == b"data: [DONE]"
    assert all(json.loads(e.removeprefix(b"data: "))["choices"] for e in events[:-1])
    # ...and yet the call was settled with the provider's real usage, identical to the asked-for run.
    assert wait_for(lambda: used(quota_stack, "metered", "total_tokens"), before + reported) == before + reported


@pytest.mark.parametrize("asked", [True, False], ids=["observed", "stripped"])
def test_cut_stream_settles_an_estimate_and_releases_the_reservation(quota_stack: Stack, asked: bool) -> None:
    client = openai.OpenAI(base_url=quota_stack.base_url("metered") + "/v1", api_key="x", max_retries=0)
    before = used(quota_stack, "metered", "total_tokens")
    extra = {"stream_options": {"include_usage": True}} if asked else {}
    with pytest.raises(openai.APIConnectionError):
        stream = client.chat.completions.create(model="chat", max_tokens=5000, stream=True,
                                                messages=[{"role": "user", "content": "cut me off"}],
                                                extra_headers={"x-mock-cut-after": "4", "x-mock-event-delay-ms": "50"},
                                                **extra)
        for _ in stream:
            pass
    # Reserved: ~4 input + 5000 output. Settled: input estimate + the text that got through.
    deadline = time.monotonic() + 8
    while used(quota_stack, "metered", "total_tokens") - before > 5000 and time.monotonic() < deadline:
        time.sleep(0.1)
    charged = used(quota_stack, "metered", "total_tokens") - before
    assert 0 < charged < 50, charged


def test_token_budget_overshoot_is_bounded(quota_stack: Stack) -> None:
    """2000 tokens/min; 40 concurrent streams reserving ~110 each. Reservations bound what is admitted,
    settlement replaces them by real usage: the final count equals the sum of what admitted calls used,
    and stays within the limit because no call used more than it reserved (max_tokens bounds output)."""
    away_from_minute_boundary()
    client = openai.AsyncOpenAI(base_url=quota_stack.base_url("budget") + "/v1", api_key="x", max_retries=0)
    start = used(quota_stack, "budget", "total_tokens")

    async def call(i: int) -> int | None:
        try:
            stream = await client.chat.completions.create(
                model="chat", max_tokens=100, stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": f"budget call {i}"}])
            totals = [c.usage.total_tokens async for c in stream if c.usage is not None]
            return totals[0]
        except openai.RateLimitError:
            return None

    async def run() -> list[int | None]:
        return await asyncio.gather(*(call(i) for i in range(40)))

    results = asyncio.run(run())
    admitted = [r for r in results if r is not None]
    assert admitted and len(admitted) < 40
    expected = start + sum(admitted)
    assert wait_for(lambda: used(quota_stack, "budget", "total_tokens"), expected) == expected
    assert expected <= 2000


@pytest.fixture
def private_redis() -> Iterator[tuple[int, Callable[[], None], Callable[[], None]]]:
    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server binary needed to stop and restart a private Redis")
    port = free_port()
    state: dict[str, subprocess.Popen[bytes]] = {}

    def start() -> None:
        state["p"] = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if sync_redis.Redis(port=port, socket_timeout=0.5).ping():
                    return
            except sync_redis.RedisError:
                time.sleep(0.05)
        raise AssertionError("private redis did not start")

    def stop() -> None:
        state["p"].terminate()
        state["p"].wait(10)

    start()
    yield port, start, stop
    if state["p"].poll() is None:
        stop()


def test_redis_outage_per_policy_and_recovery(envoy_binary: str, private_redis: tuple[int, Callable[[], None],
                                              Callable[[], None]], tmp_path: Path) -> None:
    port, start_redis, stop_redis = private_redis
    services = """\
service: tolerant
ai_proxy:
  on_quota_backend_failure: open
  models: [{name: chat, provider: openai, model: gpt-4, rate_limit: 1000/min}]
---
service: strict
ai_proxy:
  on_quota_backend_failure: closed
  models: [{name: chat, provider: openai, model: gpt-4, rate_limit: 1000/min}]
"""
    policies = write_policies(tmp_path / "policies", f"redis://127.0.0.1:{port}/0", "outage", services)
    stack = Stack(policies, tmp_path, services=["tolerant", "strict"])
    try:
        def call(service: str) -> int:
            response = httpx.post(stack.base_url(service) + "/v1/chat/completions", timeout=10,
                                  json={"model": "chat", "messages": [{"role": "user", "content": "x"}]})
            if response.status_code == 503:
                assert response.json()["error"]["code"] == "quota_backend_unavailable"
            return response.status_code

        assert (call("tolerant"), call("strict")) == (200, 200)
        stop_redis()
        assert [call("tolerant") for _ in range(3)] == [200, 200, 200]  # local backstop limiter
        assert [call("strict") for _ in range(3)] == [503, 503, 503]
        start_redis()
        time.sleep(1.5)  # the processor retries the store after a 1 s back-off, without a restart
        assert (call("tolerant"), call("strict")) == (200, 200)
        keys = sync_redis.Redis(port=port).keys("outage:*")
        assert len(keys) == 2  # both services counted in the fresh Redis again
        log = stack.processor.log_text()
        assert "quota store unreachable" in log and "quota store reachable again" in log
    finally:
        stack.close()


def test_quota_show_reads_live_counters(quota_stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    from extproc.cli import main

    policy_dir = str(next(p for p in quota_stack.processor.args if "quota-policies" in str(p)))
    start = used(quota_stack, "budget", "total_tokens")
    reply = httpx.post(quota_stack.base_url("budget") + "/v1/chat/completions", timeout=10,
                       json={"model": "chat", "max_tokens": 20, "messages": [{"role": "user", "content": "show me"}]})
    expected = start + reply.json()["usage"]["total_tokens"]
    assert wait_for(lambda: used(quota_stack, "budget", "total_tokens"), expected) == expected
    assert main(["quota", "show", "--admin", f"127.0.0.1:{quota_stack.admin_port}", "--service", "budget"]) == 0
    via_admin = capsys.readouterr().out
    # Straight from Redis, with the same policy files the processors use.
    assert main(["quota", "show", "--policy", policy_dir, "--service", "budget"]) == 0
    via_redis = capsys.readouterr().out
    for out in (via_admin, via_redis):
        assert "quota usage (redis backend" in out
        line = next(row for row in out.splitlines() if row.startswith("budget"))
        assert line.split()[1:7] == ["total", "tokens", "per", "minute", "(2000)", str(expected)]
        assert "limited" not in out
