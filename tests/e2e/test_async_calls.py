"""Asynchronous AI calls through the real Envoy and the real NATS JetStream: submit, 202, result
event and poll; refusal at submit time; isolation between services; a worker killed mid-job;
dead letters. Submissions use the official SDKs' raw-response access."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import nats
import openai
import pytest

from devtools.launch import start_worker
from devtools.stack import NAMESPACE, Stack
from extproc.jobs.config import JobNames
from extproc.jobs.store import JobStore

POLICY = """\
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_API_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_API_KEY}}
---
service: order-service
ai_proxy:
  models:
  - {name: fraud_detector, provider: claude, model: claude-3, fallback: [openai/gpt-4o]}
  - {name: limited, provider: openai, model: gpt-4, rate_limit: 1/min}
  - {name: flaky, provider: claude, model: claude-3-haiku, circuit_breaker: {enabled: false}}
---
service: user-service
ai_proxy:
  async_calls: {max_queued: 1, max_body_bytes: 2000}
  models:
  - {name: fraud_detector, provider: claude, model: claude-3}
"""
ASYNC = {"prefer": "respond-async"}


@pytest.fixture(scope="module")
def setup(envoy_binary: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    policies = tmp_path_factory.mktemp("async-policies")
    (policies / "policy.yaml").write_text(POLICY)
    stack = Stack(policies, tmp_path_factory.mktemp("async"), services=["order-service", "user-service"],
                  jobs=(nats_url, prefix))
    yield stack, prefix
    stack.close()
    asyncio.run(_destroy(nats_url, prefix))


async def _destroy(url: str, prefix: str) -> None:
    store = await JobStore(JobNames.prefixed(prefix)).connect(url, create=False)
    try:
        await store.destroy()
    finally:
        await store.close()


def submit(stack: Stack, service: str = "order-service", model: str = "fraud_detector", **extra: object
           ) -> httpx.Response:
    client = anthropic.Anthropic(base_url=stack.base_url(service), api_key="x", max_retries=0)
    raw = client.messages.with_raw_response.create(
        model=model, max_tokens=20, messages=[{"role": "user", "content": "score order 77"}],
        extra_headers={**ASYNC, **extra})  # type: ignore[arg-type]
    return raw.http_response  # type: ignore[return-value]


def poll(stack: Stack, location: str, service: str = "order-service", until: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + until
    while True:
        reply = httpx.get(stack.base_url(service) + location, headers={"anthropic-version": "2023-06-01"})
        if reply.status_code != 202 or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


async def _events(url: str, subject: str, wait_s: float) -> list[dict[str, object]]:
    import orjson

    connection = await nats.connect(url)
    got: list[dict[str, object]] = []
    try:
        subscription = await connection.subscribe(subject)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                message = await subscription.next_msg(timeout=max(0.05, deadline - time.monotonic()))
            except nats.errors.TimeoutError:
                break
            got.append(orjson.loads(message.data))
    finally:
        await connection.close()
    return got


def test_submit_202_then_result_event_and_poll(setup: tuple[Stack, str], nats_url: str) -> None:
    stack, prefix = setup
    accepted = submit(stack)
    assert accepted.status_code == 202 and accepted.headers["preference-applied"] == "respond-async"
    body = accepted.json()
    assert body["status"] == "queued" and accepted.headers["location"] == body["location"]
    assert body["result_subject"] == f"{prefix}.ai.jobs.result.{NAMESPACE}.order-service"
    done = poll(stack, body["location"])
    assert done.status_code == 200 and done.headers["x-ai-job-id"] == body["id"]
    message = anthropic.types.Message.model_validate(done.json())  # the answer in the caller's format
    assert message.content[0].text == "mock reply from claude-3: score order 77"  # type: ignore[union-attr]


def test_result_is_published_on_the_services_subject(setup: tuple[Stack, str], nats_url: str) -> None:
    stack, prefix = setup
    subject = f"{prefix}.ai.jobs.result.{NAMESPACE}.order-service"

    async def run() -> tuple[str, list[dict[str, object]]]:
        listening = asyncio.create_task(_events(nats_url, subject, 8.0))
        await asyncio.sleep(0.3)  # subscribed before the job can finish
        job_id = (await asyncio.to_thread(submit, stack)).json()["id"]
        return job_id, await listening

    job_id, events = asyncio.run(run())
    mine = [e for e in events if e.get("job_id") == job_id]
    assert len(mine) == 1 and mine[0]["status"] == 200


def test_a_call_the_policy_refuses_is_refused_at_submit(setup: tuple[Stack, str]) -> None:
    stack, _ = setup
    client = openai.OpenAI(base_url=stack.base_url("order-service") + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.with_raw_response.create(model="gpt-5", messages=[{"role": "user", "content": "x"}],
                                                         extra_headers=ASYNC)
    first = client.chat.completions.with_raw_response.create(
        model="limited", messages=[{"role": "user", "content": "x"}], extra_headers=ASYNC)
    assert first.http_response.status_code == 202
    with pytest.raises(openai.RateLimitError):  # 1/min: the second submission is over quota, right away
        client.chat.completions.with_raw_response.create(
            model="limited", messages=[{"role": "user", "content": "x"}], extra_headers=ASYNC)


def test_another_service_cannot_read_the_job(setup: tuple[Stack, str]) -> None:
    stack, _ = setup
    location = submit(stack).json()["location"]
    assert poll(stack, location).status_code == 200
    other = poll(stack, location, service="user-service")
    assert other.status_code == 404 and other.json()["error"]["type"] == "not_found_error"
    assert poll(stack, "/v1/ai-jobs/0123456789abcdef0123456789abcdef").status_code == 404


def test_repeated_failures_go_to_the_dead_letter_subject(setup: tuple[Stack, str]) -> None:
    stack, _ = setup
    # The provider fails every time (its breaker is off here, so every attempt really reaches it).
    location = submit(stack, model="flaky", **{"x-mock-status": "500"}).json()["location"]
    failed = poll(stack, location, until=30.0)
    assert failed.status_code == 503
    error = failed.json()["error"]
    assert error["type"] == "overloaded_error" and "failed after 5 attempt(s)" in error["message"]
    # A bare GET (no anthropic-version, no x-api-key) looks like an OpenAI caller: the answer is still in
    # the format of the Anthropic call that was submitted, which is what its submitter parses.
    bare = httpx.get(stack.base_url("order-service") + location)
    assert bare.status_code == 503 and bare.json()["type"] == "error"
    assert bare.json()["error"]["type"] == "overloaded_error"


def test_a_worker_killed_mid_job_gives_exactly_one_result(setup: tuple[Stack, str], nats_url: str,
                                                         tmp_path: Path) -> None:
    stack, prefix = setup
    assert stack.worker is not None
    subject = f"{prefix}.ai.jobs.result.{NAMESPACE}.order-service"

    async def run() -> tuple[str, list[dict[str, object]]]:
        listening = asyncio.create_task(_events(nats_url, subject, 20.0))
        await asyncio.sleep(0.3)
        job_id = (await asyncio.to_thread(submit, stack, **{"x-mock-latency-ms": "2500"})).json()["id"]
        await asyncio.sleep(1.0)  # the worker is inside the slow call
        stack.worker.stop(timeout=5, sig=9)  # type: ignore[union-attr]
        # A new worker gets the job again once the dead one's ack wait has passed.
        envoys = [f"--envoy={NAMESPACE}/{s}=http://127.0.0.1:{p}" for s, p in stack.ports.items()]
        stack.worker = start_worker((nats_url, prefix), envoys, {"EXTPROC_SIGNING_KEY": stack.signing_key},
                                    tmp_path)
        stack.parts.append(stack.worker)
        return job_id, await listening

    job_id, events = asyncio.run(run())
    assert [e["status"] for e in events if e.get("job_id") == job_id] == [200]
    view = poll(stack, f"/v1/ai-jobs/{job_id}")
    assert view.status_code == 200


def test_payload_and_queue_limits_are_clear_errors(setup: tuple[Stack, str]) -> None:
    stack, _ = setup
    client = anthropic.Anthropic(base_url=stack.base_url("user-service"), api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as too_large:
        client.messages.with_raw_response.create(model="fraud_detector", max_tokens=5, extra_headers=ASYNC,
                                                 messages=[{"role": "user", "content": "x" * 3000}])
    assert too_large.value.status_code == 413
    assert "asynchronous jobs are limited to 2000 bytes" in too_large.value.message
    slow = submit(stack, service="user-service", **{"x-mock-latency-ms": "2000"})  # holds user-service's one slot
    assert slow.status_code == 202
    with pytest.raises(anthropic.RateLimitError) as full:
        submit(stack, service="user-service")
    assert "already has 1 asynchronous job(s) waiting or running; the limit is 1" in full.value.message
    assert poll(stack, slow.json()["location"], service="user-service").status_code == 200
