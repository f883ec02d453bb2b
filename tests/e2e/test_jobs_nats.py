"""Asynchronous jobs on a real NATS JetStream (127.0.0.1:4222): store, worker, executor and CLI.

A tiny aiohttp server on 127.0.0.1 stands in for the service's Envoy: it records what the worker
replays (verifying the x-ai-job token as the processor would) and answers as scripted per test.
Every test gets its own name prefix (streams, buckets, subjects), and everything created under this
session's prefix is deleted at the end, so parallel or repeated runs never see each other's jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import nats
import nats.js.errors
import orjson
import pytest
from aiohttp import web
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry

from devtools.launch import Managed, free_port
from extproc.base.tokens import Signer
from extproc.base.wire import JOB_HEADER
from extproc.cli import main as cli_main
from extproc.jobs import (
    HttpExecutor,
    Job,
    JobLimits,
    JobMetrics,
    JobNames,
    JobResult,
    JobState,
    JobStore,
    JobTooLarge,
    NotRetriable,
    QueueFull,
    UnknownJob,
    Worker,
)
from extproc.jobs.model import new_job_id
from tests.conftest import jetstream_answers, missing

NATS_URL = "nats://127.0.0.1:4222"
SESSION = f"jt{os.getpid()}{secrets.token_hex(3)}"
SIGNING_KEY = "jobs-test-signing-key-0123456789"
SIGNER = Signer(SIGNING_KEY.encode())
HANG = 20.0  # a deadline for "this never happened", far above any normal duration
_numbers = itertools.count()


@pytest.fixture(scope="module")
def jobs_nats() -> Iterator[str]:
    if not jetstream_answers(4222):
        missing("no NATS JetStream on 127.0.0.1:4222")
    yield NATS_URL
    asyncio.run(_sweep())


async def _sweep() -> None:
    """Delete whatever this session created, even when a test failed before its own cleanup."""
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name and info.config.name.removeprefix("KV_").startswith(SESSION):
                await js.delete_stream(info.config.name)
    finally:
        await nc.close()


@pytest.fixture
def names(jobs_nats: str) -> JobNames:
    return JobNames.prefixed(f"{SESSION}n{next(_numbers)}")


def prefix_of(names: JobNames) -> str:
    return names.stream.removesuffix("_AI_JOBS")


# --- helpers -------------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def job_store(names: JobNames, limits: JobLimits | None = None,
                    metrics: JobMetrics | None = None) -> AsyncIterator[JobStore]:
    store = await JobStore(names, limits, metrics).connect(NATS_URL)
    try:
        yield store
    finally:
        await store.destroy()
        await store.close()


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    task = asyncio.create_task(worker.run(grace_s=5))
    await asyncio.wait_for(worker.ready.wait(), HANG)
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, HANG)


class Events:
    """Core-NATS subscriber on one subject: what a service listening for its results would see."""

    def __init__(self) -> None:
        self.messages: list[Msg] = []
        self._nc: nats.NATS | None = None

    async def subscribe(self, subject: str) -> Events:
        self._nc = await nats.connect(NATS_URL)

        async def collect(msg: Msg) -> None:
            self.messages.append(msg)

        await self._nc.subscribe(subject, cb=collect)
        await self._nc.flush()
        return self

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    token: dict[str, object] | None
    at: float


Respond = Callable[[int, web.Request], Awaitable[web.StreamResponse]]


class StandIn:
    """Stands in for a service's Envoy: records each replayed call and answers with ``respond(n, request)``."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.requests: list[Seen] = []
        self.in_flight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.release = asyncio.Event()  # ends deliberately slow answers at shutdown
        self.url = ""

    async def __aenter__(self) -> StandIn:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        token = SIGNER.verify(request.headers.get(JOB_HEADER, ""))
        self.requests.append(Seen(request.method, request.path_qs, {k.lower(): v for k, v in request.headers.items()},
                                  body, token, time.monotonic()))
        service = str((token or {}).get("svc", "?"))
        for key in (service, "*"):
            self.in_flight[key] += 1
            self.peak[key] = max(self.peak[key], self.in_flight[key])
        try:
            return await self.respond(len(self.requests), request)
        finally:
            for key in (service, "*"):
                self.in_flight[key] -= 1


