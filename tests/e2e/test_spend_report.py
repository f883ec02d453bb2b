"""``extproc spend report`` on the machine's PostgreSQL (127.0.0.1:5432, trust auth): rows inserted
directly into a fresh database, then the report function and the CLI for every grouping and format."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import Jsonb

from extproc.ledger.report import GROUPS, SpendRow, parse_since, render, spend, total
from extproc.ledger.schema import migrate
from tests.conftest import missing

REPO = Path(__file__).resolve().parents[2]
NOW = datetime.now(UTC)
TODAY = NOW.strftime("%Y-%m-%d")
TWO_DAYS_AGO = NOW - timedelta(days=2)
TEN_DAYS_AGO = NOW - timedelta(days=10)
# (time, namespace, service, end_user, provider, model, input, output, cost, status, outcome)
ROWS = [
    (NOW, "shop", "cart", "alice", "openai", "gpt-4o", 100, 10, "0.001", 200, "ok"),
    (NOW, "shop", "cart", "alice", "openai", "gpt-4o", 200, 20, "0.002", 200, "ok"),
    (NOW, "shop", "cart", None, "openai", "gpt-4o", 300, 30, "0.003", 200, "cache_hit"),
    (NOW, "shop", "search", "bob", "anthropic", "claude", 400, 40, "0.0100000001", 200, "ok"),
    (NOW, "shop", "search", "bob", "anthropic", "claude", 500, 50, "0.02", 502, "error"),
    (TWO_DAYS_AGO, "shop", "cart", "alice", "openai", "gpt-4o", 1000, 100, "0.1", 200, "ok"),
    (TWO_DAYS_AGO, "shop", "search", None, "anthropic", "claude", 2000, 200, "0.2", 200, "ok"),
    (TWO_DAYS_AGO, "shop", "search", "bob", "anthropic", "claude", 3000, 300, "0.3", 200, "ok"),
    (TEN_DAYS_AGO, "shop", "cart", "alice", "openai", "gpt-4o", 9999, 999, "9.9", 200, "ok"),
    (TEN_DAYS_AGO, "ops", "bot", "carol", "openai", "gpt-4o", 8888, 888, "8.8", 500, "error"),
]
DAY2 = TWO_DAYS_AGO.strftime("%Y-%m-%d")
# Over 7 days (the last two rows are older).
EXPECTED_7D: dict[str, list[SpendRow]] = {
    "service": [SpendRow("shop/search", 4, 5900, 590, Decimal("0.5300000001"), 1),
                SpendRow("shop/cart", 4, 1600, 160, Decimal("0.106"), 0)],
    "model": [SpendRow("claude", 4, 5900, 590, Decimal("0.5300000001"), 1),
              SpendRow("gpt-4o", 4, 1600, 160, Decimal("0.106"), 0)],
    "provider": [SpendRow("anthropic", 4, 5900, 590, Decimal("0.5300000001"), 1),
                 SpendRow("openai", 4, 1600, 160, Decimal("0.106"), 0)],
    "namespace": [SpendRow("shop", 8, 7500, 750, Decimal("0.6360000001"), 1)],
    "user": [SpendRow("bob", 3, 3900, 390, Decimal("0.3300000001"), 1),
             SpendRow("(none)", 2, 2300, 230, Decimal("0.203"), 0),
             SpendRow("alice", 3, 1300, 130, Decimal("0.103"), 0)],
    "day": [SpendRow(DAY2, 3, 6000, 600, Decimal("0.6"), 0),
            SpendRow(TODAY, 5, 1500, 150, Decimal("0.0360000001"), 1)],
}


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    """A fresh database with ROWS, dropped afterwards."""
    if NOW.hour == 23 and NOW.minute >= 55:  # "day" groups by UTC day: do not straddle midnight
        pytest.skip("too close to UTC midnight for the per-day expectations")
    name = f"spend_test_{uuid.uuid4().hex[:12]}"
    base = "host=127.0.0.1 port=5432 user=postgres connect_timeout=3"
    try:
        admin = psycopg.connect(f"{base} dbname=postgres", autocommit=True)
    except psycopg.OperationalError as exc:
        missing(f"no PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth): {exc}")
        raise
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            asyncio.run(_fill(f"{base} dbname={name}"))
            yield f"{base} dbname={name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _fill(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await migrate(conn)
        async with conn.transaction():
            for n, (time, ns, svc, user, prov, model, inp, out, cost, status, outcome) in enumerate(ROWS):
                await conn.execute(
                    "INSERT INTO ai_calls (event_id, time, namespace, service, end_user, provider, "
                    "gen_ai_provider_name, model, requested_model, variant, input_tokens, output_tokens, "
                    "cached_input_tokens, cost_usd, status, outcome, latency_ms, fallback_hops, request_id, "
                    "trace_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 'a', %s, %s, 0, %s, %s, %s, 5, %s, "
                    "'r', 't')",
                    (f"e{n}", time, ns, svc, user, prov, prov, model, model, inp, out, Decimal(cost), status,
                     outcome, Jsonb([])))


async def _spend(dsn: str, by: str, since_s: float) -> list[SpendRow]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        return await spend(conn, by, since_s)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EXTPROC_LEDGER_DSN"}
    return subprocess.run([sys.executable, "-m", "extproc", "spend", "report", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("by", sorted(GROUPS))
def test_report_function_sums_exactly(dsn: str, by: str) -> None:
    assert asyncio.run(_spend(dsn, by, parse_since("7d"))) == EXPECTED_7D[by]


def test_since_excludes_older_rows(dsn: str) -> None:
    assert asyncio.run(_spend(dsn, "service", parse_since("1d"))) == [
        SpendRow("shop/search", 2, 900, 90, Decimal("0.0300000001"), 1),
        SpendRow("shop/cart", 3, 600, 60, Decimal("0.006"), 0)]
    everything = asyncio.run(_spend(dsn, "namespace", parse_since("30d")))
    assert everything == [SpendRow("shop", 9, 17499, 1749, Decimal("10.5360000001"), 1),
                          SpendRow("ops", 1, 8888, 888, Decimal("8.8"), 1)]
    assert asyncio.run(_spend(dsn, "model", parse_since("30m"))) == [
        SpendRow("claude", 2, 900, 90, Decimal("0.0300000001"), 1), SpendRow("gpt-4o", 3, 600, 60, Decimal("0.006"), 0)]


def test_unknown_grouping_is_refused_before_sql() -> None:
    with pytest.raises(ValueError, match="cannot group by"):
        asyncio.run(spend(None, "model; DROP TABLE ai_calls", 1.0))  # type: ignore[arg-type]


@pytest.mark.parametrize("text,seconds", [("30m", 1800.0), ("24h", 86400.0), ("7d", 604800.0), ("90s", 90.0)])
def test_parse_since(text: str, seconds: float) -> None:
    assert parse_since(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "7y", "-1d", "soon", "1.5.2h"])
def test_parse_since_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_since(text)


@pytest.mark.parametrize("by", sorted(GROUPS))
def test_cli_csv(dsn: str, by: str) -> None:
    done = _cli("--postgres", dsn, "--by", by, "--format", "csv")
    assert done.returncode == 0, done.stderr
    got = list(csv.reader(io.StringIO(done.stdout)))
    assert got[0] == [by, "calls", "input_tokens", "output_tokens", "cost_usd", "errors"]
    assert got[1:] == [[r.key, str(r.calls), str(r.input_tokens), str(r.output_tokens), str(r.cost_usd),
                        str(r.errors)] for r in EXPECTED_7D[by]]


@pytest.mark.parametrize("by", sorted(GROUPS))
def test_cli_json(dsn: str, by: str) -> None:
    done = _cli("--postgres", dsn, "--by", by, "--format", "json", "--since", "7d")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        {by: r.key, "calls": r.calls, "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
         "cost_usd": str(r.cost_usd), "errors": r.errors} for r in EXPECTED_7D[by]]


@pytest.mark.parametrize("by", sorted(GROUPS))
def test_cli_table(dsn: str, by: str) -> None:
    done = _cli("--postgres", dsn, "--by", by)  # table and 7d are the defaults
    assert done.returncode == 0, done.stderr
    assert done.stdout == render(EXPECTED_7D[by], "table", by)
    lines = done.stdout.splitlines()
    assert lines[0].split() == [by, "calls", "input_tokens", "output_tokens", "cost_usd", "errors"]
    assert set(lines[-2]) == {"-"}
    grand = total(EXPECTED_7D[by])
    assert lines[-1].split() == ["TOTAL", "8", "7500", "750", "0.6360000001", "1"] == [
        "TOTAL", str(grand.calls), str(grand.input_tokens), str(grand.output_tokens), str(grand.cost_usd),
        str(grand.errors)]
    assert len({len(line) for line in lines[1:-2]} | {len(lines[-1])}) == 1  # right-aligned columns


def test_cli_since_window(dsn: str) -> None:
    done = _cli("--postgres", dsn, "--by", "namespace", "--since", "30d", "--format", "csv")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == ["shop,9,17499,1749,10.5360000001,1", "ops,1,8888,888,8.8,1"]


def test_cli_bad_grouping_exits_2(dsn: str) -> None:
    done = _cli("--postgres", dsn, "--by", "bogus")
    assert done.returncode == 2
    assert "invalid choice: 'bogus'" in done.stderr


def test_cli_bad_since_exits_2(dsn: str) -> None:
    done = _cli("--postgres", dsn, "--by", "model", "--since", "a week")
    assert done.returncode == 2
    assert "--since 'a week' is not a duration" in done.stderr
    assert done.stdout == ""
