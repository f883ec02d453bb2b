"""Running the processor: gRPC server, health service, policy reloads and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.cache.store import ResponseCache
from extproc.core.admission import sweep_forever
from extproc.core.bulkhead import LocalBulkhead, SharedBulkhead
from extproc.core.credentials import CredentialStore
from extproc.core.decision import Decider
from extproc.core.inflight import InFlightStore, MemoryInFlight, RedisInFlight
from extproc.core.runtime import Runtime
from extproc.events.sinks import EventSink, build_event_sinks
from extproc.policy.store import PolicyStore
from extproc.quota.engine import QuotaEngine
from extproc.server.admin import AdminServer, MetricsServer
from extproc.server.credentials import CredentialProcessor
from extproc.server.processor import AsyncExternalProcessor
from extproc.server.relay import RelayServer
from extproc.telemetry.metrics import Metrics
from extproc.telemetry.telemetry import Telemetry, TelemetryOptions, build_telemetry

if TYPE_CHECKING:
    from extproc.jobs.store import JobStore
    from extproc.policy.kube_source import KubeOptions, KubePolicySource
    from extproc.policy.model import MeshSettings

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
_MAX_MESSAGE = 80 * 1024 * 1024  # above the largest body policy allows (64 MiB) plus framing
# Sidecars ping the processor every second (filter.PROCESSOR_KEEPALIVE) to notice a frozen replica.
# gRPC's default server policy counts pings on an idle connection as abuse and, after two, closes it
# with GOAWAY(too_many_pings): a call racing that GOAWAY fails as "processor could not be reached".
# Accept pings at up to twice the sidecar's rate, with or without calls open; a peer pinging faster
# than that still gets gRPC's default strikes (a ping flood is cut off).
PING_POLICY: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    listen: str
    policy_paths: tuple[str | Path, ...]
    grace_seconds: float = 10.0
    watch_seconds: float = 2.0  # 0 disables polling; SIGHUP always reloads
    kubernetes: KubeOptions | None = None  # also take AIPolicy/AIProvider objects from the Kubernetes API
    kube_api: str | None = None  # explicit API server URL; default: in-cluster, else ~/.kube/config
    admin: tuple[str, int] | None = None  # HOST, PORT of the admin HTTP endpoint (off when None)
    metrics: tuple[str, int] | None = None  # HOST, PORT serving GET /metrics only (off when None)
    relay: tuple[str, int] | None = None  # HOST, PORT of the fallback relay Envoy retries failed attempts to
    peer_identity: bool = False  # bind callers to the mTLS identity in x-forwarded-client-cert (the mesh)
    credentials: tuple[str, int] | None = None  # HOST, PORT of the credential port (the egress gateway's)
    telemetry: TelemetryOptions = field(default_factory=TelemetryOptions)  # access log, traces, redaction
    events_nats: str | None = None  # NATS URL: publish one usage event per call to JetStream
    events_file: str | None = None  # append one usage event per call to this JSON-lines file
    events_prefix: str = "ai.usage"  # subjects: <prefix>.<namespace>.<service>
    events_stream: str = "AI_USAGE"
    jobs_nats: str | None = None  # NATS URL: accept `Prefer: respond-async` calls as jobs
    jobs_prefix: str = ""  # isolates the job streams and buckets (JobNames.prefixed)
    jobs_workers: tuple[str, ...] = ("ai-extproc-worker",)  # identities allowed to replay a job as its submitter


async def serve(options: ServeOptions, ready: asyncio.Event | None = None) -> None:
    parts = await _start(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, parts.store.reload)
    if options.watch_seconds > 0:
        parts.watcher = asyncio.create_task(parts.store.watch(options.watch_seconds), name="policy watcher")
        parts.watcher.add_done_callback(_report_unexpected_end)
    parts.admin.ready = True
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await _shut_down(parts, options.grace_seconds)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        log.info("stopped")


@dataclass(slots=True)
class _Serving:
    """What ``serve`` started: ``_shut_down`` stops it."""

    source: KubePolicySource | None
    store: PolicyStore
    quota: QuotaEngine
    cache: ResponseCache
    admin: AdminServer
    metrics_server: MetricsServer
    events: list[EventSink]
    telemetry: Telemetry
    jobs: JobStore | None
    jobs_task: asyncio.Task[None] | None
    decider: Decider
    sweeper: asyncio.Task[None]
    credential_server: grpc.aio.Server | None
    relay: RelayServer
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    watcher: asyncio.Task[None] | None = None


async def _start(options: ServeOptions) -> _Serving:
    """Everything the processor serves with, started in order; the decision port is opened last."""
    source, store = await _policy_store(options)
    # The quota store is chosen at startup; a policy reload changes limits, not where counters live.
    quota = QuotaEngine(store.current().mesh.quota)
    cache = ResponseCache(store.current().mesh.cache)
    metrics = Metrics()
    admin = AdminServer(store.current, quota, cache, metrics)
    if options.admin is not None:
        await admin.start(*options.admin)
    metrics_server = MetricsServer(metrics)
    if options.metrics is not None:
        await metrics_server.start(*options.metrics)
    events = build_event_sinks(options.events_nats, options.events_file, metrics.registry,
                               prefix=options.events_prefix, stream=options.events_stream)
    for sink in events:
        await sink.start()  # returns at once: a NATS outage never holds up serving
    telemetry = build_telemetry(options.telemetry, extra_sinks=events)
    jobs, jobs_task = await _job_store(options, metrics)
    decider = _decider(options, store, quota, cache, metrics, telemetry, jobs)
    runtime = decider.runtime
    # The backstop for calls whose end is never seen (caller gone, response lost): their slots and
    # reservations are given back after their deadline.
    sweeper = asyncio.create_task(sweep_forever(runtime.inflight, quota=quota, bulkhead=runtime.bulkhead,
                                                policy=store.current, on_swept=metrics.calls_swept.inc),
                                  name="in-flight sweeper")
    sweeper.add_done_callback(_report_unexpected_end)
    credential_server = await _credential_server(options.credentials, decider.runtime)
    relay = RelayServer(decider.runtime)
    if options.relay is not None:
        await relay.start(*options.relay)
    server, health_servicer = await _decision_server(options.listen, decider)
    policy = store.current()
    log.info("extproc listening on %s (policy %s: %d services, %d providers)", options.listen, policy.version,
             len(policy.services), len(policy.providers))
    return _Serving(source, store, quota, cache, admin, metrics_server, events, telemetry, jobs, jobs_task,
                    decider, sweeper, credential_server, relay, server, health_servicer)


async def _policy_store(options: ServeOptions) -> tuple[KubePolicySource | None, PolicyStore]:
    """The policy from the files and, with ``options.kubernetes``, from AIPolicy and AIProvider objects."""
    source = None
    if options.kubernetes is not None:
        from extproc.policy.kube_source import KubePolicySource, api_client

        source = KubePolicySource(api_client(options.kube_api), options.kubernetes)
        source.start()
        # Not listening (so not ready) until both kinds are listed: serving an empty policy would deny all.
        log.info("waiting for the first list of AIPolicy and AIProvider objects")
        await asyncio.to_thread(source.wait_synced)
    store = PolicyStore(options.policy_paths, source)
    if source is not None:
        source.attach(store.reload)
    return source, store


def _decider(options: ServeOptions, store: PolicyStore, quota: QuotaEngine, cache: ResponseCache,
             metrics: Metrics, telemetry: Telemetry, jobs: JobStore | None) -> Decider:
    runtime = Runtime(store.current, CredentialStore(), quota, cache, metrics, telemetry=telemetry, jobs=jobs,
                      job_workers=frozenset(options.jobs_workers), bulkhead=_bulkhead(store.current().mesh),
                      inflight=_inflight(store.current().mesh), peer_identity=options.peer_identity)
    if options.peer_identity:
        log.info("callers are bound to the mTLS identity their connection carries (x-forwarded-client-cert)")
    else:
        log.warning("standalone mode: callers are identified by their sidecar's node metadata, not verified "
                    "against an mTLS peer (use --peer-identity xfcc in a mesh)")
    return Decider(runtime)


async def _credential_server(address: tuple[str, int] | None, runtime: Runtime) -> grpc.aio.Server | None:
    """The credential port, started; None when not asked for."""
    if address is None:
        return None
    # Its own port, so that an AuthorizationPolicy can open it to the egress gateway alone.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *PING_POLICY])
    pb_grpc.add_ExternalProcessorServicer_to_server(CredentialProcessor(runtime), server)
    if server.add_insecure_port(f"{address[0]}:{address[1]}") == 0:
        raise OSError(f"cannot listen on {address[0]}:{address[1]}")
    await server.start()
    return server


async def _decision_server(listen: str, decider: Decider) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The ext_proc service sidecars call, with gRPC health, listening and reported SERVING."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),  # fail loudly if the port is taken instead of sharing it
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            *PING_POLICY,
        ]
    )
    pb_grpc.add_ExternalProcessorServicer_to_server(AsyncExternalProcessor(decider), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer


async def _shut_down(parts: _Serving, grace_seconds: float) -> None:
    log.info("shutting down: refusing new streams, draining in-flight ones for up to %.1fs", grace_seconds)
    # Health first, so load balancers and probes stop sending new work before the port closes.
    parts.admin.ready = False
    await parts.health.enter_graceful_shutdown()
    await _stop_task(parts.watcher)  # a watcher that died must not cut the drain short
    await parts.server.stop(grace_seconds)
    if parts.credential_server is not None:
        await parts.credential_server.stop(grace_seconds)
    await _stop_task(parts.sweeper)
    await parts.decider.runtime.inflight.aclose()
    await parts.quota.close()
    await parts.decider.runtime.bulkhead.close()
    await parts.cache.close()
    await parts.admin.stop()
    await parts.metrics_server.stop()
    await parts.relay.stop()
    for sink in parts.events:
        await sink.close(timeout=min(5.0, grace_seconds))
    await _stop_task(parts.jobs_task)
    if parts.jobs is not None:
        await parts.jobs.close()
    await asyncio.to_thread(parts.telemetry.close)  # flushes trace batches: may block for an export timeout
    if parts.source is not None:
        parts.source.stop()


def _inflight(mesh: MeshSettings) -> InFlightStore:
    """Open calls and token nonces live where quota counters do: shared in Redis, or in this replica."""
    settings = mesh.quota
    if settings.backend == "redis":
        return RedisInFlight(settings.redis_url, settings.key_prefix, settings.timeout_ms / 1000)
    return MemoryInFlight()


def _report_unexpected_end(task: asyncio.Task[None]) -> None:
    """A task meant to run until shutdown ended early: say so at once, rather than leave it silently gone."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s died; it is not restarted", task.get_name(), exc_info=task.exception())


