"""``Ledger``: usage events from a durable JetStream pull consumer into PostgreSQL, one row per call.

Delivery is at least once and the table makes it exactly once: a batch is written in one
transaction with ``ON CONFLICT (event_id) DO NOTHING`` and acknowledged only after the commit, so a
crash or a PostgreSQL outage between the two leaves the batch unacknowledged and JetStream delivers
it again; rows already written are skipped by the conflict clause.

While PostgreSQL is down the ledger holds its batch and retries with a bounded exponential back-off;
nothing is acknowledged, so nothing is lost. A message that is not a usage event (undecodable, no
event_id, values out of range) goes to the dead-letter subject with its original subject and the
reason in headers, is counted and logged, and is then acknowledged. The dead-letter subject must
lie outside the usage stream's subjects; keeping what is published there (a stream of its own, a
subscriber) is the operator's choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
import psycopg
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from psycopg import AsyncConnection

from extproc.events.nats_sink import DEFAULT_MAX_AGE_S
from extproc.events.schema import UsageEvent, event_from_json
from extproc.events.subjects import DEFAULT_PREFIX, DEFAULT_STREAM, check_prefix, stream_subjects
from extproc.ledger.schema import INSERT, Row, migrate, row_of

log = logging.getLogger(__name__)

DEFAULT_CONSUMER = "ai-ledger"
DEFAULT_DEAD_SUBJECT = "ai.ledger.dead"


@dataclass(frozen=True, slots=True)
class LedgerOptions:
    nats_url: str
    postgres_dsn: str
    stream: str = DEFAULT_STREAM
    prefix: str = DEFAULT_PREFIX
    consumer: str = DEFAULT_CONSUMER
    dead_subject: str = DEFAULT_DEAD_SUBJECT
    batch_size: int = 100
    fetch_timeout_s: float = 1.0
    ack_wait_s: float = 30.0
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    connect_timeout_s: float = 5.0


class Ledger:
    """Lifecycle: ``await start()``, ``await run(stop)`` until ``stop`` is set, ``await close()``."""

    def __init__(self, options: LedgerOptions) -> None:
        check_prefix(options.prefix)
        if options.dead_subject.startswith(options.prefix + "."):
            raise ValueError(f"dead-letter subject {options.dead_subject!r} is inside the usage stream's "
                             f"subjects {options.prefix}.>: it would be read back as an event")
        if options.batch_size < 1 or options.backoff_min_s <= 0 or options.backoff_max_s < options.backoff_min_s:
            raise ValueError("batch_size must be at least 1 and 0 < backoff_min_s <= backoff_max_s")
        self.options = options
        self.written = 0  # rows inserted
        self.duplicates = 0  # events already in the table (redeliveries, re-published events)
        self.dead_letters = 0  # messages sent to the dead-letter subject
        self.write_failures = 0  # failed attempts to write a batch (PostgreSQL down, say)
        self._nc = Client()
        self._js: JetStreamContext | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._db: AsyncConnection[Any] | None = None

    async def start(self) -> None:
        """Connect to NATS and bind the durable consumer (creating stream and consumer when missing)."""
        opts = self.options
        await self._nc.connect(opts.nats_url, name=f"extproc-ledger-{opts.consumer}", allow_reconnect=True,
                               max_reconnect_attempts=-1, connect_timeout=opts.connect_timeout_s,  # type: ignore[arg-type]
                               reconnect_time_wait=1)
        self._js = self._nc.jetstream()
        await self._ensure_stream()
        config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=opts.ack_wait_s,
                                max_ack_pending=max(1000, 2 * opts.batch_size))
        self._sub = await self._js.pull_subscribe(f"{opts.prefix}.>", durable=opts.consumer, stream=opts.stream,
                                                  config=config)
        log.info("ledger: consuming %s.> from stream %s as %s", opts.prefix, opts.stream, opts.consumer)

    async def _ensure_stream(self) -> None:
        assert self._js is not None
        opts = self.options
        try:
            await self._js.stream_info(opts.stream)
        except nats.js.errors.NotFoundError:  # the ledger may start before the first processor: as the sink does
            await self._js.add_stream(StreamConfig(name=opts.stream, subjects=stream_subjects(opts.prefix),
                                                   max_age=DEFAULT_MAX_AGE_S, storage=StorageType.FILE))

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch, write and acknowledge batches until ``stop`` is set; the batch in hand is finished
        first (or, while PostgreSQL is down, left unacknowledged for JetStream to deliver again)."""
        assert self._sub is not None, "start() first"
        while not stop.is_set():
            try:
                batch = await self._sub.fetch(self.options.batch_size, timeout=self.options.fetch_timeout_s)
            except nats.errors.TimeoutError:
                continue
            except (nats.errors.Error, OSError) as exc:  # NATS away: nats-py reconnects meanwhile
                log.warning("ledger: fetching from NATS failed: %s", exc)
                await _sleep_unless(stop, self.options.backoff_min_s)
                continue
            await self.handle(batch, stop)

    async def handle(self, batch: list[Msg], stop: asyncio.Event) -> bool:
        """Write one batch and acknowledge it; False when ``stop`` came before PostgreSQL did."""
        rows: list[Row] = []
        for msg in batch:
            try:
                rows.append(row_of(decode(msg), _stored_at(msg)))
            except Exception as exc:
                await self._dead_letter(msg, f"{type(exc).__name__}: {exc}")
        if rows and not await self._write(rows, stop):
            return False
        for msg in batch:
            await msg.ack()
        await self._nc.flush()
        return True

    async def _write(self, rows: list[Row], stop: asyncio.Event) -> bool:
        delay = self.options.backoff_min_s
        while True:
            try:
                db = await self._connection()
                async with db.transaction(), db.cursor() as cursor:
                    await cursor.executemany(INSERT, [row.values for row in rows])
                    inserted = max(cursor.rowcount, 0)
            except psycopg.Error as exc:
                self.write_failures += 1
                log.warning("ledger: cannot write %d row(s) to PostgreSQL (%s); retrying in %.1fs, "
                            "nothing is acknowledged meanwhile", len(rows), str(exc).strip() or type(exc).__name__,
                            delay)
                await self._disconnect()
                if await _sleep_unless(stop, delay):
                    return False
                delay = min(delay * 2, self.options.backoff_max_s)
                continue
            self.written += inserted
            self.duplicates += len(rows) - inserted
            return True

    async def _connection(self) -> AsyncConnection[Any]:
        if self._db is None or self._db.closed:
            db = await AsyncConnection.connect(self.options.postgres_dsn, autocommit=True,
                                               connect_timeout=max(1, round(self.options.connect_timeout_s)))
            try:
                applied = await migrate(db)
            except BaseException:
                await db.close()
                raise
            if applied:
                log.info("ledger: applied %d schema migration(s)", applied)
            self._db = db
        return self._db

    async def _disconnect(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.close()
            self._db = None

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        headers = {"Ai-Ledger-Error": reason[:500], "Ai-Original-Subject": msg.subject}
        if msg.headers and "Content-Type" in msg.headers:
            headers["Content-Type"] = msg.headers["Content-Type"]
        await self._nc.publish(self.options.dead_subject, msg.data, headers=headers)
        self.dead_letters += 1
        log.warning("ledger: message on %s is not a usage event (%s); sent to %s (%d dead letter(s) so far)",
                    msg.subject, reason, self.options.dead_subject, self.dead_letters)

    async def close(self) -> None:
        await self._disconnect()
        with contextlib.suppress(Exception):
            await self._nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await self._nc.close()


def decode(msg: Msg) -> UsageEvent:
    """A usage event: JSON when the Content-Type says so or the payload is a JSON object, else protobuf."""
    content_type = (msg.headers or {}).get("Content-Type", "")
    if content_type.startswith("application/json") or msg.data.lstrip()[:1] == b"{":
        return event_from_json(msg.data)
    return UsageEvent.FromString(msg.data)


def _stored_at(msg: Msg) -> datetime:
    try:
        return msg.metadata.timestamp
    except Exception:  # not a JetStream delivery (tests): now is as good as it gets
        return datetime.now(UTC)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep, or return early when ``stop`` is set; True when it was."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def run_until_signalled(options: LedgerOptions) -> None:
    """``extproc ledger``: run until SIGTERM or SIGINT, then finish the batch in hand and exit."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    ledger = Ledger(options)
    try:
        await ledger.start()
        await ledger.run(stop)
    finally:
        await ledger.close()
    log.info("ledger: stopped (%d row(s) written, %d duplicate(s), %d dead letter(s))", ledger.written,
             ledger.duplicates, ledger.dead_letters)
