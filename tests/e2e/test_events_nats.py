"""Usage events on a real NATS JetStream (127.0.0.1:4222, or a private nats-server for the restart
test): what the sink publishes, what it does while NATS is away, and ``extproc events tail``.

Every test uses its own subject prefix and stream, deleted afterwards, so runs never see each other's
events. No timing thresholds: waits have generous deadlines that only turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig
from prometheus_client import CollectorRegistry

from devtools.launch import free_port
from extproc.events.schema import SCHEMA_NAME, UsageEvent, event_from_json, to_event
from extproc.events.sinks import NatsEventSink
from extproc.events.tail import TailOptions, format_line, tail_nats
from extproc.telemetry.record import CallRecord, Hop
from tests.conftest import missing

REPO = Path(__file__).resolve().parents[2]
HANG = 30.0  # seconds: a deadline for "this never happened", far above any normal duration


@pytest.fixture
def names(nats_url: str) -> Iterator[tuple[str, str]]:
    """(subject prefix, stream) unique to this test; the stream is deleted afterwards."""
    unique = uuid.uuid4().hex[:12]
    prefix, stream = f"test{unique}.usage", f"TEST_{unique.upper()}"
    yield prefix, stream
    asyncio.run(_delete_stream(nats_url, stream))


async def _delete_stream(url: str, stream: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(stream)
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await nc.close()


def a_record(i: int, namespace: str = "shop", service: str = "checkout") -> CallRecord:
    return CallRecord(
        service=service, namespace=namespace, operation="chat_completions", caller_api="openai",
        requested_model="fast", route="fast", provider="openai", response_model="gpt-4o-mini", status=200,
        outcome="ok", streamed=True, input_tokens=100 + i, output_tokens=20 + i, usage_reported=True,
        cost_usd=0.0001 * i, started_at=1_700_000_000.0 + i, ended_at=1_700_000_000.5 + i,
        first_byte_at=1_700_000_000.1 + i, hops=(Hop("anthropic", "claude", "status_503", 1_700_000_000.0 + i),
                                                 Hop("openai", "gpt-4o-mini", "ok", 1_700_000_000.2 + i)),
        policy_version="v1", request_id=f"req-{i}", traceparent=f"00-{i + 1:032x}-00f067aa0ba902b7-01",
        prompt="never published", completion="never published",
    )


async def fetch_all(url: str, stream: str, subject: str, n: int) -> list[Msg]:
    """Exactly the n messages of the stream, read with an ephemeral pull consumer."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        consumer = await js.pull_subscribe(subject, stream=stream)
        messages: list[Msg] = []
        async with asyncio.timeout(HANG):
            while len(messages) < n:
                messages += await consumer.fetch(n - len(messages), timeout=HANG)
        info = await js.stream_info(stream)
        assert info.state.messages == n
        return messages
    finally:
        await nc.close()


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(HANG):
        while not condition():
            await asyncio.sleep(0.02)


def run(coroutine: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coroutine())  # type: ignore[arg-type]


# -- publishing -------------------------------------------------------------------------------------


def test_sink_creates_stream_and_publishes_each_event(nats_url: str, names: tuple[str, str]) -> None:
    prefix, stream = names
    callers = [("shop", "checkout"), ("shop", "cart"), ("", "batch.job"), ("ml", "ranker"), ("shop", "checkout")]
    records = [a_record(i, ns, svc) for i, (ns, svc) in enumerate(callers)]
    registry = CollectorRegistry()

    async def scenario() -> None:
        nc = await nats.connect(nats_url)
        with pytest.raises(nats.js.errors.NotFoundError):
            await nc.jetstream().stream_info(stream)  # the sink has to create it
        await nc.close()
        sink = NatsEventSink(nats_url, registry=registry, prefix=prefix, stream=stream, max_age_s=3600)
        await sink.start()
        for record in records:
            sink.emit(record)
        await sink.close(timeout=HANG)
        assert (sink.published, sink.dropped, sink.queued, sink.in_flight) == (5, 0, 0, 0)
        assert registry.get_sample_value("ai_extproc_events_published_total", {"sink": "nats"}) == 5
        assert registry.get_sample_value("ai_extproc_events_dropped_total", {"sink": "nats"}) == 0

        nc = await nats.connect(nats_url)
        config = (await nc.jetstream().stream_info(stream)).config
        await nc.close()
        assert (config.subjects, config.max_age, config.storage) == ([f"{prefix}.>"], 3600, StorageType.FILE)

        messages = await fetch_all(nats_url, stream, f"{prefix}.>", len(records))
        received = {}
        for msg in messages:
            event = UsageEvent.FromString(msg.data)
            assert msg.headers == {"Nats-Msg-Id": event.event_id, "Content-Type": "application/x-protobuf",
                                   "Ai-Schema": SCHEMA_NAME}
            received[event.request_id] = (msg.subject, event)
        assert len({event.event_id for _, event in received.values()}) == 5
        for record in records:
            subject, event = received[record.request_id]
            assert subject == {"shop": f"{prefix}.shop", "": f"{prefix}._", "ml": f"{prefix}.ml"}[
                record.namespace] + "." + record.service.replace(".", "_")
            assert event == to_event(record, event_id=event.event_id)  # every field, exactly
            assert event.trace_id == f"{int(record.request_id[4:]) + 1:032x}"

    run(scenario)


