"""The ledger's tables, their migrations, and the row of one usage event.

Migrations are an ordered tuple of SQL scripts: version n is ``MIGRATIONS[n - 1]``. ``migrate()``
records each applied version in ``ledger_migrations`` and applies the missing ones, each in its
own transaction under an advisory lock, so two ledgers starting together do not race. Released
migrations are never edited: a change is a new one appended at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from extproc.events.schema import UsageEvent, event_to_dict

_LOCK_ID = 0x4C454447  # "LEDG": the advisory lock that serialises migrations
_INT4_MAX = 2**31 - 1

MIGRATIONS: tuple[str, ...] = (
    # 1: one row per AI call. time is when the call started; end_user is for later (#19), NULL now.
    """
    CREATE TABLE ai_calls (
        event_id             text PRIMARY KEY,
        time                 timestamptz NOT NULL,
        namespace            text NOT NULL,
        service              text NOT NULL,
        end_user             text,
        provider             text NOT NULL,
        gen_ai_provider_name text NOT NULL,
        model                text NOT NULL,
        requested_model      text NOT NULL,
        variant              text NOT NULL,
        input_tokens         bigint NOT NULL,
        output_tokens        bigint NOT NULL,
        cached_input_tokens  bigint NOT NULL,
        cost_usd             numeric NOT NULL,
        status               integer NOT NULL,
        outcome              text NOT NULL,
        latency_ms           bigint NOT NULL,
        fallback_hops        jsonb NOT NULL,
        request_id           text NOT NULL,
        trace_id             text NOT NULL
    );
    CREATE INDEX ai_calls_time ON ai_calls (time);
    CREATE INDEX ai_calls_caller_time ON ai_calls (namespace, service, time);
    """,
)

COLUMNS = ("event_id", "time", "namespace", "service", "end_user", "provider", "gen_ai_provider_name", "model",
           "requested_model", "variant", "input_tokens", "output_tokens", "cached_input_tokens", "cost_usd",
           "status", "outcome", "latency_ms", "fallback_hops", "request_id", "trace_id")
INSERT = (f"INSERT INTO ai_calls ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))}) "
          "ON CONFLICT (event_id) DO NOTHING")


class InvalidEvent(ValueError):
    """An event the ledger cannot store (no id, values out of range): it goes to the dead letters."""


async def migrate(conn: AsyncConnection[Any]) -> int:
    """Apply the missing migrations; the number applied (0: the schema was up to date)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        await conn.execute("CREATE TABLE IF NOT EXISTS ledger_migrations "
                           "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
    applied = 0
    for version, script in enumerate(MIGRATIONS, start=1):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
            cursor = await conn.execute("SELECT 1 FROM ledger_migrations WHERE version = %s", (version,))
            if await cursor.fetchone() is not None:
                continue
            await conn.execute(script.encode())  # bytes: psycopg's type for a script of our own, no params
            await conn.execute("INSERT INTO ledger_migrations (version, applied_at) VALUES (%s, now())",
                               (version,))
            applied += 1
    return applied


@dataclass(frozen=True, slots=True)
class Row:
    values: tuple[Any, ...]  # in COLUMNS order

    @property
    def event_id(self) -> str:
        return str(self.values[0])


def row_of(event: UsageEvent, received_at: datetime) -> Row:
    """The ai_calls row of an event; ``received_at`` (JetStream's storage time) stands in for an
    event without start and end time. InvalidEvent when it cannot be stored."""
    if not event.event_id.strip():
        raise InvalidEvent("no event_id")
    if event.status > _INT4_MAX:
        raise InvalidEvent(f"status {event.status} out of range")
    if not math.isfinite(event.cost_usd) or not math.isfinite(event.latency_ms):
        raise InvalidEvent("cost_usd or latency_ms is not a finite number")
    mapped = event_to_dict(event)
    tokens = event.tokens
    return Row((
        _text(event.event_id), _time_of(event, received_at), _text(event.namespace), _text(event.service), None,
        _text(event.provider), _text(event.gen_ai_provider_name), _text(event.response_model),
        _text(event.requested_model), _text(event.variant), tokens.input, tokens.output, tokens.cached_input,
        Decimal(repr(event.cost_usd)), event.status, _text(event.outcome), round(event.latency_ms),
        Jsonb([{key: _text(value) for key, value in hop.items()} for hop in mapped["hops"]]),
        _text(event.request_id), _text(event.trace_id),
    ))


def _time_of(event: UsageEvent, received_at: datetime) -> datetime:
    for field in ("started_at", "ended_at"):
        if event.HasField(field):
            return getattr(event, field).ToDatetime(tzinfo=UTC)  # type: ignore[no-any-return]
    return received_at


def _text(value: str) -> str:
    # PostgreSQL text (and jsonb) cannot hold NUL; a NUL in a label must not block the batch.
    return value.replace("\x00", "")
