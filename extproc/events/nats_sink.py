"""Usage events to NATS JetStream, one message per finished AI call.

Message: subject ``<prefix>.<namespace>.<service>`` (extproc/events/subjects.py), payload the
binary protobuf encoding of ``ai.extproc.v1.UsageEvent`` (or its JSON mapping with
``json_payload=True``), headers:

- ``Content-Type: application/x-protobuf`` (``application/json`` for JSON payloads)
- ``Ai-Schema: ai.extproc.v1.UsageEvent``: the message type, so a consumer can decode without
  knowing which producer wrote the stream
- ``Nats-Msg-Id: <event_id>``: JetStream drops a re-publish of the same event within the stream's
  duplicate window, which makes our retries (a lost ack is not a lost message) safe.

The AI call has already happened when ``emit()`` runs, so nothing here may slow it or fail it:
``emit()`` only appends the record to a bounded in-memory queue; a background task converts,
publishes and waits for JetStream acks. NATS being down at startup or later only fills the queue
(events wait there until the connection is back); what does not fit, or is still unconfirmed after
``max_attempts``, is dropped and counted. ``published + dropped + queued + in_flight`` always
equals the number of ``emit()`` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from prometheus_client import CollectorRegistry

from extproc.events.counters import CountedSink, SinkCounters
from extproc.events.schema import SCHEMA_NAME, event_to_json, to_event
from extproc.events.subjects import DEFAULT_PREFIX, DEFAULT_STREAM, check_prefix, stream_subjects, subject_for
from extproc.telemetry.record import CallRecord

log = logging.getLogger(__name__)

PROTOBUF_CONTENT_TYPE = "application/x-protobuf"
JSON_CONTENT_TYPE = "application/json"
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0

# Failures worth another attempt: the connection or JetStream was briefly unavailable, or the ack
# was lost. Anything else (a rejected message, a payload over the server limit) fails again.
_TRANSIENT = (
    asyncio.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


@dataclass(frozen=True, slots=True)
class _Outgoing:
    subject: str
    payload: bytes
    headers: dict[str, str]


class NatsEventSink(CountedSink):
    """A ``CallSink`` publishing usage events to JetStream. Lifecycle: construct, ``await start()``
    on the serving event loop, ``emit()`` freely, ``await close(timeout)`` at shutdown.

    ``emit()`` may be called before ``start()`` (events wait in the queue) and from other threads
    (they are handed to the loop); after ``close()`` it drops.
    """

    name = "nats"

    def __init__(self, url: str, *, registry: CollectorRegistry | None = None, prefix: str = DEFAULT_PREFIX,
                 stream: str = DEFAULT_STREAM, max_age_s: float = DEFAULT_MAX_AGE_S, create_stream: bool = True,
                 queue_size: int = 10_000, max_in_flight: int = 256, ack_timeout_s: float = 1.0,
                 max_attempts: int = 3, connect_timeout_s: float = 2.0, reconnect_wait_s: float = 1.0,
                 json_payload: bool = False) -> None:
        if queue_size < 1 or max_in_flight < 1 or max_attempts < 1:
            raise ValueError("queue_size, max_in_flight and max_attempts must be at least 1")
        self.url = url
        self.prefix = check_prefix(prefix)
        self.stream = stream
        self.max_age_s = max_age_s
        self.create_stream = create_stream
        self.max_in_flight = max_in_flight
        self.ack_timeout_s = ack_timeout_s
        self.max_attempts = max_attempts
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_wait_s = reconnect_wait_s
        self.json_payload = json_payload
        self.counts = SinkCounters(self.name, registry)
        self._queue: asyncio.Queue[CallRecord] = asyncio.Queue(queue_size)
        self._in_flight = 0  # taken off the queue, not yet published or dropped
        self._nc = Client()
        self._js: JetStreamContext | None = None
        self._up = asyncio.Event()  # connected; publishing waits for it instead of failing
        self._stream_checked = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._closed = False
        self._outage_logged = False
        self._last_drop_log = 0.0

    # -- CallSink -----------------------------------------------------------------------------

    def emit(self, record: CallRecord) -> None:
        """Queue the record; never blocks, never raises (a full queue or a closed sink drops it)."""
        try:
            if self._loop is not None and threading.get_ident() != self._loop_thread:
                # asyncio.Queue belongs to its loop; from another thread, enqueue on that loop.
                self._loop.call_soon_threadsafe(self._enqueue, record)
            else:
                self._enqueue(record)
        except Exception:  # a closed loop, or worse: the call is done, losing its event is the lesser harm
            self._drop(1, "could not be queued", exc_info=True)

    def _enqueue(self, record: CallRecord) -> None:
        if self._closed:
            self._drop(1, "the sink is closed")
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self._drop(1, f"the queue is full ({self._queue.maxsize})")

    # -- state ----------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def connected(self) -> bool:
        return self._nc.is_connected

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background publisher. Returns at once: connecting (and reconnecting, for as
        long as it takes) happens in the background."""
        if self._task is not None or self._closed:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._task = asyncio.create_task(self._run(), name="usage-events-nats")

    async def close(self, timeout: float = 5.0) -> None:
        """Publish what can be published within ``timeout`` seconds, drop (and count) the rest,
        close the connection. Returns within ``timeout`` (plus scheduling noise) whatever NATS does."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        if self._task is not None:
            # Keep a slice of the budget for closing the connection politely.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, timeout - min(0.5, timeout / 4))):
                    await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        leftover = self._in_flight
        self._in_flight = 0
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
            leftover += 1
        if leftover:
            self._drop(leftover, "the sink closed before they were published", force_log=True)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(max(0.05, deadline - loop.time())):
                await self._nc.close()
        self._up.clear()

    # -- background publisher -------------------------------------------------------------------

    async def _run(self) -> None:
        await self._connect()
        while True:
            batch = await self._take_batch()
            self._in_flight = len(batch)
            try:
                await self._deliver(batch)  # settles every event of the batch: published or dropped
            except asyncio.CancelledError:
                raise  # close() counts what is still in flight
            except Exception:  # a bug must not stop event delivery for the life of the process
                log.exception("usage events: publishing a batch failed")
                self._settle(dropped=self._in_flight, reason="publishing failed unexpectedly")
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _connect(self) -> None:
        while True:
            try:
                # max_reconnect_attempts=-1: nats-py retries the first connection, and every later
                # one, forever, waiting reconnect_time_wait between attempts; events queue meanwhile.
                # nats-py annotates both times as int but only hands them to asyncio (wait_for, sleep).
                await self._nc.connect(
                    self.url, name="ai-extproc-usage-events", allow_reconnect=True, max_reconnect_attempts=-1,
                    connect_timeout=self.connect_timeout_s,  # type: ignore[arg-type]
                    reconnect_time_wait=self.reconnect_wait_s,  # type: ignore[arg-type]
                    error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected, closed_cb=self._on_disconnected)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # what nats-py does not retry itself (a bad URL, say): keep trying
                log.error("usage events: cannot connect to NATS at %s: %s", self.url, exc)
                with contextlib.suppress(Exception):
                    await self._nc.close()
                self._nc = Client()
                await asyncio.sleep(max(1.0, self.reconnect_wait_s))
        self._js = self._nc.jetstream(timeout=self.ack_timeout_s)
        log.info("usage events: connected to %s (stream %s, subjects %s.>)", self._server(), self.stream,
                 self.prefix)
        self._outage_logged = False
        self._up.set()

    async def _take_batch(self) -> list[CallRecord]:
        batch = [await self._queue.get()]
        while len(batch) < self.max_in_flight and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _deliver(self, batch: list[CallRecord]) -> None:
        pending: list[_Outgoing] = []
        for record in batch:
            try:
                pending.append(self._encode(record))
            except Exception:
                log.exception("usage events: cannot encode the record of request %r", record.request_id)
                self._settle(dropped=1)
        for attempt in range(1, self.max_attempts + 1):
            await self._up.wait()
            if not self._stream_checked:
                await self._ensure_stream()
            results = await asyncio.gather(*(self._publish(item) for item in pending), return_exceptions=True)
            retry: list[_Outgoing] = []
            published = 0
            for item, result in zip(pending, results, strict=True):
                if not isinstance(result, BaseException):
                    published += 1
                elif isinstance(result, _TRANSIENT) and attempt < self.max_attempts:
                    retry.append(item)
                else:
                    self._settle(dropped=1, reason=f"publishing failed: {type(result).__name__}: {result}")
                if isinstance(result, nats.js.errors.NoStreamResponseError):
                    self._stream_checked = False  # deleted under us? look again before the retry
            self._settle(published=published)
            pending = retry
            if not pending:
                return

    async def _publish(self, item: _Outgoing) -> None:
        assert self._js is not None  # _deliver runs only after _connect
        await self._js.publish(item.subject, item.payload, timeout=self.ack_timeout_s, headers=item.headers)

    def _encode(self, record: CallRecord) -> _Outgoing:
        event = to_event(record)
        if self.json_payload:
            payload, content_type = event_to_json(event).encode(), JSON_CONTENT_TYPE
        else:
            payload, content_type = event.SerializeToString(), PROTOBUF_CONTENT_TYPE
        headers = {"Nats-Msg-Id": event.event_id, "Content-Type": content_type, "Ai-Schema": SCHEMA_NAME}
        return _Outgoing(subject_for(self.prefix, record.namespace, record.service), payload, headers)

    async def _ensure_stream(self) -> None:
        """Create the stream when missing. An existing stream is left as its owner configured it."""
        assert self._js is not None
        try:
            try:
                info = await self._js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                if not self.create_stream:
                    log.warning("usage events: stream %s does not exist and create_stream is off", self.stream)
                    self._stream_checked = True  # a NoStreamResponse on publish makes us look again
                    return
                await self._js.add_stream(StreamConfig(name=self.stream, subjects=stream_subjects(self.prefix),
                                                       max_age=self.max_age_s, storage=StorageType.FILE))
                log.info("usage events: created stream %s for %s.> (max age %ss)", self.stream, self.prefix,
                         self.max_age_s)
            else:
                if not set(stream_subjects(self.prefix)) <= set(info.config.subjects or ()):
                    log.warning("usage events: stream %s exists but does not list %s; events go wherever "
                                "their subjects are stored, if anywhere", self.stream, stream_subjects(self.prefix))
            self._stream_checked = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # e.g. another stream owns the subjects: publishing will tell
            log.warning("usage events: cannot check or create stream %s: %s", self.stream, exc)
            self._stream_checked = True  # do not ask again for every batch; a NoStreamResponse resets it

    # -- accounting -----------------------------------------------------------------------------

    def _settle(self, *, published: int = 0, dropped: int = 0, reason: str = "") -> None:
        self.counts.add_published(published)
        self._in_flight -= published
        if dropped:
            self._in_flight -= dropped
            self._drop(dropped, reason or "delivery failed")

    def _drop(self, n: int, reason: str, *, force_log: bool = False, exc_info: bool = False) -> None:
        self.counts.add_dropped(n)
        now = time.monotonic()
        # One line per minute is enough to notice an outage; the counter has the exact numbers.
        if force_log or exc_info or now - self._last_drop_log >= 60.0:
            self._last_drop_log = now
            log.warning("usage events: dropped %d event(s): %s (%d dropped in total)", n, reason,
                        self.counts.dropped, exc_info=exc_info)

    # -- connection callbacks -------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        # nats-py reports every failed (re)connect attempt; one line per outage is enough.
        if not self._outage_logged:
            self._outage_logged = True
            log.warning("usage events: NATS at %s unavailable (%s); events are queued until it is back",
                        self.url, str(exc) or type(exc).__name__)
        else:
            log.debug("usage events: NATS error: %r", exc)

    async def _on_disconnected(self) -> None:
        self._up.clear()

    async def _on_reconnected(self) -> None:
        self._outage_logged = False
        self._stream_checked = False  # a different server (or a restarted one) may lack the stream
        log.info("usage events: reconnected to %s", self._server())
        self._up.set()

    def _server(self) -> str:
        url = self._nc.connected_url
        return url.netloc if url is not None else self.url
