"""Cross-provider fallback, circuit breakers, bulkheads and processor failure through the real Envoy.

Faults come from the mock provider (``x-mock-only`` aims them at one provider, so the same request
fails on the first hop and succeeds on the fallback); the clients are the unmodified official SDKs.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import redis

from devtools.launch import free_port
from devtools.stack import ANTHROPIC_KEY, OPENAI_KEY, Stack
from tests.e2e.conftest import Mock

POLICY = """\
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_API_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_API_KEY}}
- {name: dead, api: anthropic, base_url: http://dead.example.com/v1, credential: {env: ANTHROPIC_API_KEY}}
---
service: order-service
ai_proxy:
  models:
  - name: fraud_detector
    provider: claude
    model: claude-3
    timeout: 8000ms
    first_byte_timeout: 1500ms        # generous: a loaded CI machine must not time out the fallback too
    fallback: [openai/gpt-4o]
    circuit_breaker: {consecutive_failures: 1000}
  - name: assistant
    provider: openai
    model: gpt-4
    fallback: [claude/claude-3]
    circuit_breaker: {consecutive_failures: 1000}
  - name: unreachable
    provider: dead
    model: claude-3
    fallback: [claude/claude-3-haiku, openai/gpt-4o-mini]
    circuit_breaker: {consecutive_failures: 1000}
  - name: long_prompt
    provider: openai
    model: gpt-4
    fallback: [openai/gpt-4-32k]
    fallback_on_context_length: true
  - name: guarded
    provider: claude
    model: claude-3
    fallback: [openai/gpt-4o]
    circuit_breaker: {consecutive_failures: 3, open_for: 1500ms}
---
service: user-service
ai_proxy:
  max_in_flight: 2
  models:
  - name: guarded
    provider: claude
    model: claude-3
    fallback: [openai/gpt-4o]
    circuit_breaker: {consecutive_failures: 3, open_for: 1500ms}
---
service: product-service
ai_proxy:
  on_processor_failure: open
  models:
  - {name: gpt-4, provider: openai, model: gpt-4}
"""
CLAUDE_FAILS = {"x-mock-only": "anthropic"}


@pytest.fixture(scope="module")
def stack(envoy_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    policies = tmp_path_factory.mktemp("fallback-policies")
    (policies / "policy.yaml").write_text(POLICY)
    running = Stack(policies, tmp_path_factory.mktemp("fallback"),
                    services=["order-service", "user-service", "product-service"],
                    upstream_overrides={"dead": ("127.0.0.1", free_port())})  # nothing listens there
    yield running
    running.close()


@pytest.fixture
def mock(stack: Stack) -> Mock:
    recorder = Mock(stack)
    recorder.clear()
    return recorder


def claude_client(stack: Stack, service: str = "order-service") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base_url(service), api_key="x", max_retries=0)


def openai_client(stack: Stack, service: str = "order-service") -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url(service) + "/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize(("fault", "reason"), [
    ({"x-mock-status": "503"}, "upstream_error"),
    ({"x-mock-status": "500"}, "upstream_error"),
    ({"x-mock-status": "429"}, "upstream_error"),
    ({"x-mock-status": "529"}, "upstream_error"),  # Anthropic's "overloaded"
    ({"x-mock-reset": "1"}, "upstream_error"),
    ({"x-mock-latency-ms": "4000"}, "timeout"),  # first_byte_timeout is 1500ms
])
def test_every_trigger_falls_back_in_the_callers_format(stack: Stack, mock: Mock, fault: dict[str, str],
                                                        reason: str) -> None:
    raw = claude_client(stack).messages.with_raw_response.create(
        model="fraud_detector", max_tokens=30, messages=[{"role": "user", "content": "score order 42"}],
        extra_headers={**CLAUDE_FAILS, **fault})
    message = raw.parse()  # the Anthropic SDK's own parser: an Anthropic-format answer
    assert raw.http_response.status_code == 200
    assert message.type == "message" and message.model == "fraud_detector"
    assert message.content[0].type == "text" and message.content[0].text == "mock reply from gpt-4o: score order 42"
    assert message.stop_reason == "end_turn" and message.usage.output_tokens > 0
    assert raw.headers["x-ai-provider"] == "openai" and raw.headers["x-ai-model"] == "gpt-4o"
    assert raw.headers["x-ai-fallback-hops"] == f"claude/claude-3={reason}, openai/gpt-4o"
    # The first hop really reached Anthropic, the second OpenAI, in each one's own format.
    first, second = mock.last("anthropic"), mock.last("openai")
    assert first["body"]["messages"] == [{"role": "user", "content": "score order 42"}]  # type: ignore[index]
    assert second["body"]["model"] == "gpt-4o"  # type: ignore[index]
    assert second["body"]["messages"] == [{"role": "user", "content": "score order 42"}]  # type: ignore[index]
    assert second["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"  # type: ignore[index]
    assert "x-api-key" not in second["headers"]  # type: ignore[operator]
    assert "x-ai-fallback" not in second["headers"]  # type: ignore[operator]  # the last hop carries no state
    # The state a failed attempt carries reaches neither the provider it was sent to, nor the caller.
    assert "x-ai-fallback" not in first["headers"]  # type: ignore[operator]
    assert "x-ai-fallback" not in raw.headers


def test_connect_failure_falls_through_a_chain_of_three(stack: Stack, mock: Mock) -> None:
    raw = claude_client(stack).messages.with_raw_response.create(
        model="unreachable", max_tokens=30, messages=[{"role": "user", "content": "anyone?"}],
        extra_headers={**CLAUDE_FAILS, "x-mock-status": "503"})  # the second hop fails too
    assert raw.parse().content[0].text == "mock reply from gpt-4o-mini: anyone?"  # type: ignore[union-attr]
    assert raw.headers["x-ai-fallback-hops"] == (
        "dead/claude-3=upstream_error, claude/claude-3-haiku=upstream_error, openai/gpt-4o-mini")


def test_anthropic_stream_served_by_openai(stack: Stack, mock: Mock) -> None:
    with claude_client(stack).messages.stream(
            model="fraud_detector", max_tokens=30, messages=[{"role": "user", "content": "stream it"}],
            extra_headers={**CLAUDE_FAILS, "x-mock-status": "503"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        hops = stream.response.headers["x-ai-fallback-hops"]
    assert text == "mock reply from gpt-4o: stream it"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == len(text.split())
    assert final.usage.input_tokens > 0
    assert hops == "claude/claude-3=upstream_error, openai/gpt-4o"
    assert mock.last("openai")["body"]["stream_options"] == {"include_usage": True}  # type: ignore[index]


def test_openai_json_and_stream_served_by_anthropic(stack: Stack, mock: Mock) -> None:
    client = openai_client(stack)
    fail = {"x-mock-only": "openai", "x-mock-status": "503"}
    raw = client.chat.completions.with_raw_response.create(
        model="assistant", messages=[{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}],
        extra_headers=fail)
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == "assistant"
    assert completion.choices[0].message.content == "mock reply from claude-3: hi"
    assert completion.choices[0].finish_reason == "stop" and completion.usage is not None
    assert raw.headers["x-ai-fallback-hops"] == "openai/gpt-4=upstream_error, claude/claude-3"
    sent = mock.last("anthropic")
    assert sent["body"]["system"] == "be terse" and sent["headers"]["x-api-key"] == ANTHROPIC_KEY  # type: ignore[index]
    chunks = list(client.chat.completions.create(
        model="assistant", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "stream"}], extra_headers=fail))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "mock reply from claude-3: stream"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(text.split())
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_an_error_of_the_last_hop_is_translated(stack: Stack, mock: Mock) -> None:
    """Both providers fail: the caller gets the last one's error, in the caller's own format."""
    with pytest.raises(anthropic.RateLimitError) as caught:
        claude_client(stack).messages.create(
            model="fraud_detector", max_tokens=5, messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-status": "429"})  # every provider: claude, then openai
    assert caught.value.status_code == 429
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert caught.value.response.headers["x-ai-fallback-hops"] == "claude/claude-3=upstream_error, openai/gpt-4o"


def test_context_length_fallback_is_opt_in(stack: Stack, mock: Mock) -> None:
    client = openai_client(stack)
    too_long = {"x-mock-only": "gpt-4", "x-mock-status": "400"}  # gpt-4 refuses, gpt-4-32k answers
    raw = client.chat.completions.with_raw_response.create(
        model="long_prompt", messages=[{"role": "user", "content": "a long prompt"}], extra_headers=too_long)
    assert raw.parse().choices[0].message.content == "mock reply from gpt-4-32k: a long prompt"
    assert raw.headers["x-ai-fallback-hops"] == "openai/gpt-4=upstream_error, openai/gpt-4-32k"
    with pytest.raises(openai.BadRequestError):  # without the opt-in a 400 is the caller's answer
        client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "x"}],
                                       extra_headers=too_long)
    models = [r["body"]["model"] for r in mock.requests("openai")]  # type: ignore[index]
    assert models == ["gpt-4", "gpt-4-32k", "gpt-4"]


def cut_short(caught: pytest.ExceptionInfo[Exception]) -> bool:
    """The SDK saw the stream break: the HTTP transport's error, or an error event in the stream."""
    error = caught.value
    return "incomplete chunked read" in str(error) or isinstance(error, anthropic.APIError | openai.APIError)


def test_failure_after_the_first_byte_is_never_a_clean_end(stack: Stack, mock: Mock) -> None:
    """A stream cut mid-way cannot be replayed elsewhere: the client must see it fail, not end."""
    received: list[str] = []
    with pytest.raises(Exception) as caught, claude_client(stack).messages.stream(
            model="fraud_detector", max_tokens=30, messages=[{"role": "user", "content": "cut me short"}],
            extra_headers={"x-mock-cut-after": "5"}) as stream:
        received.extend(stream.text_stream)
    assert cut_short(caught) and received  # some text arrived, then the break was reported
    # Translated (an OpenAI caller, the Anthropic provider cut mid-stream): the same.
    chunks: list[object] = []
    with pytest.raises(Exception) as caught:
        chunks.extend(openai_client(stack).chat.completions.create(
            model="fraud_detector", stream=True, messages=[{"role": "user", "content": "cut me short"}],
            extra_headers={"x-mock-cut-after": "3"}))
    assert cut_short(caught)


def anthropic_calls(mock: Mock) -> int:
    return len(mock.requests("anthropic"))


def test_breaker_opens_skips_probes_and_closes(stack: Stack, mock: Mock) -> None:
    client = claude_client(stack)
    ask = {"model": "guarded", "max_tokens": 5, "messages": [{"role": "user", "content": "b"}]}
    hops = []
    for _ in range(3):  # three failures in a row open it
        raw = client.messages.with_raw_response.create(**ask, extra_headers={**CLAUDE_FAILS, "x-mock-status": "503"})
        hops.append(raw.headers["x-ai-fallback-hops"])
    assert hops == ["claude/claude-3=upstream_error, openai/gpt-4o"] * 3
    assert anthropic_calls(mock) == 3
    # Open: straight to the fallback, Anthropic is not even tried (no wasted attempt).
    raw = client.messages.with_raw_response.create(**ask)
    assert raw.headers["x-ai-fallback-hops"] == "claude/claude-3=breaker_open, openai/gpt-4o"
    assert anthropic_calls(mock) == 3
    metrics = httpx.get(f"http://127.0.0.1:{stack.admin_port}/metrics").text
    assert ('ai_extproc_breaker_state{gen_ai_provider_name="anthropic",gen_ai_request_model="claude-3",'
            'namespace="demo",provider="claude",service="order-service"} 2.0') in metrics
    assert ('ai_extproc_fallbacks_total{from_provider="claude",namespace="demo",reason="breaker_open",'
            'service="order-service",to_provider="openai"}') in metrics
    # The other service's breaker for the same provider and model is untouched: isolation.
    other = claude_client(stack, "user-service").messages.with_raw_response.create(**ask)
    assert other.headers["x-ai-provider"] == "claude" and "x-ai-fallback-hops" not in other.headers
    time.sleep(1.6)  # open_for: 1500ms, then one probe goes through; it succeeds and closes the breaker
    probe = client.messages.with_raw_response.create(**ask)
    assert probe.headers["x-ai-provider"] == "claude" and "x-ai-fallback-hops" not in probe.headers
    after = client.messages.with_raw_response.create(**ask)
    assert after.headers["x-ai-provider"] == "claude"
    assert anthropic_calls(mock) == 6


def test_one_services_failing_provider_leaves_another_service_alone(stack: Stack, mock: Mock) -> None:
    """order-service's calls to Claude all fail while user-service's calls to Claude keep succeeding."""
    failing, healthy = claude_client(stack), claude_client(stack, "user-service")
    ask = {"model": "guarded", "max_tokens": 5, "messages": [{"role": "user", "content": "iso"}]}
    served: list[str] = []
    for _ in range(10):
        failing.messages.create(**ask, extra_headers={**CLAUDE_FAILS, "x-mock-status": "500"})
        raw = healthy.messages.with_raw_response.create(**ask)
        served.append(raw.headers["x-ai-provider"])
        assert "x-ai-fallback-hops" not in raw.headers
    assert served == ["claude"] * 10


def test_bulkhead_caps_a_services_calls_in_flight(stack: Stack, mock: Mock) -> None:
    client = claude_client(stack, "user-service")
    ask = {"model": "guarded", "max_tokens": 5, "messages": [{"role": "user", "content": "slow"}]}
    results: list[object] = []

    def slow_call() -> None:
        results.append(client.messages.create(**ask, extra_headers={"x-mock-latency-ms": "1500"}))

    threads = [threading.Thread(target=slow_call) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while len(mock.requests("anthropic")) < 2 and time.monotonic() < deadline:  # both are in flight
        time.sleep(0.02)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(**ask)
    body = caught.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "rate_limit_error"
    assert "already has 2 AI calls in flight" in body["error"]["message"]
    for thread in threads:
        thread.join()
    assert len(results) == 2
    # Slots are given back when the responses have been read: a call goes through again.
    deadline = time.monotonic() + 5
    while True:
        try:
            client.messages.create(**ask)
            break
        except anthropic.RateLimitError:
            assert time.monotonic() < deadline, "the bulkhead never released its slots"
            time.sleep(0.05)


def test_processor_failure_open_passes_untouched_closed_answers_503(envoy_binary: str, tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(POLICY)
    own = Stack(policies, tmp_path, services=["product-service", "order-service"])
    try:
        own.processor.stop()
        # Fail open (product-service): the call reaches the provider as the application sent it. The
        # application addresses the provider's host, as it does in the mesh (the sidecar intercepts it).
        app = openai.OpenAI(base_url=own.base_url("product-service") + "/v1", api_key=OPENAI_KEY, max_retries=0,
                            default_headers={"host": "api.openai.com"})
        reply = app.chat.completions.with_raw_response.create(model="gpt-4",
                                                              messages=[{"role": "user", "content": "o"}])
        assert reply.parse().choices[0].message.content == "mock reply from gpt-4: o"
        assert "x-ai-provider" not in reply.headers  # nothing was decided
        # Fail closed (order-service, the default): a clear 503 in the caller's format.
        with pytest.raises(anthropic.APIStatusError) as caught:
            claude_client(own).messages.create(model="fraud_detector", max_tokens=5,
                                               messages=[{"role": "user", "content": "c"}])
        assert caught.value.status_code == 503
        assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "error"
    finally:
        own.close()


def test_killing_one_of_two_replicas_under_load(envoy_binary: str, tmp_path: Path) -> None:
    """SIGKILL one replica mid-load: no client hangs, at most the calls it held fail, the rest carry on."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(POLICY)
    own = Stack(policies, tmp_path, services=["order-service"], replicas=2)
    outcomes: list[tuple[float, str]] = []
    stop = threading.Event()

    def load() -> None:
        client = openai.OpenAI(base_url=own.base_url("order-service") + "/v1", api_key="x", max_retries=0,
                               timeout=10)
        while not stop.is_set():
            try:
                client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "l"}],
                                               extra_headers={"x-mock-latency-ms": "50"})
                outcomes.append((time.monotonic(), "ok"))
            except openai.APIStatusError as exc:
                outcomes.append((time.monotonic(), f"status_{exc.status_code}"))

    try:
        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(1.5)
        killed_at = time.monotonic()
        own.processors[0].stop(timeout=5, sig=9)
        time.sleep(2.5)
        stop.set()
        for worker in workers:
            worker.join(timeout=15)
            assert not worker.is_alive(), "a client hung after the processor was killed"
    finally:
        own.close()
    before = [o for t, o in outcomes if t < killed_at]
    after = [o for t, o in outcomes if t >= killed_at]
    late = [o for t, o in outcomes if t >= killed_at + 1.0]
    assert before and all(o == "ok" for o in before)
    failed = [o for o in after if o != "ok"]
    print(f"replica kill: {len(before)} calls before, {len(after)} after, {len(failed)} failed")
    # Only calls that were on the killed replica, or reached it before Envoy noticed, may fail.
    assert set(failed) <= {"status_503"}
    assert late and all(o == "ok" for o in late), f"calls still failing a second after the kill: {late}"


def test_bulkhead_is_shared_by_replicas_through_redis(envoy_binary: str, redis_url: str, tmp_path: Path) -> None:
    """With two replicas, a call's slot is taken on one and often given back on the other: in Redis
    neither leaks nor doubles the cap."""
    policies = tmp_path / "policies"
    policies.mkdir()
    prefix = f"bh{uuid.uuid4().hex[:8]}"
    (policies / "policy.yaml").write_text(
        f"mesh:\n  quota: {{backend: redis, redis_url: '{redis_url}', key_prefix: {prefix}}}\n" + POLICY)
    own = Stack(policies, tmp_path, services=["user-service"], replicas=2)
    try:
        client = claude_client(own, "user-service")
        ask = {"model": "guarded", "max_tokens": 5, "messages": [{"role": "user", "content": "r"}]}
        key = f"{prefix}:bulkhead:{{demo/user-service}}"
        redis_client = redis.Redis.from_url(redis_url)
        for _ in range(12):  # more than the cap, one after another: every slot is given back
            client.messages.create(**ask)
            time.sleep(0.05)  # a slot is freed once the response has been read, just after the caller has it
        deadline = time.monotonic() + 3
        while redis_client.zcard(key) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert redis_client.zcard(key) == 0  # nothing leaked, whichever replica read each response
        done: list[object] = []
        threads = [threading.Thread(target=lambda: done.append(client.messages.create(
            **ask, extra_headers={"x-mock-latency-ms": "1500"}))) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(0.7)  # both slow calls hold the service's two slots, wherever they were decided
        assert redis_client.zcard(key) == 2
        refused = 0
        for _ in range(4):
            try:
                client.messages.create(**ask)
            except anthropic.RateLimitError:
                refused += 1
        for thread in threads:
            thread.join()
        assert refused == 4 and len(done) == 2
        redis_client.close()
    finally:
        own.close()