async def _stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait for it. Whatever it ended with is logged, never raised: shutdown
    (the drain) must go on. Our own cancellation still propagates (``asyncio.wait`` does not swallow it)."""
    if task is None:
        return
    if task.done():  # ended before shutdown: reported then (or finished its job, as the job store's connect)
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit
        return
    task.cancel()
    await asyncio.wait({task}, timeout=5.0)
    if not task.done():
        log.warning("%s did not stop within 5s; shutting down without it", task.get_name())
    elif not task.cancelled() and task.exception() is not None:
        log.error("%s failed while stopping", task.get_name(), exc_info=task.exception())


def _bulkhead(mesh: MeshSettings) -> LocalBulkhead | SharedBulkhead:
    """Bulkhead slots live where quota counters do: shared in Redis, or in this replica."""
    if mesh.quota.backend == "redis":
        settings = mesh.quota
        return SharedBulkhead(settings.redis_url, settings.key_prefix, settings.timeout_ms / 1000)
    return LocalBulkhead()


async def _job_store(options: ServeOptions, metrics: Metrics) -> tuple[JobStore | None, asyncio.Task[None] | None]:
    """The job store for asynchronous calls, connecting in the background: a NATS outage at startup
    makes submissions answer 503 until it is reachable, never stops the processor from serving."""
    if options.jobs_nats is None:
        return None, None
    from extproc.jobs.config import JobNames
    from extproc.jobs.metrics import JobMetrics
    from extproc.jobs.store import JobStore

    jobs = JobStore(JobNames.prefixed(options.jobs_prefix), metrics=JobMetrics(metrics.registry))
    url = options.jobs_nats

    async def connect() -> None:
        delay = 1.0
        while True:
            try:
                await jobs.connect(url)
                log.info("asynchronous calls on: job store at %s", url)
                return
            except Exception as exc:
                log.warning("job store at %s not reachable (%s); retrying in %.0fs", url, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    task = asyncio.create_task(connect())
    await asyncio.wait({task}, timeout=3.0)  # usually connected before the first call
    return jobs, task


def run(options: ServeOptions) -> None:
    asyncio.run(serve(options))