def ok(body: bytes = b'{"id":"chatcmpl-1","object":"chat.completion"}') -> web.Response:
    return web.Response(status=200, body=body, content_type="application/json")


def openai_error(status: int, message: str) -> web.Response:
    return web.Response(status=status, content_type="application/json",
                        body=b'{"error":{"message":"%s","type":"server_error","param":null,"code":null}}'
                        % message.encode())


def a_job(service: str = "user-service", namespace: str = "demo", body: bytes = b'{"model":"chat"}',
          reservation: str | None = None) -> Job:
    return Job.new(service=service, namespace=namespace, api="openai", path="/v1/chat/completions",
                   headers=[(":authority", "api.openai.com"), (":method", "POST"), ("content-type", "application/json"),
                            ("authorization", "Bearer sk-caller"), ("x-api-key", "secret"), ("connection", "close"),
                            ("prefer", "respond-async"), ("x-custom", "kept"), ("content-length", str(len(body)))],
                   body=body, reservation=reservation, policy_version="v7")


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = HANG) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def state_is(store: JobStore, job_id: str, state: JobState) -> bool:
    view = await store.get(job_id)
    return view is not None and view.state == state


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


# --- tests -----------------------------------------------------------------------------------------------

def test_a_job_is_replayed_through_envoy_and_its_result_stored_and_announced_once(names: JobNames) -> None:
    sse = [b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n',
           b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\n', b"data: [DONE]\n\n"]

    async def respond(n: int, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for chunk in sse:  # streamed in pieces: the job result must hold the whole stream
            await response.write(chunk)
            await asyncio.sleep(0.02)
        await response.write_eof()
        return response

    async def scenario() -> None:
        registry = CollectorRegistry()
        async with job_store(names) as store, StandIn(respond) as envoy:
            job = a_job(reservation="resv-1")
            events = await Events().subscribe(names.result_subject("demo", "user-service"))
            submitted = await store.submit(job)
            assert submitted.job_id == job.job_id
            assert submitted.subject == f"{prefix_of(names)}.ai.jobs.result.demo.user-service"
            assert submitted.location == f"/v1/ai-jobs/{job.job_id}"
            pending = await store.get(job.job_id)
            assert pending is not None and pending.state == JobState.PENDING and pending.result is None
            assert pending.owned_by("user-service", "demo") and not pending.owned_by("order-service", "demo")

            executor = HttpExecutor(lambda _: envoy.url, SIGNER, timeout_s=5)
            async with running(Worker(store, executor, ack_wait_s=5, poll_s=0.1, registry=registry)):
                await until(lambda: state_is(store, job.job_id, JobState.DONE), "the job to finish")
                await asyncio.sleep(0.3)  # room for a (wrong) second event
            await executor.close()

            view = await store.get(job.job_id)
            assert view is not None and view.result is not None
            assert (view.result.status, view.result.content_type, view.result.attempts) == (200, "text/event-stream", 1)
            assert view.result.body == b"".join(sse)

            # What reached "Envoy": the caller's request minus credentials, hop-by-hop headers and Prefer,
            # plus a token the processor can verify, naming the job, its owner and its quota reservation.
            [seen] = envoy.requests
            assert (seen.method, seen.path, seen.body) == ("POST", "/v1/chat/completions", job.body)
            assert seen.headers["host"] == "api.openai.com" and seen.headers["x-custom"] == "kept"
            assert not {"authorization", "x-api-key", "prefer"} & set(seen.headers)
            assert seen.token == {"job": job.job_id, "svc": "user-service", "ns": "demo", "r": "resv-1"}

            [event] = events.messages
            assert event.headers is not None and event.headers["Ai-Job-Id"] == job.job_id
            announced = orjson.loads(event.data)  # the readable result event, body as the caller gets it
            assert announced["job_id"] == job.job_id and announced["status"] == 200
            assert announced["body"].encode() == b"".join(sse)

            # A late duplicate completion changes nothing and announces nothing.
            assert not await store.complete(job.job_id, JobResult(job.job_id, 500, "text/plain", b"late", time.time()))
            await asyncio.sleep(0.2)
            assert len(events.messages) == 1
            assert (await store.get(job.job_id)).result.body == b"".join(sse)  # type: ignore[union-attr]
            await events.close()

            [listed] = await store.list(service="user-service", namespace="demo")
            assert (listed.job_id, listed.state) == (job.job_id, JobState.DONE)
            labels = {"service": "user-service", "namespace": "demo"}
            assert sample(registry, "ai_extproc_jobs_total", outcome="completed", **labels) == 1
            assert sample(registry, "ai_extproc_job_attempts_total", **labels) == 1
            assert sample(registry, "ai_extproc_job_queue_seconds_count", **labels) == 1
            assert sample(registry, "ai_extproc_job_run_seconds_count", **labels) == 1

    run(scenario())


def test_unknown_expired_and_malformed_ids_are_none(names: JobNames) -> None:
    async def scenario() -> None:
        async with job_store(names) as store:
            for job_id in (new_job_id(), "", "../etc", "a" * 32 + ">", "*"):
                assert await store.get(job_id) is None
            with pytest.raises(UnknownJob):
                await store.retry(new_job_id())
            assert await store.list() == []

    run(scenario())
    # The read-only CLI binds to what exists and never creates streams (a mistyped --prefix says so).
    absent = f"{SESSION}absent"
    assert cli_main(["jobs", "ls", "--nats", NATS_URL, "--prefix", absent]) == 1
    assert not asyncio.run(_streams_named(absent))


async def _streams_named(prefix: str) -> list[str]:
    nc = await nats.connect(NATS_URL)
    try:
        return [i.config.name or "" for i in await nc.jetstream().streams_info()
                if (i.config.name or "").removeprefix("KV_").startswith(prefix)]
    finally:
        await nc.close()


def test_the_first_completion_wins(names: JobNames) -> None:
    async def scenario() -> None:
        async with job_store(names) as store:
            job = a_job()
            await store.submit(job)
            events = await Events().subscribe(names.result_subject("demo", "user-service"))
            first = JobResult(job.job_id, 200, "application/json", b'{"n":1}', time.time(), 1)
            assert await store.complete(job.job_id, first)
            assert not await store.complete(job.job_id, JobResult(job.job_id, 200, "application/json", b'{"n":2}',
                                                                  time.time(), 2))
            await asyncio.sleep(0.2)
            assert len(events.messages) == 1
            await events.close()
            view = await store.get(job.job_id)
            assert view is not None and view.state == JobState.DONE and view.result == first

    run(scenario())


def test_payload_and_queue_depth_limits_are_exact(names: JobNames, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with job_store(names, JobLimits(max_body_bytes=1024, max_queued_per_service=2)) as store:
            with pytest.raises(JobTooLarge) as too_large:
                await store.submit(a_job(body=b"x" * 1025))
            assert (too_large.value.limit, too_large.value.size) == (1024, 1025)
            assert too_large.value.api_error().kind.status == 413
            await store.submit(a_job(body=b"x" * 1024))
            with pytest.raises(JobTooLarge) as tighter:  # a service's own, smaller limit
                await store.submit(a_job(body=b"x" * 101), max_body_bytes=100)
            assert tighter.value.limit == 100

            await store.submit(a_job())
            with pytest.raises(QueueFull) as full:
                await store.submit(a_job())
            assert (full.value.service, full.value.depth, full.value.limit) == ("user-service", 2, 2)
            assert full.value.api_error().kind.status == 429
            assert await store.queue_depth("demo", "user-service") == 2

            await store.submit(a_job(service="order-service"))  # other services have their own queue
            with pytest.raises(QueueFull) as own_limit:
                await store.submit(a_job(service="order-service"), max_queued=1)
            assert (own_limit.value.depth, own_limit.value.limit) == (1, 1)

            listed = await store.list()
            assert [v.service for v in listed] == ["order-service", "user-service", "user-service"]  # newest first
            assert len(await store.list(service="user-service", namespace="demo", state="pending")) == 2
            assert await store.list(namespace="elsewhere") == [] and await store.list(state=JobState.DONE) == []
            assert [v.job_id for v in await store.list(limit=1)] == [listed[0].job_id]

            # Submissions racing past the depth check are stopped by the stream itself, and leave no trace.
            async def zero(namespace: str, service: str) -> int:
                return 0

            monkeypatch.setattr(store, "queue_depth", zero)
            racer = a_job()
            with pytest.raises(QueueFull) as raced:
                await store.submit(racer)
            assert raced.value.limit == 2
            assert await store.get(racer.job_id) is None

    run(scenario())


def test_retriable_failures_back_off_then_dead_letter_then_retry(names: JobNames,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    async def respond(n: int, request: web.Request) -> web.StreamResponse:
        return openai_error(503, f"overloaded {n}") if n <= 3 else ok(b'{"n":%d}' % n)

    async def scenario() -> None:
        registry = CollectorRegistry()
        async with job_store(names) as store, StandIn(respond) as envoy:
            job = a_job()
            await store.submit(job)
            executor = HttpExecutor(lambda _: envoy.url, SIGNER, timeout_s=5)
            worker = Worker(store, executor, max_attempts=3, backoff=(0.4, 5.0), ack_wait_s=5, poll_s=0.1,
                            registry=registry)
            async with running(worker):
                await until(lambda: state_is(store, job.job_id, JobState.DEAD), "the job to be dead-lettered")
                dead = await store.get(job.job_id)
                assert dead is not None and dead.attempts == 3 and "503" in dead.last_error
                assert "overloaded 3" in dead.last_error  # the last error, not the first
                failure = dead.failure()
                assert failure is not None and failure.kind.status == 503 and failure.code == "job_failed"
                # Backoff: jittered within [d/2, d] of 0.4s, then of 0.8s.
                gaps = [b.at - a.at for a, b in itertools.pairwise(envoy.requests)]
                assert len(gaps) == 2 and gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps

                nc = await nats.connect(NATS_URL)
                dead_subject = names.dead_subject("demo", "user-service")
                letter = await nc.jetstream().get_last_msg(names.dead_stream, dead_subject)
                assert Job.decode(letter.data or b"").job_id == job.job_id
                assert letter.headers is not None and "overloaded 3" in letter.headers["Ai-Job-Error"]

                # The operator's view and retry, through the CLI (in a thread: it runs its own event loop).
                cli = ["--nats", NATS_URL, "--prefix", prefix_of(names)]
                assert await asyncio.to_thread(cli_main, ["jobs", "show", job.job_id, *cli]) == 0
                assert await asyncio.to_thread(cli_main, ["jobs", "ls", "--state", "dead", *cli]) == 0
                assert await asyncio.to_thread(cli_main, ["jobs", "retry", job.job_id, *cli]) == 0
                await until(lambda: state_is(store, job.job_id, JobState.DONE), "the retried job to finish")
                with pytest.raises(nats.js.errors.NotFoundError):  # no longer among the dead
                    await nc.jetstream().get_last_msg(names.dead_stream, dead_subject)
                await nc.close()
            await executor.close()

            done = await store.get(job.job_id)
            assert done is not None and done.result is not None
            assert (done.result.status, done.result.body, done.result.attempts) == (200, b'{"n":4}', 4)
            with pytest.raises(NotRetriable):
                await store.retry(job.job_id)
            labels = {"service": "user-service", "namespace": "demo"}
            assert sample(registry, "ai_extproc_jobs_total", outcome="retried", **labels) == 2
            assert sample(registry, "ai_extproc_jobs_total", outcome="dead_lettered", **labels) == 1
            assert sample(registry, "ai_extproc_jobs_total", outcome="completed", **labels) == 1
            assert sample(registry, "ai_extproc_job_attempts_total", **labels) == 4

    run(scenario())
    out = capsys.readouterr().out
    assert "state:      dead" in out and "overloaded 3" in out and "1 job(s)" in out and "resubmitted" in out


def test_a_dead_jobs_poll_answers_in_the_api_format_of_the_submitted_call(names: JobNames) -> None:
    """The poll is a bare GET: nothing in it says Anthropic. The job's status record does."""
    from extproc.base.apis import Api
    from extproc.core.async_calls import JobLookup
    from extproc.core.identity import Caller

    owner = Caller("user-service", "demo", None, "node")

    async def poll(store: JobStore, job_id: str, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
        reply = await JobLookup(store, f"/v1/ai-jobs/{job_id}", headers, owner).reply()
        return reply.status, orjson.loads(reply.body)

    async def scenario() -> None:
        async with job_store(names) as store:
            anthropic_job = Job.new(service="user-service", namespace="demo", api="anthropic", path="/v1/messages",
                                    headers=[("anthropic-version", "2023-06-01")], body=b'{"model":"m"}')
            openai_job = a_job()
            for job in (anthropic_job, openai_job):
                await store.submit(job)
                assert await store.start_attempt(job) is not None
                assert await store.dead_letter(job, "HTTP 529: overloaded")
            dead = await store.get(anthropic_job.job_id)
            assert dead is not None and dead.state == JobState.DEAD and dead.api is Api.ANTHROPIC
            [listed] = [v for v in await store.list(state="dead") if v.job_id == anthropic_job.job_id]
            assert listed.api is Api.ANTHROPIC

            status, body = await poll(store, anthropic_job.job_id, {})
            assert status == 503 and body["type"] == "error" and set(body) == {"type", "error"}
            error = body["error"]
            assert isinstance(error, dict) and error["type"] == "overloaded_error"
            assert "failed after 1 attempt(s): HTTP 529: overloaded" in error["message"]
            # And the other way round: an OpenAI job stays OpenAI-shaped, whatever the poll looks like.
            status, body = await poll(store, openai_job.job_id, {"anthropic-version": "2023-06-01"})
            assert status == 503 and body["error"]["code"] == "job_failed"  # type: ignore[index]

    run(scenario())


def test_client_errors_are_final_and_a_missing_envoy_is_dead_at_once(names: JobNames) -> None:
    async def respond(n: int, request: web.Request) -> web.StreamResponse:
        return web.Response(status=400, content_type="application/json", body=b'{"error":{"message":"bad model"}}')

    async def scenario() -> None:
        async with job_store(names) as store, StandIn(respond) as envoy:
            routed, unrouted = a_job(), a_job(service="nowhere")
            await store.submit(routed)
            await store.submit(unrouted)
            envoys = {"user-service": envoy.url}
            executor = HttpExecutor(lambda job: envoys[job.service], SIGNER, timeout_s=5)
            async with running(Worker(store, executor, ack_wait_s=5, poll_s=0.1)):
                await until(lambda: state_is(store, routed.job_id, JobState.DONE), "the 400 to be stored")
                await until(lambda: state_is(store, unrouted.job_id, JobState.DEAD), "the unroutable job to die")
            await executor.close()
            view = await store.get(routed.job_id)
            assert view is not None and view.result is not None
            assert (view.result.status, view.result.attempts, len(envoy.requests)) == (400, 1, 1)
            dead = await store.get(unrouted.job_id)
            assert dead is not None and dead.attempts == 1 and "no Envoy configured" in dead.last_error

    run(scenario())


def test_concurrency_is_bounded_per_service_and_overall(names: JobNames) -> None:
    async def respond(n: int, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        return ok()

    async def scenario() -> None:
        async with job_store(names) as store, StandIn(respond) as envoy:
            jobs = [a_job(service="busy") for _ in range(5)] + [a_job(service="quiet") for _ in range(2)]
            for job in jobs:
                await store.submit(job)
            executor = HttpExecutor(lambda _: envoy.url, SIGNER, timeout_s=5)
            worker = Worker(store, executor, concurrency_per_service=2, concurrency=3, ack_wait_s=5, poll_s=0.1,
                            defer_s=0.1)
            async with running(worker):
                for job in jobs:
                    await until(lambda job=job: state_is(store, job.job_id, JobState.DONE), "all jobs to finish")
            await executor.close()
            assert envoy.peak["busy"] == 2 and envoy.peak["*"] == 3
            assert len(envoy.requests) == 7  # deferring a job over its service's bound is not an attempt
            for job in jobs:
                view = await store.get(job.job_id)
                assert view is not None and view.attempts == 1

    run(scenario())


def test_a_call_longer_than_ack_wait_is_not_redelivered(names: JobNames) -> None:
    async def respond(n: int, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2.5)
        return ok()

    async def scenario() -> None:
        async with job_store(names) as store, StandIn(respond) as envoy:
            job = a_job()
            await store.submit(job)
            executor = HttpExecutor(lambda _: envoy.url, SIGNER, timeout_s=10)
            async with running(Worker(store, executor, ack_wait_s=1.0, poll_s=0.1)):  # heartbeats every 0.25s
                await until(lambda: state_is(store, job.job_id, JobState.DONE), "the slow job to finish")
            await executor.close()
            assert len(envoy.requests) == 1
            view = await store.get(job.job_id)
            assert view is not None and view.result is not None and view.result.attempts == 1

    run(scenario())


def test_a_worker_killed_mid_call_leaves_exactly_one_result(names: JobNames) -> None:
    async def respond(n: int, request: web.Request) -> web.StreamResponse:
        if n == 1:  # the call the first worker dies in
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(envoy.release.wait(), 30)
        return ok(b'{"answered_call":%d}' % n)

    def worker_process(name: str) -> Managed:
        args = [sys.executable, "-m", "extproc", "worker", "--nats", NATS_URL, "--prefix", prefix_of(names),
                "--envoy", f"demo/user-service={envoy.url}", "--ack-wait", "2", "--timeout", "20",
                "--backoff-base", "0.1", "--grace", "5"]
        env = {**os.environ, "EXTPROC_SIGNING_KEY": SIGNING_KEY}
        return Managed(name, args, env=env).start()

    envoy = StandIn(respond)

    async def scenario() -> None:
        async with job_store(names) as store, envoy:
            job = a_job()
            events = await Events().subscribe(names.result_subject("demo", "user-service"))
            await store.submit(job)
            first = worker_process("worker-1")
            second: Managed | None = None
            try:
                await until(lambda: _true(len(envoy.requests) == 1), "the first worker to start the call")
                assert first.process is not None
                first.process.kill()  # kill -9, mid-call: no chance to nak or record anything
                first.process.wait(10)
                second = worker_process("worker-2")
                await until(lambda: state_is(store, job.job_id, JobState.DONE),
                            f"redelivery to the second worker\n{second.log_text()}")
                await asyncio.sleep(0.5)  # room for a (wrong) second result or event
                view = await store.get(job.job_id)
                assert view is not None and view.result is not None
                assert view.result.body == b'{"answered_call":2}' and view.result.attempts == 2
                assert len(envoy.requests) == 2 and len(events.messages) == 1
                assert orjson.loads(events.messages[0].data)["body"] == '{"answered_call":2}'
                nc = await nats.connect(NATS_URL)
                results = await nc.jetstream().stream_info(f"KV_{names.results_bucket}")
                assert results.state.last_seq == 1  # one write ever: stored once, never overwritten
                await nc.close()
                # SIGTERM drains and exits cleanly.
                assert second.stop(timeout=10, sig=signal.SIGTERM) == 0, second.log_text()
            finally:
                for managed in (first, second):
                    if managed is not None:
                        managed.stop(timeout=5, sig=signal.SIGKILL)
                await events.close()

    run(scenario())


async def _true(value: bool) -> bool:
    return value
