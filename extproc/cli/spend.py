"""``extproc spend report``: spend per service, model, namespace, user, provider or day, from the ledger."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

_BY = ("service", "model", "namespace", "user", "provider", "day")  # extproc.ledger.report.GROUPS' keys


def add_spend_parser(subparsers: Any) -> None:
    spend = subparsers.add_parser("spend", help="report spend from the ledger's PostgreSQL table")
    spend_sub = spend.add_subparsers(dest="spend_command", required=True)
    report = spend_sub.add_parser(
        "report", help="calls, tokens, cost and errors per group",
        description="Sum the ledger's ai_calls over a recent window, grouped by one column, most expensive first.")
    dsn = os.environ.get("EXTPROC_LEDGER_DSN")
    report.add_argument("--postgres", default=dsn, required=dsn is None,
                        help="PostgreSQL DSN, e.g. postgresql://user@host/db (or EXTPROC_LEDGER_DSN)")
    report.add_argument("--by", required=True, choices=_BY, help="the grouping")
    report.add_argument("--since", default="7d", help="window back from now: 30m, 24h, 7d, ... (default: %(default)s)")
    report.add_argument("--format", default="table", choices=("table", "csv", "json"),
                        help="output format (default: %(default)s)")
    report.set_defaults(func=cmd_spend_report)


def cmd_spend_report(args: argparse.Namespace) -> int:
    # Imported here: the rest of the CLI must not pay for psycopg at startup.
    from extproc.ledger.report import parse_since, render

    try:
        since_s = parse_since(args.since)
    except ValueError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    rows = asyncio.run(_fetch(args.postgres, args.by, since_s))
    sys.stdout.write(render(rows, args.format, args.by))
    return 0


async def _fetch(dsn: str, by: str, since_s: float) -> list[Any]:
    import psycopg

    from extproc.ledger.report import spend

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        return await spend(conn, by, since_s)