def test_json_payload_and_existing_stream_left_alone(nats_url: str, names: tuple[str, str]) -> None:
    prefix, stream = names

    async def scenario() -> None:
        nc = await nats.connect(nats_url)
        await nc.jetstream().add_stream(StreamConfig(name=stream, subjects=[f"{prefix}.>"], max_age=60,
                                                     storage=StorageType.MEMORY))
        await nc.close()
        sink = NatsEventSink(nats_url, prefix=prefix, stream=stream, json_payload=True)
        await sink.start()
        sink.emit(a_record(7))
        await sink.close(timeout=HANG)
        assert (sink.published, sink.dropped) == (1, 0)
        [msg] = await fetch_all(nats_url, stream, f"{prefix}.shop.checkout", 1)
        assert msg.headers is not None and msg.headers["Content-Type"] == "application/json"
        event = event_from_json(msg.data)
        assert event == to_event(a_record(7), event_id=msg.headers["Nats-Msg-Id"])
        assert json.loads(msg.data)["tokens"] == {"input": 107, "output": 27, "cached_input": 0,
                                                  "usage_reported": True}
        nc = await nats.connect(nats_url)
        config = (await nc.jetstream().stream_info(stream)).config
        await nc.close()
        assert (config.max_age, config.storage) == (60, StorageType.MEMORY)  # the owner's settings stay

    run(scenario)


def test_emit_from_another_thread(nats_url: str, names: tuple[str, str]) -> None:
    """A sink started on the serving loop accepts emit() from a worker thread too."""
    prefix, stream = names
    sink = NatsEventSink(nats_url, prefix=prefix, stream=stream)

    async def scenario() -> None:
        await sink.start()
        await asyncio.to_thread(lambda: [sink.emit(a_record(i)) for i in range(3)])
        await eventually(lambda: sink.published == 3)
        await sink.close(timeout=HANG)
        assert (sink.published, sink.dropped) == (3, 0)

    run(scenario)


# -- NATS away -------------------------------------------------------------------------------------------


def test_outage_never_delays_emit_and_close_keeps_its_timeout() -> None:
    """NATS down (nothing listens on the port): emit() stays a plain synchronous call that queues,
    and close() gives up after its timeout, counting every undelivered event."""
    registry = CollectorRegistry()
    sink = NatsEventSink(f"nats://127.0.0.1:{free_port()}", registry=registry, prefix="down.usage",
                         reconnect_wait_s=0.05)

    async def scenario() -> None:
        await sink.start()
        await asyncio.sleep(0.1)  # the background task is now busy failing to connect
        assert not inspect.iscoroutinefunction(sink.emit)
        results = [sink.emit(a_record(i)) for i in range(1000)]  # no await: nothing here can wait
        assert results == [None] * 1000
        assert (sink.queued, sink.dropped, sink.published, sink.connected) == (1000, 0, 0, False)
        # wait_for is a hang guard, far above the 0.5 s close() is given.
        await asyncio.wait_for(sink.close(timeout=0.5), HANG)
        assert (sink.queued, sink.in_flight, sink.dropped, sink.published) == (0, 0, 1000, 0)
        sink.emit(a_record(0))  # after close: dropped, still no exception
        assert sink.dropped == 1001

    run(scenario)
    assert registry.get_sample_value("ai_extproc_events_dropped_total", {"sink": "nats"}) == 1001


def test_queue_overflow_counts_every_drop() -> None:
    registry = CollectorRegistry()
    sink = NatsEventSink(f"nats://127.0.0.1:{free_port()}", registry=registry, queue_size=10)

    async def scenario() -> None:
        for i in range(25):  # before start(): queued until full, the rest dropped
            sink.emit(a_record(i))
        assert (sink.queued, sink.dropped) == (10, 15)
        await sink.start()
        for i in range(5):
            sink.emit(a_record(i))
        assert (sink.queued, sink.dropped) == (10, 20)  # NATS is down: nothing left the queue
        await asyncio.wait_for(sink.close(timeout=0.2), HANG)
        assert (sink.queued, sink.dropped, sink.published) == (0, 30, 0)

    run(scenario)
    assert registry.get_sample_value("ai_extproc_events_dropped_total", {"sink": "nats"}) == 30


