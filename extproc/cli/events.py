"""``extproc events``: read the usage events the processor publishes (one per finished AI call)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from extproc.events.subjects import DEFAULT_PREFIX, DEFAULT_STREAM, check_prefix


def _count(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("--count must be at least 1")
    return number


def _prefix(value: str) -> str:
    try:
        return check_prefix(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_events_parser(subparsers: Any) -> None:
    """Register ``events tail`` on the top-level subcommands (``subparsers`` of build_parser)."""
    events = subparsers.add_parser("events", help="usage events: one per finished AI call")
    events_sub = events.add_subparsers(dest="events_command", required=True)
    tail = events_sub.add_parser(
        "tail", help="print usage events as they arrive (NATS JetStream, or a JSONL sink file)",
        description="Follow the usage-event stream. Without --since or --all, only events published from now on.")
    tail.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS server URL (default: %(default)s)")
    tail.add_argument("--stream", default=DEFAULT_STREAM, help="JetStream stream (default: %(default)s)")
    tail.add_argument("--prefix", type=_prefix, default=DEFAULT_PREFIX, help="subject prefix (default: %(default)s)")
    tail.add_argument("--file", type=Path, help="follow this JSONL sink file instead of NATS")
    tail.add_argument("--namespace", help="only callers in this namespace (default: all)")
    tail.add_argument("--service", help="only this calling service (default: all)")
    start = tail.add_mutually_exclusive_group()
    start.add_argument("--since", help="start this long ago (10m, 2h, 1d) or at an ISO 8601 time")
    start.add_argument("--all", action="store_true", help="start from the oldest retained event")
    tail.add_argument("--count", type=_count, help="exit after printing this many events")
    tail.add_argument("--json", action="store_true", help="one JSON object per line (proto field names)")
    tail.set_defaults(func=cmd_events_tail)


def cmd_events_tail(args: argparse.Namespace) -> int:
    # Imported here: the rest of the CLI must not pay for protobuf and nats-py at startup.
    from extproc.events.tail import TailError, TailOptions, parse_since, tail_file, tail_nats

    try:
        options = TailOptions(namespace=args.namespace, service=args.service,
                              since=parse_since(args.since) if args.since else None, from_start=args.all,
                              count=args.count, as_json=args.json)
        if args.file is not None:
            return tail_file(args.file, options, sys.stdout)
        return asyncio.run(tail_nats(args.nats, options, sys.stdout, stream=args.stream, prefix=args.prefix))
    except TailError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `| head`: the reader is gone, which is not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
