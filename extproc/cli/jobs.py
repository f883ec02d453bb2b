"""The asynchronous-job commands of ``extproc``: ``worker`` and ``jobs ls|show|retry``.

Kept apart from ``cli.py`` so the job infrastructure owns its options; ``cli.py`` only hooks them in.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from extproc.jobs.config import JobNames
from extproc.jobs.model import Job, JobState, JobView

if TYPE_CHECKING:
    from extproc.jobs.store import JobStore

DEFAULT_NATS = "nats://127.0.0.1:4222"
NATS_ENV = "EXTPROC_NATS_URL"
PREFIX_ENV = "EXTPROC_JOBS_PREFIX"


def _envoy(value: str) -> tuple[str, str]:
    service, sep, url = value.partition("=")
    if not sep or not service or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected SERVICE=http://HOST:PORT (SERVICE: name or namespace/name), "
                                         f"got {value!r}")
    return service, url


def host_port(value: str) -> tuple[str, int]:
    from extproc.cli.options import host_port as parse

    return parse(value)


def envoy_router(envoys: Mapping[str, str], default: str | None) -> Callable[[Job], str]:
    """Which Envoy replays a job: ``namespace/service``, else ``service``, else the default.

    Calling through the submitting service's own sidecar keeps its routes; a shared default works
    too, since the processor takes the caller's identity from the signed ``x-ai-job`` token.
    """
    def url_for(job: Job) -> str:
        for key in (f"{job.namespace}/{job.service}", job.service):
            if key in envoys:
                return envoys[key]
        if default:
            return default
        raise KeyError(job.service)

    return url_for


def add_jobs_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--nats", default=os.environ.get(NATS_ENV, DEFAULT_NATS),
                        help=f"NATS server URL (default: ${NATS_ENV} or {DEFAULT_NATS})")
    common.add_argument("--prefix", default=os.environ.get(PREFIX_ENV, ""),
                        help="prefix of every stream, bucket and subject name (isolated installs, tests)")

    worker = subparsers.add_parser("worker", parents=[common], help="execute asynchronous AI jobs until SIGTERM")
    worker.add_argument("--envoy", type=_envoy, action="append", default=[], metavar="SERVICE=URL",
                        help="Envoy to replay a service's jobs through (repeatable; SERVICE: name or ns/name)")
    worker.add_argument("--envoy-default", metavar="URL", help="Envoy for services without their own --envoy")
    worker.add_argument("--concurrency", type=int, default=16, help="jobs executed at once by this worker")
    worker.add_argument("--concurrency-per-service", type=int, default=4, help="of which at most this many per service")
    worker.add_argument("--max-attempts", type=int, default=5, help="attempts before a job is dead-lettered")
    worker.add_argument("--backoff-base", type=float, default=1.0, help="seconds before the first retry (doubling)")
    worker.add_argument("--backoff-max", type=float, default=60.0, help="longest wait between retries")
    worker.add_argument("--timeout", type=float, default=300.0, help="seconds one call may take")
    worker.add_argument("--ack-wait", type=float, help="seconds before a silent worker's job is redelivered "
                        "(default: --timeout + 30; running calls send heartbeats)")
    worker.add_argument("--grace", type=float, default=30.0, help="seconds to finish in-flight jobs on SIGTERM")
    worker.add_argument("--metrics", type=host_port, help="HOST:PORT to serve Prometheus /metrics on")
    worker.set_defaults(func=cmd_worker)

    jobs = subparsers.add_parser("jobs", help="inspect and retry asynchronous AI jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    ls = jobs_sub.add_parser("ls", parents=[common], help="list jobs, newest first")
    ls.add_argument("--service", help="only this service (name or namespace/name)")
    ls.add_argument("--namespace")
    ls.add_argument("--state", choices=[s.value for s in JobState])
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=cmd_jobs_ls)
    show = jobs_sub.add_parser("show", parents=[common], help="one job: state, owner, attempts, error, result")
    show.add_argument("job_id")
    show.set_defaults(func=cmd_jobs_show)
    retry = jobs_sub.add_parser("retry", parents=[common], help="send a dead job back to the queue")
    retry.add_argument("job_id")
    retry.set_defaults(func=cmd_jobs_retry)


# --- worker -------------------------------------------------------------------------------------------

def cmd_worker(args: argparse.Namespace) -> int:
    if not args.envoy and not args.envoy_default:
        print("extproc: the worker needs --envoy SERVICE=URL or --envoy-default URL", file=sys.stderr)
        return 2
    import asyncio

    return asyncio.run(_run_worker(args))


async def _run_worker(args: argparse.Namespace) -> int:
    import asyncio

    from prometheus_client import CollectorRegistry, start_http_server

    from extproc.base.tokens import Signer
    from extproc.jobs.executor import HttpExecutor
    from extproc.jobs.metrics import JobMetrics
    from extproc.jobs.store import JobStore
    from extproc.jobs.worker import Worker

    registry = CollectorRegistry()
    store = JobStore(JobNames.prefixed(args.prefix), metrics=JobMetrics(registry))
    try:
        await store.connect(args.nats, update=False)  # the processor owns the queue limits
    except Exception as exc:
        print(f"extproc: cannot use NATS JetStream at {args.nats}: {exc}", file=sys.stderr)
        return 1
    executor = HttpExecutor(envoy_router(dict(args.envoy), args.envoy_default), Signer.from_environment(),
                            args.timeout)
    worker = Worker(store, executor, args.concurrency_per_service, args.max_attempts,
                    (args.backoff_base, args.backoff_max), concurrency=args.concurrency,
                    ack_wait_s=args.ack_wait or args.timeout + 30, registry=registry)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    if args.metrics:
        start_http_server(args.metrics[1], addr=args.metrics[0], registry=registry)
    try:
        await worker.run(grace_s=args.grace)
    finally:
        await executor.close()
        await store.close()
    return 0


# --- jobs ls|show|retry -----------------------------------------------------------------------------------

def _with_store(args: argparse.Namespace, action: Callable[[JobStore], Awaitable[int]]) -> int:
    import asyncio

    from extproc.jobs.store import JobStore

    async def run() -> int:
        store = JobStore(JobNames.prefixed(args.prefix))
        try:
            await store.connect(args.nats, create=False, update=False, max_reconnect_attempts=0)
        except Exception as exc:
            print(f"extproc: cannot use NATS JetStream at {args.nats}: {exc}", file=sys.stderr)
            return 1
        try:
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch)) if epoch else "-"


def _owner(view: JobView) -> str:
    return f"{view.namespace}/{view.service}" if view.namespace else view.service


def cmd_jobs_ls(args: argparse.Namespace) -> int:
    namespace, service = args.namespace, args.service
    if service and "/" in service:
        namespace, _, service = service.rpartition("/")

    async def action(store: JobStore) -> int:
        views = await store.list(service, namespace, args.state, args.limit)
        print(f"{'JOB ID':<32}  {'STATE':<7}  {'SERVICE':<32}  {'SUBMITTED':<20}  {'ATTEMPTS':>8}  LAST ERROR")
        for view in views:
            error = " ".join(view.last_error.split())
            print(f"{view.job_id:<32}  {view.state.value:<7}  {_owner(view):<32}  {_when(view.submitted_at):<20}  "
                  f"{view.attempts:>8}  {error[:80]}")
        print(f"{len(views)} job(s)")
        return 0

    return _with_store(args, action)


def cmd_jobs_show(args: argparse.Namespace) -> int:
    async def action(store: JobStore) -> int:
        view = await store.get(args.job_id)
        if view is None:
            print(f"extproc: no job {args.job_id} (unknown or expired)", file=sys.stderr)
            return 1
        lines = [("job", view.job_id), ("state", view.state.value), ("owner", _owner(view)),
                 ("submitted", _when(view.submitted_at)), ("updated", _when(view.updated_at)),
                 ("attempts", str(view.attempts)), ("last error", view.last_error or "-")]
        result = view.result
        if result is not None:
            lines += [("result", f"HTTP {result.status} {result.content_type or '-'}, {len(result.body)} bytes, "
                                 f"completed {_when(result.completed_at)}"),
                      ("preview", result.body[:400].decode(errors="replace") or "-")]
        for label, value in lines:
            print(f"{label + ':':<12}{value}")
        return 0

    return _with_store(args, action)


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    from extproc.jobs.errors import JobError

    async def action(store: JobStore) -> int:
        try:
            submitted = await store.retry(args.job_id)
        except JobError as exc:
            print(f"extproc: {exc}", file=sys.stderr)
            return 1
        print(f"resubmitted {submitted.job_id}; its result will be published on {submitted.subject}")
        return 0

    return _with_store(args, action)
