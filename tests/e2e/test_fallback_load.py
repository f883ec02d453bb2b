"""Fallback under repetition through the real Envoy: every attempt's redirect is followed inside Envoy.

A failed attempt is retried to the relay, whose 307 Envoy must follow internally; a 307 that reached
the caller would be a leak of the mechanism (and, before, of its state). Each trigger is driven 300
times with concurrent HTTP/1.1 callers that do not follow redirects, counting every status, and an
HTTP/2 caller sends its whole body but holds END_STREAM back before finishing the request.
"""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import h2.config
import h2.connection
import h2.events
import httpx
import orjson
import pytest

from devtools.launch import free_port
from devtools.stack import Stack

POLICY = """\
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_API_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_API_KEY}}
- {name: dead, api: anthropic, base_url: http://dead.example.com/v1, credential: {env: ANTHROPIC_API_KEY}}
---
service: order-service
ai_proxy:
  models:
  - name: scorer
    provider: claude
    model: claude-3
    timeout: 10000ms
    first_byte_timeout: 300ms
    fallback: [openai/gpt-4o]
    circuit_breaker: {consecutive_failures: 100000}
  - name: unreachable
    provider: dead
    model: claude-3
    fallback: [openai/gpt-4o]
    circuit_breaker: {consecutive_failures: 100000}
"""
CALLS = 300
CONCURRENCY = 8
BODY = {"max_tokens": 5, "messages": [{"role": "user", "content": "score"}]}
ANTHROPIC = {"anthropic-version": "2023-06-01", "x-api-key": "app", "content-type": "application/json"}
TRIGGERS = {
    "5xx": ("scorer", {"x-mock-only": "anthropic", "x-mock-status": "503"}),
    "reset": ("scorer", {"x-mock-only": "anthropic", "x-mock-reset": "1"}),
    "connect_failure": ("unreachable", {}),
    "first_byte_timeout": ("scorer", {"x-mock-only": "anthropic", "x-mock-latency-ms": "1500"}),
}


@pytest.fixture(scope="module")
def stack(envoy_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    policies = tmp_path_factory.mktemp("fallback-load-policies")
    (policies / "policy.yaml").write_text(POLICY)
    running = Stack(policies, tmp_path_factory.mktemp("fallback-load"), services=["order-service"],
                    upstream_overrides={"dead": ("127.0.0.1", free_port())})  # nothing listens there
    yield running
    running.close()


@pytest.mark.parametrize("trigger", list(TRIGGERS))
def test_every_fallback_is_answered_200_never_3xx(stack: Stack, trigger: str) -> None:
    model, fault = TRIGGERS[trigger]
    url = stack.base_url("order-service") + "/v1/messages"

    def call(_: int) -> tuple[int, str, bool]:
        # A connection per call, as many callers make: the request then arrives in more than one read.
        with httpx.Client(timeout=20, follow_redirects=False) as client:
            response = client.post(url, json={**BODY, "model": model}, headers={**ANTHROPIC, **fault})
        return response.status_code, response.headers.get("x-ai-provider", ""), "x-ai-fallback" in response.headers

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(call, range(CALLS)))
    statuses = collections.Counter(status for status, _, _ in results)
    assert statuses == {200: CALLS}, f"{trigger}: {dict(statuses)}"  # every non-2xx counted, 3xx included
    assert {provider for _, provider, _ in results} == {"openai"}
    assert not any(leaked for _, _, leaked in results)


def h2_call_holding_end_stream(port: int, body: bytes, headers: dict[str, str], hold_s: float) -> tuple[int, bytes]:
    """An HTTP/2 caller that sends its whole body, waits, and only then ends the stream (empty DATA)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":authority", "api.anthropic.com"),
                               (":path", "/v1/messages"), ("content-length", str(len(body))),
                               *headers.items()])
    conn.send_data(stream, body)  # all of it, without END_STREAM
    sock.sendall(conn.data_to_send())
    time.sleep(hold_s)
    conn.end_stream(stream)
    sock.sendall(conn.data_to_send())
    status, data, done = 0, b"", False
    try:
        while not done:
            chunk = sock.recv(65536)
            if not chunk:
                break
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    done = True
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return status, data


@pytest.mark.parametrize("trigger", ["5xx", "connect_failure"])
def test_http2_caller_holding_end_stream_is_served_by_the_fallback(stack: Stack, trigger: str) -> None:
    model, fault = TRIGGERS[trigger]
    body = orjson.dumps({**BODY, "model": model})
    port = int(stack.base_url("order-service").rsplit(":", 1)[1])
    for _ in range(3):
        status, data = h2_call_holding_end_stream(port, body, {**ANTHROPIC, **fault}, hold_s=0.3)
        assert status == 200, data
        answer = orjson.loads(data)
        assert answer["type"] == "message" and answer["content"][0]["text"] == "mock reply from gpt-4o: score"
