"""Crafted, encoded and abandoned calls through the real Envoy: each gets a clear answer in the caller's
format, and none leaves a bulkhead slot or a token reservation behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson
import pytest

from devtools.stack import Stack
from tests.e2e.conftest import Mock, logs, processor_alive

POLICY = """\
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_API_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_API_KEY}}
---
service: order-service
ai_proxy:
  max_in_flight: 2
  limits: {tokens: 100000/min}
  models:
  - {name: chat, provider: openai, model: gpt-4, timeout: 1500ms}
  - {name: cross, provider: claude, model: claude-3, timeout: 1500ms}
"""
CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def stack(envoy_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    policies = tmp_path_factory.mktemp("hardening-policies")
    (policies / "policy.yaml").write_text(POLICY)
    running = Stack(policies, tmp_path_factory.mktemp("hardening"), services=["order-service"])
    yield running
    running.close()


@pytest.fixture
def mock(stack: Stack) -> Mock:
    recorder = Mock(stack)
    recorder.clear()
    return recorder


def post(stack: Stack, path: str, body: bytes | dict[str, object], timeout: float = 10,
         headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(stack.base_url("order-service") + path, content=content, headers={**JSON, **(headers or {})},
                      timeout=timeout)


def tokens_used(stack: Stack) -> int:
    usage = httpx.get(f"http://127.0.0.1:{stack.admin_port}/quota").json()
    return sum(int(line["used"]) for line in usage["limits"] if line["metric"] == "total_tokens")


def both_slots_free(stack: Stack) -> bool:
    """max_in_flight is 2: two slow calls at once are both admitted only if no slot is held."""
    slow = {"x-mock-latency-ms": "300"}
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: post(stack, CHAT, {"model": "chat", "messages": [
            {"role": "user", "content": "probe"}]}, headers=slow), range(2)))
    return [a.status_code for a in answers] == [200, 200]


def swept(stack: Stack) -> float:
    metrics = httpx.get(f"http://127.0.0.1:{stack.admin_port}/metrics").text
    for line in metrics.splitlines():
        if line.startswith("ai_extproc_calls_swept_total "):
            return float(line.split()[1])
    return 0.0


DEEP = (b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "metadata": '
        + b"[" * 300 + b"]" * 300 + b"}")
WRONG_TYPES = [{"stop": 5}, {"temperature": []}, {"tools": 2.5}]


@pytest.mark.parametrize("body", [DEEP, *(orjson.dumps({"model": "cross", "messages": [
    {"role": "user", "content": "x"}], **extra}) for extra in WRONG_TYPES)], ids=["deep", "stop", "temperature",
                                                                                "tools"])
def test_crafted_bodies_are_400_and_hold_nothing(stack: Stack, mock: Mock, body: bytes) -> None:
    before = tokens_used(stack)
    for _ in range(3):  # more than max_in_flight: a leaked slot would show as a 429 here
        response = post(stack, CHAT, body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        # Precise, and nothing of ours: no exception or module names.
        assert not any(word in response.text for word in ("Error:", "Traceback", "extproc", "Exception"))
    assert mock.requests("openai") == [] and mock.requests("anthropic") == []
    assert tokens_used(stack) == before  # nothing reserved
    assert both_slots_free(stack)
    assert processor_alive(stack), logs(stack)


def test_wrong_typed_field_names_the_field(stack: Stack) -> None:
    response = post(stack, CHAT, {"model": "cross", "messages": [{"role": "user", "content": "x"}], "stop": 5})
    assert response.status_code == 400
    assert "stop" in response.json()["error"]["message"]


def test_callers_that_give_up_leave_nothing_reserved(stack: Stack, mock: Mock) -> None:
    before = tokens_used(stack)
    swept_before = swept(stack)
    hung = {"x-mock-latency-ms": "5000"}  # the provider answers long after the 1500ms timeout

    def give_up(_: int) -> str:
        try:
            post(stack, CHAT, {"model": "chat", "max_tokens": 5000, "messages": [{"role": "user", "content": "x"}]},
                 timeout=0.3, headers=hung)
        except httpx.TimeoutException:
            return "gave up"
        return "answered"

    with ThreadPoolExecutor(2) as pool:  # both slots of max_in_flight: 2
        assert list(pool.map(give_up, range(2))) == ["gave up"] * 2
    # Their reservations (max_tokens each) are held while the calls may still be running...
    assert tokens_used(stack) - before >= 2 * 5000
    # ...and given back once their deadline (timeout + grace) has passed: only the prompts stay charged.
    deadline = time.monotonic() + 15
    while swept(stack) - swept_before < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert swept(stack) - swept_before == 2
    assert tokens_used(stack) - before < 100
    assert both_slots_free(stack)


def test_an_encoded_path_is_governed_as_the_path_it_decodes_to(stack: Stack, mock: Mock) -> None:
    forbidden = post(stack, "/v1/chat%2Fcompletions", {"model": "gpt-5-ultra", "messages": []})
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "model_not_allowed"
    for path in ("/v1/chat%2Fcompletions", "/v1//chat/completions", "/v1/x/../chat/completions"):
        allowed = post(stack, path, {"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
        assert allowed.status_code == 200, (path, allowed.text)
        assert allowed.headers["x-ratelimit-limit-tokens"] == "100000"  # the quota saw it
    sent = mock.requests("openai")
    assert [r["path"] for r in sent] == ["/v1/chat/completions"] * 3
    assert mock.requests("anthropic") == []


def test_a_frozen_processor_cannot_hold_a_translated_answer(stack: Stack) -> None:
    """A translated answer passes through the processor full duplex, with no per-message timer in Envoy,
    and after the provider has answered, the route timeout no longer runs: HTTP/2 pings on the processor
    connection must end the call within seconds of the replica freezing."""
    process = stack.processor.process
    assert process is not None
    thaw = threading.Timer(15.0, lambda: os.kill(process.pid, signal.SIGCONT))  # never leave it frozen
    body = {"model": "cross", "messages": [{"role": "user", "content": "one two three"}]}
    outcome: dict[str, object] = {}

    def call() -> None:
        started = time.monotonic()
        try:
            outcome["status"] = post(stack, CHAT, body, timeout=30, headers={"x-mock-latency-ms": "600"}).status_code
        except httpx.HTTPError as exc:
            outcome["status"] = type(exc).__name__
        outcome["took"] = time.monotonic() - started

    caller = threading.Thread(target=call)
    try:
        caller.start()
        time.sleep(0.3)  # decided and sent; the provider answers at 600ms, into a frozen processor
        os.kill(process.pid, signal.SIGSTOP)
        thaw.start()
        caller.join(30)
    finally:
        os.kill(process.pid, signal.SIGCONT)
        thaw.cancel()
    assert float(outcome["took"]) < 8.0, f"the caller was held {outcome}"  # type: ignore[arg-type]
    assert outcome["status"] != 200  # cut, not answered in the wrong format
    deadline = time.monotonic() + 20  # the replica is back: Envoy's health check lets it serve again
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if post(stack, CHAT, {"model": "chat", "messages": [{"role": "user", "content": "x"}]}).status_code == 200:
                break
        time.sleep(0.5)
    else:
        pytest.fail("the processor did not serve again after it was thawed")


def test_a_burst_of_successful_calls_logs_no_traceback(stack: Stack) -> None:
    """Envoy closes each ext_proc stream gracefully: no reset races the processor's last write."""
    mark = len(stack.processor.log_text())
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: post(stack, CHAT, {"model": "chat", "messages": [
            {"role": "user", "content": "x"}]}).status_code, range(300)))
    assert statuses.count(200) + statuses.count(429) == 300  # max_in_flight: 2 refuses some, cleanly
    assert statuses.count(200) > 0
    log = stack.processor.log_text()[mark:]
    assert "Traceback" not in log and "ExecuteBatchError" not in log, log[-3000:]


