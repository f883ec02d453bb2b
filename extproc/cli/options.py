"""Options and helpers the ``extproc`` subcommands share."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from extproc.policy.loader import PolicyError

if TYPE_CHECKING:
    from extproc.server.app import ServeOptions
    from extproc.telemetry.telemetry import TelemetryOptions


class TrustSettings(TypedDict):
    """The ``ServeOptions`` fields ``trust_settings`` fills."""

    peer_identity: bool
    credentials: tuple[str, int] | None


class TelemetrySettings(TypedDict):
    """The ``ServeOptions`` fields ``telemetry_settings`` fills."""

    telemetry: TelemetryOptions
    events_nats: str | None
    events_file: str | None
    events_prefix: str
    events_stream: str
    jobs_nats: str | None
    jobs_prefix: str
    jobs_workers: tuple[str, ...]


def sample_policy_dir() -> Path:
    return Path(str(resources.files("extproc") / "samples" / "policies"))


def host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def upstream(value: str) -> tuple[str, tuple[str, int]]:
    authority, sep, address = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected AUTHORITY=HOST:PORT, got {value!r}")
    return authority, host_port(address)


def run_server(options: ServeOptions) -> int:
    """Serve until stopped; a bad policy at startup exits 2 with its problems, a bind failure 1."""
    from extproc.server.app import run

    try:
        run(options)
    except PolicyError as exc:
        print(f"extproc: refusing to start, the policy is invalid:\n{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 1
    except (RuntimeError, ValueError) as exc:  # telemetry set-up: a bad redaction pattern, a broken exporter
        print(f"extproc: refusing to start: {exc}", file=sys.stderr)
        return 2
    return 0


def add_metrics_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics", type=host_port, help="HOST:PORT serving GET /metrics only (the admin "
                        "port's Prometheus text, nothing else: for a scraper outside the mesh)")


def add_relay_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--relay", type=host_port, help="HOST:PORT of the fallback relay, where sidecars send "
                        "the retry of a failed provider attempt (off when absent: no cross-provider fallback)")


def add_trust_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("trust (the mesh: docs/design/trust.md)")
    group.add_argument("--peer-identity", choices=("none", "xfcc"), default="none",
                       help="xfcc: bind every caller to the mTLS identity the processor's own sidecar forwards in "
                       "x-forwarded-client-cert, and refuse calls without one (the Istio install); none: trust the "
                       "sidecar's node metadata (standalone, no mesh)")
    group.add_argument("--credentials-listen", type=host_port, metavar="HOST:PORT",
                       help="the credential port, where the egress gateway trades a decision's grant for the "
                       "provider key (only the gateway may reach it); off when absent")


def trust_settings(args: argparse.Namespace) -> TrustSettings:
    return {"peer_identity": args.peer_identity == "xfcc", "credentials": args.credentials_listen}


def add_telemetry_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("telemetry (one record per AI call: access log, traces, usage events)")
    group.add_argument("--access-log", nargs="?", const="", metavar="PATH",
                       help="one JSON line per call: to PATH ('-' for stdout), or without PATH to the "
                       "extproc.access logger")
    group.add_argument("--trace-exporter", choices=("none", "otlp-grpc", "otlp-http"), default="none",
                       help="OpenTelemetry span export (default: none)")
    group.add_argument("--trace-endpoint", help="OTLP endpoint (default: the exporter's, or OTEL_EXPORTER_OTLP_*)")
    group.add_argument("--trace-sample-ratio", type=float, default=1.0,
                       help="for traces the mesh has not sampled already")
    group.add_argument("--capture-content", action="store_true",
                       help="record prompts in the access log and spans, redacted (off by default)")
    group.add_argument("--redact", action="append", default=[], metavar="REGEX",
                       help="also redact text matching REGEX (repeatable); keys and bearer tokens always are")
    group.add_argument("--events-nats", metavar="URL", help="publish usage events to NATS JetStream, e.g. "
                       "nats://127.0.0.1:4222 (subject ai.usage.<namespace>.<service>, stream AI_USAGE)")
    group.add_argument("--events-prefix", default="ai.usage", help="subject prefix of usage events")
    group.add_argument("--events-stream", default="AI_USAGE", help="JetStream stream (created if missing)")
    group.add_argument("--events-file", metavar="PATH", help="append usage events to a JSON-lines file")
    jobs = parser.add_argument_group("asynchronous calls (Prefer: respond-async)")
    jobs.add_argument("--jobs-nats", metavar="URL", default=os.environ.get("EXTPROC_JOBS_NATS") or None,
                      help="accept asynchronous calls as jobs in NATS JetStream, e.g. nats://127.0.0.1:4222 "
                      "(run `extproc worker` to execute them; default: $EXTPROC_JOBS_NATS)")
    jobs.add_argument("--jobs-prefix", default="", help="prefix of the job streams and buckets (as the worker's)")
    jobs.add_argument("--jobs-worker", action="append", metavar="SERVICE",
                      help="identity of the worker's sidecar, whose replays act as the submitting service "
                      "(repeatable; default ai-extproc-worker)")


def telemetry_settings(args: argparse.Namespace) -> TelemetrySettings:
    """ServeOptions fields from the telemetry arguments; a bad value stops startup here."""
    from extproc.telemetry.telemetry import TelemetryOptions

    options = TelemetryOptions(
        access_log=args.access_log is not None, access_log_path=args.access_log or None,
        trace_exporter=args.trace_exporter, trace_endpoint=args.trace_endpoint,
        trace_sample_ratio=args.trace_sample_ratio, capture_content=args.capture_content,
        redact_patterns=tuple(args.redact))
    return {"telemetry": options, "events_nats": args.events_nats, "events_file": args.events_file,
            "events_prefix": args.events_prefix, "events_stream": args.events_stream, "jobs_nats": args.jobs_nats,
            "jobs_prefix": args.jobs_prefix, "jobs_workers": tuple(args.jobs_worker or ["ai-extproc-worker"])}


def write_output(text: str, output: str | None) -> None:
    """A rendered document to a file, or to stdout without one."""
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)
