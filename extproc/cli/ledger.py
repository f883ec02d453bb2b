"""``extproc ledger``: the spend ledger, usage events from JetStream into PostgreSQL (one row per AI call)."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from extproc.events.subjects import DEFAULT_PREFIX, DEFAULT_STREAM

DEFAULT_NATS = "nats://127.0.0.1:4222"


def add_ledger_parser(subparsers: Any) -> None:
    from extproc.cli.events import _prefix

    ledger = subparsers.add_parser(
        "ledger", help="write usage events to PostgreSQL, one row per AI call",
        description="Consume usage events with a durable JetStream consumer and write them to PostgreSQL "
                    "(table ai_calls, created on start). Runs until SIGTERM/SIGINT.")
    ledger.add_argument("--nats", default=os.environ.get("EXTPROC_NATS_URL", DEFAULT_NATS),
                        help="NATS server URL (default: %(default)s)")
    dsn = os.environ.get("EXTPROC_LEDGER_DSN")
    ledger.add_argument("--postgres", default=dsn, required=dsn is None,
                        help="PostgreSQL DSN, e.g. postgresql://user@host/db (or EXTPROC_LEDGER_DSN)")
    ledger.add_argument("--stream", default=DEFAULT_STREAM, help="JetStream stream (default: %(default)s)")
    ledger.add_argument("--prefix", type=_prefix, default=DEFAULT_PREFIX, help="subject prefix (default: %(default)s)")
    ledger.add_argument("--consumer", default="ai-ledger", help="durable consumer name (default: %(default)s)")
    ledger.add_argument("--dead-subject", default="ai.ledger.dead",
                        help="where messages that are not usage events go (default: %(default)s); outside the "
                             "stream's subjects, stored only if you give it a stream of its own")
    ledger.add_argument("--batch", type=int, default=100, help="events per fetch and transaction")
    ledger.set_defaults(func=cmd_ledger)


def cmd_ledger(args: argparse.Namespace) -> int:
    # Imported here: the rest of the CLI must not pay for psycopg and nats-py at startup.
    from extproc.ledger.consumer import LedgerOptions, run_until_signalled

    options = LedgerOptions(nats_url=args.nats, postgres_dsn=args.postgres, stream=args.stream, prefix=args.prefix,
                            consumer=args.consumer, dead_subject=args.dead_subject, batch_size=args.batch)
    asyncio.run(run_until_signalled(options))
    return 0
