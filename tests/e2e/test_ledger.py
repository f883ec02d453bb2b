"""The spend ledger on real services: NATS JetStream (127.0.0.1:4222, or a private nats-server) and
PostgreSQL (127.0.0.1:5432 with trust auth; a private initdb'd server for the outage test).

Every test uses its own subject prefix, stream, consumer and database, removed afterwards. No
timing thresholds: waits have generous deadlines that only turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import psycopg
import pytest
from nats.aio.msg import Msg

from devtools.launch import free_port
from extproc.events.nats_sink import JSON_CONTENT_TYPE
from extproc.events.schema import SCHEMA_NAME, event_to_json, to_event
from extproc.events.sinks import NatsEventSink
from extproc.events.subjects import subject_for
from extproc.ledger.consumer import Ledger, LedgerOptions
from extproc.ledger.schema import MIGRATIONS, migrate
from tests.conftest import missing
from tests.e2e.test_events_nats import a_record

REPO = Path(__file__).resolve().parents[2]
HANG = 30.0


# -- fixtures -------------------------------------------------------------------------------------


def _dsn(port: int, dbname: str) -> str:
    return f"host=127.0.0.1 port={port} user=postgres dbname={dbname} connect_timeout=3"


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL (127.0.0.1:5432, trust auth), dropped afterwards."""
    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(_dsn(5432, "postgres"), autocommit=True)
    except psycopg.OperationalError as exc:
        missing(f"no PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth): {exc}")
        raise
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield _dsn(5432, name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def names(nats_url: str) -> Iterator[tuple[str, str, str]]:
    """(subject prefix, stream, dead-letter subject) of this test; the stream is deleted afterwards."""
    unique = uuid.uuid4().hex[:12]
    yield f"test{unique}.usage", f"TEST_{unique.upper()}", f"test{unique}.ledger.dead"
    asyncio.run(_delete_stream(nats_url, f"TEST_{unique.upper()}"))


async def _delete_stream(url: str, stream: str) -> None:
    nc = await nats.connect(url)
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def running(options: LedgerOptions) -> AsyncIterator[Ledger]:
    ledger = Ledger(options)
    await ledger.start()
    stop = asyncio.Event()
    task = asyncio.create_task(ledger.run(stop))
    try:
        yield ledger
    finally:
        stop.set()
        await asyncio.wait_for(task, HANG)
        await ledger.close()


def options_for(nats_url: str, dsn: str, names: tuple[str, str, str], **kwargs: Any) -> LedgerOptions:
    prefix, stream, dead = names
    return LedgerOptions(nats_url, dsn, stream=stream, prefix=prefix, consumer="ledger-test", dead_subject=dead,
                         **kwargs)


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    async with asyncio.timeout(HANG):
        while not await check():
            await asyncio.sleep(0.05)


async def count_rows(dsn: str) -> int:
    try:
        async with await psycopg.AsyncConnection.connect(dsn) as db:
            cursor = await db.execute("SELECT count(*) FROM ai_calls")
            row = await cursor.fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    assert row is not None
    return int(row[0])


async def rows_by_request(dsn: str) -> dict[str, tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as db:
        cursor = await db.execute("SELECT request_id, event_id, input_tokens, output_tokens, cached_input_tokens, "
                                  "cost_usd, namespace, service, provider, model, status, fallback_hops, time, "
                                  "end_user FROM ai_calls")
        rows = await cursor.fetchall()
    found = {row[0]: row for row in rows}
    assert len(found) == len(rows), "two rows for one call"
    return found


async def publish(nats_url: str, prefix: str, stream: str, indices: range) -> None:
    """Events of a_record(i) for each i, through the processor's own publisher."""
    sink = NatsEventSink(nats_url, prefix=prefix, stream=stream)
    await sink.start()
    try:
        for i in indices:
            sink.emit(a_record(i))
        async with asyncio.timeout(HANG):
            while sink.counts.published < len(indices):
                await asyncio.sleep(0.05)
    finally:
        await sink.close(5)
    assert sink.counts.dropped == 0


# -- tests ----------------------------------------------------------------------------------------


def test_every_event_is_one_row_and_a_duplicate_is_not_another(nats_url: str, postgres_dsn: str,
                                                                names: tuple[str, str, str]) -> None:
    n = 50
    prefix, stream, _ = names

    async def scenario() -> None:
        async with running(options_for(nats_url, postgres_dsn, names, batch_size=16)) as ledger:
            await publish(nats_url, prefix, stream, range(n))
            await until(lambda: _equals(count_rows(postgres_dsn), n), f"{n} rows")
            rows = await rows_by_request(postgres_dsn)
            for i in range(n):
                record = a_record(i)
                row = rows[record.request_id]
                assert row[2:6] == (record.input_tokens, record.output_tokens, 0, row[5])
                assert float(row[5]) == record.cost_usd  # numeric holds the event's double exactly
                assert row[6:11] == ("shop", "checkout", "openai", "gpt-4o-mini", 200)
                assert [h["outcome"] for h in row[11]] == ["status_503", "ok"]
                assert row[12].timestamp() == pytest.approx(record.started_at)
                assert row[13] is None
            # The same event again, as a producer retry after the stream's duplicate window would send it.
            event = to_event(a_record(7), event_id=rows["req-7"][1])
            nc = await nats.connect(nats_url)
            try:
                await nc.jetstream().publish(subject_for(prefix, "shop", "checkout"), event_to_json(event).encode(),
                                             headers={"Nats-Msg-Id": f"retry-{uuid.uuid4().hex}",
                                                      "Content-Type": JSON_CONTENT_TYPE, "Ai-Schema": SCHEMA_NAME})
            finally:
                await nc.close()
            await until(lambda: _true(ledger.duplicates == 1), "the duplicate")
            assert await count_rows(postgres_dsn) == n
            assert (ledger.written, ledger.dead_letters) == (n, 0)

    asyncio.run(scenario())


def test_a_malformed_message_goes_to_the_dead_letters(nats_url: str, postgres_dsn: str,
                                                      names: tuple[str, str, str]) -> None:
    prefix, stream, dead = names
    bad = [(b"this is not an event", {}), (b'{"service": "checkout"}', {"Content-Type": JSON_CONTENT_TYPE}),
           (b'{"event_id": "e1", "tokens": {"input": "many"}}', {"Content-Type": JSON_CONTENT_TYPE})]

    async def scenario() -> None:
        nc = await nats.connect(nats_url)
        seen: list[Msg] = []

        async def collect(msg: Msg) -> None:
            seen.append(msg)

        await nc.subscribe(dead, cb=collect)
        try:
            async with running(options_for(nats_url, postgres_dsn, names)) as ledger:
                subject = subject_for(prefix, "shop", "checkout")
                for payload, headers in bad:
                    await nc.jetstream().publish(subject, payload, headers=headers or None)
                await until(lambda: _true(len(seen) == len(bad)), "the dead letters")
                assert ledger.dead_letters == len(bad)
                assert [m.data for m in seen] == [payload for payload, _ in bad]
                assert all(m.headers and m.headers["Ai-Original-Subject"] == subject for m in seen)
                assert await count_rows(postgres_dsn) == 0
                await publish(nats_url, prefix, stream, range(1))  # and the ledger goes on
                await until(lambda: _equals(count_rows(postgres_dsn), 1), "the good event")
                assert ledger.dead_letters == len(bad)
        finally:
            await nc.close()
        # Acknowledged: nothing is left for the consumer.
        nc = await nats.connect(nats_url)
        try:
            info = await nc.jetstream().consumer_info(stream, "ledger-test")
            assert (info.num_pending, info.num_ack_pending) == (0, 0)
        finally:
            await nc.close()

    asyncio.run(scenario())


def test_migrate_twice_is_a_no_op(postgres_dsn: str) -> None:
    async def scenario() -> None:
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as db:
            assert await migrate(db) == len(MIGRATIONS)
            assert await migrate(db) == 0
            cursor = await db.execute("SELECT version FROM ledger_migrations ORDER BY version")
            assert [row[0] for row in await cursor.fetchall()] == list(range(1, len(MIGRATIONS) + 1))
            cursor = await db.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'ai_calls' ORDER BY 1")
            assert [row[0] for row in await cursor.fetchall()] == ["ai_calls_caller_time", "ai_calls_pkey",
                                                                   "ai_calls_time"]

    asyncio.run(scenario())


def test_a_dead_letter_subject_inside_the_stream_is_refused() -> None:
    with pytest.raises(ValueError, match="inside the usage stream"):
        Ledger(LedgerOptions("nats://127.0.0.1:1", "", prefix="ai.usage", dead_subject="ai.usage.dead"))


# -- PostgreSQL outage ----------------------------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL of its own on a free port (initdb + pg_ctl), run as user postgres when we are root."""

    def __init__(self) -> None:
        if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
            missing("initdb/pg_ctl not on PATH: cannot start a private PostgreSQL")
        self.dir = Path(tempfile.mkdtemp(prefix="ledger-pg-"))
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")

    def run(self, *command: str) -> None:
        subprocess.run([*self.as_user, *command], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60)

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o",
                 f"-p {self.port} -h 127.0.0.1 -k {self.dir} -F", "start")

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def dsn(self) -> str:
        return _dsn(self.port, "postgres")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.remove()


def test_a_postgres_outage_loses_nothing_and_duplicates_nothing(nats_url: str, private_postgres: PrivatePostgres,
                                                                names: tuple[str, str, str]) -> None:
    prefix, stream, _ = names
    dsn = private_postgres.dsn

    async def scenario() -> None:
        options = options_for(nats_url, dsn, names, batch_size=8, backoff_min_s=0.1, backoff_max_s=0.5)
        async with running(options) as ledger:
            await publish(nats_url, prefix, stream, range(20))
            await until(lambda: _equals(count_rows(dsn), 20), "the first 20 rows")
            await asyncio.to_thread(private_postgres.stop, "fast")
            await publish(nats_url, prefix, stream, range(20, 45))
            await until(lambda: _true(ledger.write_failures >= 2), "failed writes")  # it tried, and backs off
            await asyncio.to_thread(private_postgres.start)
            await until(lambda: _equals(count_rows(dsn), 45), "all 45 rows")
            rows = await rows_by_request(dsn)
            assert sorted(rows) == sorted(f"req-{i}" for i in range(45))
            assert len({row[1] for row in rows.values()}) == 45
            assert ledger.written + ledger.duplicates >= 45 and ledger.written == 45
        nc = await nats.connect(nats_url)
        try:
            info = await nc.jetstream().consumer_info(stream, "ledger-test")
            assert (info.num_pending, info.num_ack_pending) == (0, 0)
        finally:
            await nc.close()

    asyncio.run(scenario())


# -- the command ---------------------------------------------------------------------------------------


def test_the_command_runs_until_sigterm(nats_url: str, postgres_dsn: str, names: tuple[str, str, str]) -> None:
    prefix, stream, dead = names
    command = [sys.executable, "-m", "extproc", "ledger", "--nats", nats_url, "--postgres", postgres_dsn,
               "--stream", stream, "--prefix", prefix, "--consumer", "ledger-cli", "--dead-subject", dead]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async def scenario() -> None:
            await publish(nats_url, prefix, stream, range(3))
            await until(lambda: _equals(count_rows(postgres_dsn), 3), "3 rows from the command")

        asyncio.run(scenario())
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=HANG)
        assert process.returncode == 0, output
        assert "3 row(s) written" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _true(value: bool) -> bool:
    return value