def envoy_stat(stack: Stack, name: str) -> int:
    text = httpx.get(f"http://127.0.0.1:{stack.envoy_admin_ports['order-service']}/stats",
                     params={"filter": f"^{name}$"}).text
    return int(text.split(":")[1])


def test_an_idle_sidecar_keeps_its_processor_connection(stack: Stack) -> None:
    """The sidecar pings its processor every second. gRPC's default server policy answers pings on an
    idle connection with GOAWAY(too_many_pings) after two; a call racing that GOAWAY got a 503
    "processor could not be reached" (seen in CI). The processor accepts the sidecar's pings."""
    assert post(stack, CHAT, {"model": "chat", "messages": [{"role": "user", "content": "x"}]}).status_code == 200
    closed = envoy_stat(stack, "cluster.ai-extproc.upstream_cx_close_notify")
    opened = envoy_stat(stack, "cluster.ai-extproc.upstream_cx_total")
    time.sleep(5)  # five pings with no call open: the old policy closed the connection by the third
    assert post(stack, CHAT, {"model": "chat", "messages": [{"role": "user", "content": "x"}]}).status_code == 200
    assert envoy_stat(stack, "cluster.ai-extproc.upstream_cx_close_notify") == closed
    assert envoy_stat(stack, "cluster.ai-extproc.upstream_cx_total") == opened