def test_events_wait_for_nats_and_survive_a_restart(tmp_path: Path) -> None:
    """Down at start, up, down again, up again: every event is published once (Nats-Msg-Id
    de-duplicates the retries of events whose ack was lost)."""
    binary = shutil.which("nats-server")
    if binary is None:
        missing("no nats-server binary to run a private NATS for the restart test")
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    command = [str(binary), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "store")]
    sink = NatsEventSink(url, prefix="restart.usage", stream="RESTART", reconnect_wait_s=0.05, ack_timeout_s=0.5,
                         max_attempts=20)
    servers: list[subprocess.Popen[bytes]] = []

    def start_server() -> None:
        with open(tmp_path / f"nats-{len(servers)}.log", "wb") as log:  # the server keeps its own descriptor
            servers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))

    async def scenario() -> None:
        await sink.start()
        for i in range(3):
            sink.emit(a_record(i))
        start_server()
        await eventually(lambda: sink.published == 3)
        servers[-1].terminate()
        servers[-1].wait(HANG)
        await eventually(lambda: not sink.connected)
        for i in range(3, 5):
            sink.emit(a_record(i))
        start_server()
        await eventually(lambda: sink.published == 5)
        await sink.close(timeout=HANG)
        assert (sink.published, sink.dropped) == (5, 0)
        messages = await fetch_all(url, "RESTART", "restart.usage.>", 5)
        assert sorted(UsageEvent.FromString(m.data).request_id for m in messages) == [f"req-{i}" for i in range(5)]

    try:
        run(scenario)
    finally:
        for server in servers:
            server.terminate()
            server.wait(HANG)


# -- extproc events tail ------------------------------------------------------------------------------


async def publish(url: str, prefix: str, stream: str, records: list[CallRecord]) -> None:
    sink = NatsEventSink(url, prefix=prefix, stream=stream)
    await sink.start()
    for record in records:
        sink.emit(record)
    await sink.close(timeout=HANG)
    assert (sink.published, sink.dropped) == (len(records), 0)


def test_tail_subprocess_prints_json_lines(nats_url: str, names: tuple[str, str]) -> None:
    prefix, stream = names
    records = [a_record(0, namespace="b"), a_record(1, namespace="a"), a_record(2, namespace="a")]
    asyncio.run(publish(nats_url, prefix, stream, records))
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "events", "tail", "--nats", nats_url, "--stream", stream, "--prefix",
         prefix, "--all", "--namespace", "a", "--count", "2", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=HANG, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    events = [event_from_json(line) for line in lines]
    assert [e.request_id for e in events] == ["req-1", "req-2"]  # stream order, namespace b filtered out
    assert events == [to_event(r, event_id=e.event_id) for r, e in zip(records[1:], events, strict=True)]


def test_tail_since_and_only_new(nats_url: str, names: tuple[str, str]) -> None:
    prefix, stream = names
    old = [a_record(0), a_record(1, service="cart")]

    async def scenario() -> None:
        await publish(nats_url, prefix, stream, old)
        out = io.StringIO()
        since = TailOptions(since=datetime.now(UTC) - timedelta(hours=1), count=2)
        await asyncio.wait_for(tail_nats(nats_url, since, out, stream=stream, prefix=prefix), HANG)
        assert out.getvalue().splitlines() == [format_line(to_event(r)) for r in old]

        # Default: only what arrives after the tail started. Publish once its consumer exists.
        out = io.StringIO()
        tail = asyncio.create_task(tail_nats(nats_url, TailOptions(count=1, service="cart"), out, stream=stream,
                                             prefix=prefix))
        nc = await nats.connect(nats_url)
        js = nc.jetstream()

        async def consumers() -> int:
            return (await js.stream_info(stream)).state.consumer_count

        async with asyncio.timeout(HANG):
            while await consumers() == 0:
                await asyncio.sleep(0.02)
        await nc.close()
        await publish(nats_url, prefix, stream, [a_record(2), a_record(3, service="cart")])
        assert await asyncio.wait_for(tail, HANG) == 0
        assert out.getvalue().splitlines() == [format_line(to_event(a_record(3, service="cart")))]

    run(scenario)


def test_tail_reports_a_missing_stream(nats_url: str, names: tuple[str, str]) -> None:
    prefix, stream = names
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "events", "tail", "--nats", nats_url, "--stream", stream, "--prefix",
         prefix, "--count", "1"], cwd=REPO, capture_output=True, text=True, timeout=HANG, check=False)
    assert (result.returncode, result.stdout) == (1, "")
    assert f"no stream {stream}" in result.stderr
