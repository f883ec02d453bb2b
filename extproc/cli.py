"""The ``extproc`` command: serve, check, render, mock-provider, demo."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from extproc.policy.loader import PolicyError, load_policy

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


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _upstream(value: str) -> tuple[str, tuple[str, int]]:
    authority, sep, address = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected AUTHORITY=HOST:PORT, got {value!r}")
    return authority, _host_port(address)


def cmd_serve(args: argparse.Namespace) -> int:
    from extproc.server.app import ServeOptions

    return run_server(ServeOptions(args.listen, tuple(args.policy or [sample_policy_dir()]), args.grace,
                                   args.watch, admin=args.admin, metrics=args.metrics, relay=args.relay,
                                   **telemetry_settings(args), **trust_settings(args)))


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
    parser.add_argument("--metrics", type=_host_port, help="HOST:PORT serving GET /metrics only (the admin "
                        "port's Prometheus text, nothing else: for a scraper outside the mesh)")


def add_relay_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--relay", type=_host_port, help="HOST:PORT of the fallback relay, where sidecars send "
                        "the retry of a failed provider attempt (off when absent: no cross-provider fallback)")


def add_trust_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("trust (the mesh: docs/design/trust.md)")
    group.add_argument("--peer-identity", choices=("none", "xfcc"), default="none",
                       help="xfcc: bind every caller to the mTLS identity the processor's own sidecar forwards in "
                       "x-forwarded-client-cert, and refuse calls without one (the Istio install); none: trust the "
                       "sidecar's node metadata (standalone, no mesh)")
    group.add_argument("--credentials-listen", type=_host_port, metavar="HOST:PORT",
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


def cmd_check(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.files)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"ok: {len(policy.providers)} provider(s), {len(policy.services)} service polic(ies), "
          f"version {policy.version}")
    for (namespace, service), models in sorted(policy.services.items(), key=lambda i: (i[0][1], i[0][0] or "")):
        names = ", ".join(f"{m.name}→{m.provider}/{m.model}" + "".join(f"→{f}" for f in m.fallback)
                          for m in models.proxy.models)
        print(f"  {namespace + '/' if namespace else ''}{service}: {names}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from extproc.envoy_config.bootstrap import SidecarSpec, render_bootstrap, to_yaml, upstream_for

    try:
        policy = load_policy(args.policy or [sample_policy_dir()])
    except PolicyError as exc:
        print(f"extproc: the policy is invalid:\n{exc}", file=sys.stderr)
        return 1
    overrides = dict(args.upstream)
    unknown = set(overrides) - {p.authority for p in policy.providers.values()}
    if unknown:
        print(f"extproc: --upstream for unknown provider host(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 1
    spec = SidecarSpec(
        service=args.service,
        namespace=args.namespace,
        listen_port=args.listen_port,
        admin_port=args.admin_port,
        processor=args.processor,
        upstreams=tuple(upstream_for(p, overrides.get(p.authority)) for p in policy.providers.values()),
        relay=(args.relay,) if args.relay else (),
        failure_mode_allow=policy.fails_open(args.service, args.namespace),
    )
    command = " ".join(["extproc", "render", "envoy", *(args.argv or [])])
    header = f"# Generated by `{command}`; do not edit.\n"
    write_output(to_yaml(render_bootstrap(spec), header), args.output)
    return 0


def write_output(text: str, output: str | None) -> None:
    """A rendered document to a file, or to stdout without one."""
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)


def cmd_mock_provider(args: argparse.Namespace) -> int:
    import asyncio

    from extproc.mock_provider import MockConfig, serve

    config = MockConfig(openai_key=args.openai_key, anthropic_key=args.anthropic_key, name=args.name,
                        latency_ms=args.latency_ms, fault_status=args.fault_status)
    host, port = args.listen
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, port, config))
    return 0


def cmd_quota_show(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import urllib.request

    from extproc.quota.engine import QuotaEngine
    from extproc.quota.report import Line, format_lines, report

    if args.admin:
        query = f"?service={args.service}" if args.service else ""
        try:
            with urllib.request.urlopen(f"http://{args.admin[0]}:{args.admin[1]}/quota{query}", timeout=5) as reply:
                data = json.load(reply)
        except OSError as exc:
            print(f"extproc: cannot reach the processor's admin port: {exc}", file=sys.stderr)
            return 1
        lines = [Line(**line) for line in data["limits"]]
        backend = data["backend"]
    else:
        try:
            policy = load_policy(args.policy or [sample_policy_dir()])
        except PolicyError as exc:
            print(f"extproc: the policy is invalid:\n{exc}", file=sys.stderr)
            return 1
        if policy.mesh.quota.backend != "redis":
            print("extproc: in-memory quotas live in the processor: pass --admin HOST:PORT of its admin port",
                  file=sys.stderr)
            return 1

        async def read() -> list[Line]:
            engine = QuotaEngine(policy.mesh.quota)
            try:
                return await report(policy, engine, args.service)
            finally:
                await engine.close()

        try:
            lines = asyncio.run(read())
        except Exception as exc:
            print(f"extproc: cannot read quota counters from {policy.mesh.quota.redis_url}: {exc}", file=sys.stderr)
            return 1
        backend = "redis"
    print(f"quota usage ({backend} backend; fixed UTC windows)")
    print(format_lines(lines))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from extproc.demo import run_demo

    return run_demo(keep_logs=args.keep_logs)


def build_parser() -> argparse.ArgumentParser:
    # Imported here: these modules import helpers from this one.
    from extproc.cli_events import add_events_parser
    from extproc.cli_jobs import add_jobs_parser
    from extproc.cli_mesh import add_serve_kubernetes_parser

    parser = argparse.ArgumentParser(prog="extproc", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    # `extproc --help` lists the commands in this order.
    _add_serve_parser(sub)
    _add_check_parser(sub)
    _add_render_parser(sub)
    add_serve_kubernetes_parser(sub)
    add_events_parser(sub)
    add_jobs_parser(sub)
    _add_mock_provider_parser(sub)
    _add_quota_parser(sub)
    _add_demo_parser(sub)
    return parser


def _add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run the ext_proc gRPC server")
    serve.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (use 0.0.0.0:50051 in a pod)")
    serve.add_argument("--policy", action="append", help="policy file or directory (repeatable); "
                       "default: the embedded sample policies")
    serve.add_argument("--grace", type=float, default=10.0, help="seconds to drain in-flight streams on SIGTERM")
    serve.add_argument("--watch", type=float, default=2.0, help="seconds between policy change checks (0: off)")
    serve.add_argument("--admin", type=_host_port, help="HOST:PORT for /healthz, /readyz, /config, /quota")
    add_metrics_argument(serve)
    add_relay_argument(serve)
    add_trust_arguments(serve)
    add_telemetry_arguments(serve)
    serve.set_defaults(func=cmd_serve)


def _add_check_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from extproc.cli_mesh import add_check_parsers

    check = sub.add_parser("check", help="validate policy files (check [policy] FILE...) or Sidecar resources "
                           "(check sidecars FILE...); non-zero exit on any problem")
    check_sub = check.add_subparsers(dest="check_target", required=True)
    check_policy = check_sub.add_parser("policy", help="validate policy files (the default: extproc check FILE...)")
    check_policy.add_argument("files", nargs="+")
    check_policy.set_defaults(func=cmd_check)
    add_check_parsers(check_sub)  # check sidecars


def _add_render_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from extproc.cli_mesh import add_render_parsers

    render = sub.add_parser("render", help="render Envoy configuration")
    render_sub = render.add_subparsers(dest="target", required=True)
    envoy = render_sub.add_parser("envoy", help="standalone sidecar-shaped Envoy bootstrap")
    envoy.add_argument("--policy", action="append", help="policy files (for the provider list)")
    envoy.add_argument("--service", default="user-service", help="caller identity in the node metadata")
    envoy.add_argument("--namespace", default="demo")
    envoy.add_argument("--listen-port", type=int, default=10000)
    envoy.add_argument("--admin-port", type=int, default=9901)
    envoy.add_argument("--processor", type=_host_port, default=("127.0.0.1", 50051), help="HOST:PORT")
    envoy.add_argument("--relay", type=_host_port, default=("127.0.0.1", 50052),
                       help="HOST:PORT of the processor's fallback relay")
    envoy.add_argument("--upstream", type=_upstream, action="append", default=[],
                       help="AUTHORITY=HOST:PORT: send a provider host elsewhere (e.g. a local mock)")
    envoy.add_argument("-o", "--output")
    envoy.set_defaults(func=cmd_render)
    add_render_parsers(render_sub)  # render crds, render istio


def _add_mock_provider_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mock = sub.add_parser("mock-provider", help="OpenAI/Anthropic-compatible mock provider for tests and demos")
    mock.add_argument("--listen", type=_host_port, default=("127.0.0.1", 18080))
    mock.add_argument("--name", default="mock")
    mock.add_argument("--openai-key")
    mock.add_argument("--anthropic-key")
    mock.add_argument("--latency-ms", type=int, default=0)
    mock.add_argument("--fault-status", type=int)
    mock.set_defaults(func=cmd_mock_provider)


def _add_quota_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    quota = sub.add_parser("quota", help="quota tools")
    quota_sub = quota.add_subparsers(dest="quota_command", required=True)
    show = quota_sub.add_parser("show", help="live usage against every limit in the policy")
    show.add_argument("--service", help="only this service (name or namespace/name)")
    show.add_argument("--policy", action="append", help="policy files (Redis backend: read counters directly)")
    show.add_argument("--admin", type=_host_port, help="HOST:PORT of a processor's admin port (memory backend)")
    show.set_defaults(func=cmd_quota_show)


def _add_demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="run Envoy + processor + mock providers and show what policy does")
    demo.add_argument("--keep-logs", action="store_true", help="keep the component logs and print where")
    demo.set_defaults(func=cmd_demo)


def _without_output(argv: list[str]) -> list[str]:
    """The render arguments as recorded in the file header: where it was written is not part of it."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-o", "--output"):
            skip = True
        elif not arg.startswith(("-o", "--output=")):
            kept.append(arg)
    return kept


_CHECK_TARGETS = ("policy", "sidecars", "-h", "--help")


def _check_target(argv: list[str]) -> list[str]:
    """``extproc check FILE...`` (older than ``check sidecars``) is ``extproc check policy FILE...``."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] == "--log-level" else 1
    if i + 1 < len(argv) and argv[i] == "check" and argv[i + 1] not in _CHECK_TARGETS:
        return [*argv[:i + 1], "policy", *argv[i + 1:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = _check_target(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "render":
        args.argv = _without_output(argv[argv.index("envoy") + 1:] if "envoy" in argv else [])
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))
