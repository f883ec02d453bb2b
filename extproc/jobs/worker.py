"""The job worker: pulls queued jobs, executes them, and records exactly one outcome per job.

Delivery is at-least-once (a worker may die mid-call and JetStream redelivers after ``ack_wait``);
exactly-once results come from the store: ``start_attempt`` skips jobs already finished, and
``complete`` only lets the first result in. Every message is acked only after its outcome is
written, so a crash anywhere leads to redelivery, never to a lost job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import nats.errors
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry

from extproc.jobs.executor import PermanentError, RetriableError
from extproc.jobs.metrics import COMPLETED, DEAD_LETTERED, FAILED, RETRIED, JobMetrics
from extproc.jobs.model import Job, JobResult, is_retriable_status
from extproc.jobs.store import JobStore

log = logging.getLogger(__name__)

Executor = Callable[[Job], Awaitable[JobResult]]


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float = 1.0
    max_s: float = 60.0

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """Exponential, capped, with jitter in [d/2, d] so a burst of failures does not retry in lockstep."""
        ceiling = min(self.max_s, self.base_s * 2.0 ** max(0, failures - 1))
        return ceiling / 2 + rand() * ceiling / 2


class Worker:
    def __init__(self, store: JobStore, executor: Executor, concurrency_per_service: int = 4, max_attempts: int = 5,
                 backoff: tuple[float, float] = (1.0, 60.0), *, concurrency: int = 16, ack_wait_s: float = 330.0,
                 call_timeout_s: float | None = None, defer_s: float = 1.0, poll_s: float = 1.0,
                 max_ack_pending: int = 10_000, registry: CollectorRegistry | None = None) -> None:
        if min(concurrency, concurrency_per_service, max_attempts) < 1:
            raise ValueError("concurrency, concurrency_per_service and max_attempts must be at least 1")
        self._store = store
        self._executor = executor
        self._per_service = concurrency_per_service
        self._concurrency = concurrency
        self._max_attempts = max_attempts
        self._backoff = Backoff(*backoff)
        self._ack_wait = ack_wait_s
        self._call_timeout = call_timeout_s
        self._defer_s = defer_s
        self._poll_s = poll_s
        # Shared by every worker replica on the durable consumer, and backoff-delayed messages count
        # against it: keep it well above the sum of all replicas' concurrency.
        self._max_ack_pending = max_ack_pending
        if store.metrics is not None and (registry is None or store.metrics.registry is registry):
            self.metrics = store.metrics
        else:
            self.metrics = JobMetrics(registry)
        self._running: Tally[tuple[str, str]] = Tally()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()  # set once bound to the consumer

    def stop(self) -> None:
        """Stop fetching; ``run`` returns once in-flight jobs finish (or its grace period ends)."""
        self._stopping.set()

    async def run(self, grace_s: float = 30.0) -> None:
        subscription = await self._store.worker_subscription(self._ack_wait, self._max_ack_pending)
        self.ready.set()
        log.info("worker ready: concurrency %d (%d per service), ack wait %.1fs, max attempts %d",
                 self._concurrency, self._per_service, self._ack_wait, self._max_attempts)
        try:
            while not self._stopping.is_set():
                free = self._concurrency - len(self._tasks)
                if free <= 0:
                    await self._wait_for_slot()
                    continue
                try:
                    messages = await subscription.fetch(free, timeout=self._poll_s)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except nats.errors.Error as exc:  # reconnecting: the client retries underneath
                    log.warning("fetching jobs failed: %s", exc)
                    await asyncio.sleep(self._poll_s)
                    continue
                for message in messages:  # even after stop(): they are ours now, better run than time out
                    task = asyncio.create_task(self._handle(message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            await self._drain(grace_s)
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _wait_for_slot(self) -> None:
        stop = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({stop, *self._tasks}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()

    async def _drain(self, grace_s: float) -> None:
        if not self._tasks:
            return
        log.info("draining %d in-flight job(s) (up to %.0fs)", len(self._tasks), grace_s)
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in pending:
            task.cancel()  # _handle hands the job back to the queue at once
        await asyncio.gather(*pending, return_exceptions=True)

    async def _handle(self, message: Msg) -> None:
        try:
            job = Job.decode(message.data)
        except ValueError as exc:
            log.error("dropping an unreadable job message (seq %s): %s", message.metadata.sequence.stream, exc)
            await message.term()
            return
        key = (job.namespace, job.service)
        # Checked and taken before any await, so tasks of one batch cannot overshoot the bound.
        if self._running[key] >= self._per_service:
            # Over the service's bound: hand it back for later rather than hold a slot other services need.
            # This is not an attempt (attempts are counted in the status record, not by deliveries).
            await message.nak(delay=self._defer_s)
            return
        self._running[key] += 1
        try:
            await self._process(message, job)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await message.nak()  # shutting down: let another worker take it now, not after ack_wait
            raise
        except Exception:
            # Most likely NATS itself is unreachable; the unacked message comes back after ack_wait.
            log.exception("job %s: could not record its outcome; it will be redelivered", job.job_id)
        finally:
            self._running[key] -= 1
            if self._running[key] <= 0:
                del self._running[key]

    async def _process(self, message: Msg, job: Job) -> None:
        attempt = await self._store.start_attempt(job)
        if attempt is None:  # finished already: a redelivery after a crash between outcome and ack
            await message.ack()
            return
        labels = (job.service, job.namespace or "")
        self.metrics.queue_seconds.labels(*labels).observe(max(0.0, time.time() - attempt.queued_at))
        self.metrics.attempts.labels(*labels).inc()
        result, error, permanent = await self._attempt(message, job, labels)
        if result is not None and not error:
            stored = await self._store.complete(job.job_id, replace(result, job_id=job.job_id, attempts=attempt.number))
            if stored:
                self.metrics.count(job.service, job.namespace, COMPLETED if result.status < 400 else FAILED)
            await message.ack()
            return
        failures = attempt.number - job.attempt  # in this submission: `jobs retry` renews the budget
        if permanent or failures >= self._max_attempts:
            log.warning("job %s dead after %d attempt(s): %s", job.job_id, attempt.number, error)
            if await self._store.dead_letter(job, error):
                self.metrics.count(job.service, job.namespace, DEAD_LETTERED)
            await message.ack()
            return
        delay = self._backoff.delay(failures)
        log.info("job %s attempt %d failed (%s); retrying in %.1fs", job.job_id, attempt.number, error, delay)
        await self._store.requeue(job, error)
        self.metrics.count(job.service, job.namespace, RETRIED)
        await message.nak(delay=delay)

    async def _attempt(self, message: Msg, job: Job, labels: tuple[str, str]) -> tuple[JobResult | None, str, bool]:
        """One execution: (result, error for a retriable or permanent failure, permanent?)."""
        heartbeat = asyncio.create_task(self._heartbeat(message))
        started = time.monotonic()
        try:
            call = self._executor(job)
            result = await (asyncio.wait_for(call, self._call_timeout) if self._call_timeout else call)
        except PermanentError as exc:
            return None, str(exc), True
        except RetriableError as exc:
            return None, str(exc), False
        except TimeoutError:
            return None, f"no answer within {self._call_timeout}s", False
        except Exception as exc:  # an executor bug must not lose the job: treat as retriable, and say so
            log.exception("job %s: executor failed", job.job_id)
            return None, f"{type(exc).__name__}: {exc}", False
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self.metrics.run_seconds.labels(*labels).observe(time.monotonic() - started)
        if is_retriable_status(result.status):
            return result, result.error or f"HTTP {result.status}", False
        return result, "", False

    async def _heartbeat(self, message: Msg) -> None:
        """Reset the ack timer while a call runs, so a long call is not redelivered to another worker;
        a crashed worker stops beating and its job comes back after ``ack_wait``."""
        interval = max(0.1, self._ack_wait / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await message.in_progress()
            except Exception as exc:
                log.warning("heartbeat for a running job failed: %s", exc)
