"""Telemetry of real calls through Envoy: usage events on the real NATS JetStream, the JSON access log,
OTLP spans (received by a local OTLP/HTTP endpoint from the real exporter) and redaction in all of them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import nats
import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from devtools.launch import free_port
from devtools.stack import Stack
from extproc.events.gen.ai.extproc.v1.usage_event_pb2 import UsageEvent

SECRET = "sk-live-0123456789abcdefghijklmnopqrstuv"
POLICY = """\
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_API_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_API_KEY}}
---
service: SERVICE
ai_proxy:
  models:
  - {name: chat, provider: openai, model: gpt-4, rate_limit: 3/min}
  - {name: fraud_detector, provider: claude, model: claude-3, fallback: [openai/gpt-4o]}
"""


class OtlpReceiver:
    """A minimal OTLP/HTTP trace endpoint: keeps every exported span."""

    def __init__(self) -> None:
        self.port = free_port()
        self.spans: list[object] = []
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    async def _traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return web.Response(status=200, content_type="application/x-protobuf")

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.fixture(scope="module")
def setup(envoy_binary: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[Stack, str, Path, OtlpReceiver, str]]:
    service = f"telemetry-{uuid.uuid4().hex[:8]}"
    unique = uuid.uuid4().hex[:8]
    prefix, stream = f"t{unique}.usage", f"T_{unique.upper()}"
    policies = tmp_path_factory.mktemp("telemetry-policies")
    (policies / "policy.yaml").write_text(POLICY.replace("SERVICE", service))
    logs = tmp_path_factory.mktemp("telemetry")
    otlp = OtlpReceiver()
    stack = Stack(policies, logs, services=[service], processor_args=[
        "--events-nats", nats_url, "--events-prefix", prefix, "--events-stream", stream,
        "--events-file", str(logs / "events.jsonl"), "--access-log", str(logs / "access.jsonl"),
        "--trace-exporter", "otlp-http", "--trace-endpoint", f"http://127.0.0.1:{otlp.port}/v1/traces",
        "--capture-content"],
        processor_env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    yield stack, service, logs, otlp, f"{prefix}.demo.{service}"
    stack.close()
    otlp.close()
    asyncio.run(_drop_stream(nats_url, stream))


async def _drop_stream(url: str, stream: str) -> None:
    connection = await nats.connect(url)
    try:
        await connection.jetstream().delete_stream(stream)
    finally:
        await connection.close()


async def _read_events(url: str, subject: str, count: int) -> list[UsageEvent]:
    connection = await nats.connect(url)
    try:
        subscription = await connection.jetstream().subscribe(subject, ordered_consumer=True)
        events = []
        for _ in range(count):
            message = await subscription.next_msg(timeout=10)
            assert message.headers is not None and message.headers["Ai-Schema"] == "ai.extproc.v1.UsageEvent"
            events.append(UsageEvent.FromString(message.data))
        return events
    finally:
        await connection.close()


def wait_for(predicate: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_every_call_is_one_event_one_log_line_and_one_span(setup: tuple[Stack, str, Path, OtlpReceiver, str],
                                                           nats_url: str) -> None:
    stack, service, logs, otlp, subject = setup
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{'1' * 16}-01"
    client = openai.OpenAI(base_url=stack.base_url(service) + "/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": f"my key is {SECRET}"}],
                                   extra_headers={"traceparent": traceparent, "x-request-id": "req-one"})
    streamed = client.chat.completions.create(model="chat", stream=True, messages=[{"role": "user", "content": "s"}],
                                              extra_headers={"x-request-id": "req-two"})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    claude = anthropic.Anthropic(base_url=stack.base_url(service), api_key="x", max_retries=0)
    claude.messages.create(model="fraud_detector", max_tokens=20, messages=[{"role": "user", "content": "f"}],
                           extra_headers={"x-mock-only": "anthropic", "x-mock-status": "503",
                                          "x-request-id": "req-three"})
    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "last allowed"}],
                                   extra_headers={"x-request-id": "req-four"})
    with pytest.raises(openai.RateLimitError):  # 3/min: the fifth call is refused, and still recorded
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "refused"}],
                                       extra_headers={"x-request-id": "req-five"})

    events = {e.request_id: e for e in asyncio.run(_read_events(nats_url, subject, 5))}
    assert set(events) == {"req-one", "req-two", "req-three", "req-four", "req-five"}
    one = events["req-one"]
    assert (one.service, one.namespace, one.provider, one.response_model, one.status, one.outcome) == (
        service, "demo", "openai", "gpt-4", 200, "ok")
    assert one.trace_id == trace_id and one.tokens.input > 0 and one.tokens.output > 0 and one.cost_usd > 0
    assert one.tokens.usage_reported and not one.streamed
    two = events["req-two"]
    assert two.streamed and two.HasField("ttft_ms") and two.tokens.output > 0
    three = events["req-three"]
    assert (three.provider, three.response_model, three.caller_api) == ("openai", "gpt-4o", "anthropic")
    assert [(h.provider, h.model, h.outcome) for h in three.hops] == [("claude", "claude-3", "upstream_error")]
    five = events["req-five"]
    assert (five.status, five.outcome) == (429, "refused:rate_limit_exceeded")

    # The JSONL sink holds the same events; the access log one line per call with the same ids.
    wait_for(lambda: len((logs / "events.jsonl").read_text().splitlines()) >= 5, "the JSONL events")
    lines = [json.loads(line) for line in (logs / "events.jsonl").read_text().splitlines()]
    assert {line["request_id"] for line in lines} == set(events)
    wait_for(lambda: len((logs / "access.jsonl").read_text().splitlines()) >= 5, "the access log")
    access = {entry["request_id"]: entry for entry in map(json.loads, (logs / "access.jsonl").read_text().splitlines())}
    assert set(access) == set(events)
    assert access["req-one"]["trace_id"] == trace_id and access["req-one"]["status"] == 200

    # One span per call; the first joins the caller's trace.
    wait_for(lambda: len(otlp.spans) >= 5, "the exported spans")
    traced = [s for s in otlp.spans if s.trace_id.hex() == trace_id]  # type: ignore[attr-defined]
    assert len(traced) == 1 and traced[0].parent_span_id.hex() == "1" * 16  # type: ignore[attr-defined]
    attributes = {a.key: a.value for a in traced[0].attributes}  # type: ignore[attr-defined]
    assert attributes["gen_ai.provider.name"].string_value == "openai"
    assert attributes["ai.provider"].string_value == "openai"
    assert attributes["gen_ai.request.model"].string_value == "chat"

    # Content was captured (on purpose, --capture-content), but the key never left the processor.
    assert "[REDACTED]" in access["req-one"]["prompt"]
    everywhere = [(logs / "access.jsonl").read_text(), (logs / "events.jsonl").read_text(),
                  *(str(s) for s in otlp.spans), *(e.SerializeToString().decode("latin-1") for e in events.values()),
                  *(p.log_text() for p in stack.processors)]
    assert not any(SECRET in text for text in everywhere)


def test_a_nats_outage_does_not_fail_calls(envoy_binary: str, tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(POLICY.replace("SERVICE", "order-service").replace("3/min", "100/min"))
    dead = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    stack = Stack(policies, tmp_path, services=["order-service"], processor_args=["--events-nats", dead])
    try:
        client = openai.OpenAI(base_url=stack.base_url("order-service") + "/v1", api_key="x", max_retries=0)
        for i in range(20):
            reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": f"n{i}"}])
            assert reply.choices[0].message.content == f"mock reply from gpt-4: n{i}"
        metrics = httpx.get(f"http://127.0.0.1:{stack.admin_port}/metrics").text
        assert 'ai_extproc_events_published_total{sink="nats"} 0.0' in metrics
    finally:
        stack.close()
