"""Spend reports over the ledger's ``ai_calls``: calls, tokens, cost and errors per group.

The grouping column comes from a fixed whitelist (``GROUPS``), never from the caller's text, and the
time window is a query parameter. Costs stay ``Decimal`` end to end: the JSON form writes them as strings.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from psycopg import AsyncConnection, sql

# --by name -> the SQL expression of the group key (all text). Days are UTC days.
GROUPS: dict[str, str] = {
    "service": "namespace || '/' || service",
    "model": "model",
    "namespace": "namespace",
    "user": "coalesce(end_user, '(none)')",
    "provider": "provider",
    "day": "to_char(date_trunc('day', time AT TIME ZONE 'UTC'), 'YYYY-MM-DD')",
}
# A call failed when the upstream answered >= 400 or the call did not end well. "ok" and "cache_hit" are the
# good outcomes (extproc.telemetry.record); "error", "cut" and "refused:<code>" are not.
_ERROR = "(status >= 400 OR outcome NOT IN ('ok', 'cache_hit'))"
_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
FORMATS = ("table", "csv", "json")
HEADER = ("key", "calls", "input_tokens", "output_tokens", "cost_usd", "errors")


@dataclass(frozen=True)
class SpendRow:
    key: str
    calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    errors: int


def parse_since(text: str) -> float:
    """``30m``, ``24h``, ``7d``, ``2w``, ``90s`` as seconds; ValueError otherwise."""
    match = _SINCE.match(text)
    if not match:
        raise ValueError(f"--since {text!r} is not a duration: a number and s, m, h, d or w, e.g. 30m, 24h, 7d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _query(by: str) -> sql.Composed:
    if by not in GROUPS:
        raise ValueError(f"cannot group by {by!r}: choose one of {', '.join(GROUPS)}")
    key = sql.SQL(GROUPS[by])  # a whitelisted constant, never the caller's text
    return sql.SQL(
        "SELECT {key} AS k, count(*), coalesce(sum(input_tokens), 0)::bigint, "
        "coalesce(sum(output_tokens), 0)::bigint, coalesce(sum(cost_usd), 0), "
        "count(*) FILTER (WHERE {error}) "
        "FROM ai_calls WHERE time >= now() - make_interval(secs => %s) "
        "GROUP BY k ORDER BY 5 DESC, k").format(key=key, error=sql.SQL(_ERROR))


async def spend(conn: AsyncConnection[Any], by: str, since_s: float) -> list[SpendRow]:
    """Per group of ``by`` over the last ``since_s`` seconds: most expensive first, then by key."""
    query = _query(by)  # first: an unknown grouping fails before any SQL
    cursor = await conn.execute(query, (since_s,))
    return [SpendRow(str(k), int(calls), int(inp), int(out), Decimal(cost), int(err))
            for k, calls, inp, out, cost, err in await cursor.fetchall()]


def _cells(row: SpendRow) -> tuple[str, ...]:
    return (row.key, str(row.calls), str(row.input_tokens), str(row.output_tokens), str(row.cost_usd),
            str(row.errors))


def total(rows: list[SpendRow]) -> SpendRow:
    return SpendRow("TOTAL", sum(r.calls for r in rows), sum(r.input_tokens for r in rows),
                    sum(r.output_tokens for r in rows), sum((r.cost_usd for r in rows), Decimal(0)),
                    sum(r.errors for r in rows))


def render(rows: list[SpendRow], fmt: str, by: str) -> str:
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow((by, *HEADER[1:]))
        writer.writerows(_cells(r) for r in rows)
        return out.getvalue()
    if fmt == "json":
        return json.dumps([dict(zip((by, *HEADER[1:]), (r.key, r.calls, r.input_tokens, r.output_tokens,
                                                         str(r.cost_usd), r.errors), strict=True))
                           for r in rows], indent=2) + "\n"
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    table = [(by, *HEADER[1:]), *(_cells(r) for r in rows), _cells(total(rows))]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths,
             strict=True))).rstrip() for line in table]
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines) + "\n"
