"""Asynchronous AI jobs in NATS JetStream: the queue, their status, their results and the dead letters.

Layout (names from ``JobNames``; defaults shown):

- stream ``AI_JOBS`` on ``ai.jobs.submit.<ns>.<svc>``: the queue. Work-queue retention, so a message
  lives until a worker acks it and the per-subject message count *is* the service's queue depth
  (queued + backing off + running). ``max_msgs_per_subject`` with discard-new-per-subject makes the
  server enforce the per-service limit even when replicas submit concurrently.
- KV ``ai_job_status``: job id → owner, state, attempts, last error. Lets ``get()`` tell a pending job
  from an unknown id, and every state change is a compare-and-set so concurrent workers cannot
  regress a finished job.
- KV ``ai_job_results``: job id → result, with a TTL. Written with ``create`` so the first completion
  wins: a redelivered job (worker died mid-call) cannot store or announce a second result.
- ``ai.jobs.result.<ns>.<svc>``: one event per stored result (the KV value, ``Nats-Msg-Id`` = job id
  so a stream capturing these subjects deduplicates). Plain NATS: add a stream if events must persist.
- stream ``AI_JOBS_DEAD`` on ``ai.jobs.dead.<ns>.<svc>``: jobs that kept failing, with their last
  error in the ``Ai-Job-Error`` header; ``retry()`` takes them back from there.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, TypeVar

import nats
import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import (
    APIError,
    BadRequestError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from extproc.base.apis import Api, ApiError, ErrorKind
from extproc.base.outage import Outage
from extproc.base.wire import JOBS_PATH
from extproc.jobs.config import JobLimits, JobNames
from extproc.jobs.errors import JobError, JobTooLarge, NotRetriable, QueueFull, StoreUnavailable, UnknownJob
from extproc.jobs.metrics import RESUBMITTED, SUBMITTED, JobMetrics
from extproc.jobs.model import JOB_ID_RE, Job, JobResult, JobState, JobView, StatusRecord

log = logging.getLogger(__name__)

_STREAM_EXISTS = 10058  # JSStreamNameExistErr: exists with another configuration
_HEADER_ROOM = 16 * 1024  # NATS headers and JSON framing around a base64 body
_FINAL = (JobState.DONE, JobState.DEAD)
# NATS failures that say "not reachable now" rather than "refused": a caller waiting on them gets a 503.
_UNREACHABLE = (TimeoutError, OSError, nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
                nats.errors.ConnectionDrainingError, nats.errors.StaleConnectionError, nats.errors.NoServersError,
                nats.errors.NoRespondersError, nats.errors.OutboundBufferLimitError, ServiceUnavailableError)
_CLEANUP_S = 0.25  # at least this long to take back a status record whose job could not be queued
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Submitted:
    job_id: str
    subject: str  # where the result event will be published
    dead_subject: str  # where it goes if it keeps failing

    @property
    def location(self) -> str:
        return JOBS_PATH + self.job_id


@dataclass(frozen=True, slots=True)
class Attempt:
    number: int  # attempts made so far including this one, across resubmissions
    queued_at: float  # since when the job waited for this attempt


def result_event(doc: dict[str, Any]) -> dict[str, Any]:
    """The published result event: the stored record in readable form. The body is the response
    the caller would have received (text; base64 in ``body_base64`` if it is not UTF-8)."""
    result = JobResult.from_doc(doc)
    event: dict[str, Any] = {
        "object": "ai.job.result", "job_id": result.job_id, "service": doc.get("svc", ""),
        "namespace": doc.get("ns", ""), "status": result.status, "content_type": result.content_type,
        "attempts": result.attempts, "completed_at": result.completed_at, "error": result.error,
    }
    try:
        event["body"] = result.body.decode()
    except UnicodeDecodeError:
        event["body_base64"] = base64.b64encode(result.body).decode()
    return event


class JobStore:
    """``timeout_s`` bounds each NATS request of the worker, the CLI and setup. ``request_timeout_s``
    bounds what a caller waits on (``submit``, ``get``: answered inside Envoy's ext_proc message
    timeout of 5 s): well below it, so NATS trouble is a quick 503 from the processor, not a 504 from
    Envoy. After such a timeout the store fails those calls at once for ``retry_after_s`` (one probe
    at a time), and while the connection is down it does not try at all."""

    def __init__(self, names: JobNames | None = None, limits: JobLimits | None = None,
                 metrics: JobMetrics | None = None, timeout_s: float = 5.0, request_timeout_s: float = 1.0,
                 retry_after_s: float = 1.0) -> None:
        self.names = names or JobNames()
        self.limits = limits or JobLimits()
        self.metrics = metrics
        self._timeout = timeout_s
        self._request_timeout = min(request_timeout_s, timeout_s)
        self.outage = Outage("job store (NATS)", retry_after_s, fallback="asynchronous calls and polls answer 503",
                             logger=log)
        self._nc: Client | None = None
        self._js_ctx: JetStreamContext | None = None
        self._status_kv: KeyValue | None = None
        self._results_kv: KeyValue | None = None
        self.max_body_bytes = self.limits.max_body_bytes
        self._max_msg = 0
        self._create = self._update = True
        self._per_service_cap = self.limits.max_queued_per_service
        self._total_cap = self.limits.max_queued_total

    # --- lifecycle -------------------------------------------------------------------------------

    async def connect(self, url: str = "nats://127.0.0.1:4222", *, create: bool = True, update: bool = True,
                      **options: Any) -> JobStore:
        """Connect, creating the streams and buckets if missing (``create``); safe from every replica.

        With ``update`` (the processor, which owns the limits) existing ones get this store's limits;
        the worker passes ``update=False`` so its defaults never override the processor's, and the
        CLI also ``create=False``: it only binds, and says so when nothing is there (wrong --prefix?).
        Either way the queue limits in force are read back from the stream.
        """
        options.setdefault("name", "extproc-jobs")
        options.setdefault("connect_timeout", 2)
        options.setdefault("reconnect_time_wait", 1)
        options.setdefault("error_cb", _log_nats_error)
        # nats-py applies one reconnect policy to the first connection too, where "forever" would hang
        # startup with NATS down: fail the first connection fast, then reconnect as asked (default:
        # forever, so a NATS restart does not break the processor or the worker).
        reconnects = options.pop("max_reconnect_attempts", -1)
        self._nc = await nats.connect(url, max_reconnect_attempts=1, **options)
        self._nc.options["max_reconnect_attempts"] = reconnects
        self._js_ctx = self._nc.jetstream(timeout=self._timeout)
        # Base64 grows the body by 4/3, and the whole job must fit in one message.
        server_cap = (self._nc.max_payload - _HEADER_ROOM) * 3 // 4
        self.max_body_bytes = max(0, min(self.limits.max_body_bytes, server_cap))
        self._max_msg = min(self._nc.max_payload, -(-self.max_body_bytes // 3) * 4 + _HEADER_ROOM)
        self._create, self._update = create, update
        try:
            await self._ensure_streams()
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Flush what was published (for at most ``request_timeout_s``), then close.

        Not nats-py's drain: on a frozen server it waits out its drain timeout and then a 10 s flush,
        holding up the processor's shutdown; and no subscription is left to drain by then (the worker
        unsubscribes its own before closing the store).
        """
        nc, self._nc = self._nc, None
        if nc is None or nc.is_closed:
            return
        with contextlib.suppress(Exception):  # down, reconnecting or not answering: close all the same
            await nc.flush(timeout=max(1, math.ceil(self._request_timeout)))  # nats-py wants whole seconds
        with contextlib.suppress(Exception):
            await nc.close()

    async def __aenter__(self) -> JobStore:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def destroy(self) -> None:
        """Delete every stream and bucket of these names (tests, uninstall). Jobs are lost."""
        for stream in (self.names.stream, self.names.dead_stream, f"KV_{self.names.status_bucket}",
                       f"KV_{self.names.results_bucket}"):
            with contextlib.suppress(NotFoundError):
                await self._js.delete_stream(stream)

    async def _ensure_streams(self) -> None:
        limits, names = self.limits, self.names
        queue = await self._ensure_stream(api.StreamConfig(
            name=names.stream, subjects=[f"{names.subject_root}.submit.*.*"],
            retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.NEW, discard_new_per_subject=True,
            max_msgs_per_subject=limits.max_queued_per_service, max_msgs=limits.max_queued_total,
            max_msg_size=self._max_msg, duplicate_window=120.0, num_replicas=limits.replicas,
            description="asynchronous AI calls waiting for a worker"))
        if queue.max_msgs_per_subject and queue.max_msgs_per_subject > 0:
            self._per_service_cap = queue.max_msgs_per_subject
        if queue.max_msgs and queue.max_msgs > 0:
            self._total_cap = queue.max_msgs
        await self._ensure_stream(api.StreamConfig(
            name=names.dead_stream, subjects=[f"{names.subject_root}.dead.*.*"],
            retention=api.RetentionPolicy.LIMITS, storage=api.StorageType.FILE, max_age=limits.dead_ttl_s,
            max_msg_size=self._max_msg + _HEADER_ROOM, duplicate_window=120.0, num_replicas=limits.replicas,
            description="asynchronous AI calls that kept failing; `extproc jobs retry` resubmits them"))
        self._status_kv = await self._ensure_bucket(names.status_bucket, limits.status_ttl_s, 64 * 1024)
        self._results_kv = await self._ensure_bucket(names.results_bucket, limits.result_ttl_s,
                                                     self._nc_checked.max_payload)

    async def _ensure_stream(self, config: api.StreamConfig) -> api.StreamConfig:
        """The stream's configuration in force, after creating or updating it as this store may."""
        assert config.name is not None
        if self._create:
            try:
                return (await self._js.add_stream(config)).config  # a no-op when it exists identically
            except BadRequestError as exc:
                if exc.err_code != _STREAM_EXISTS:
                    raise
            if self._update:  # exists with other limits: the processor's configuration wins
                return (await self._js.update_stream(config)).config
        return (await self._stream_info(config.name)).config

    async def _ensure_bucket(self, bucket: str, ttl_s: float, max_value: int) -> KeyValue:
        config = api.KeyValueConfig(bucket=bucket, history=1, ttl=ttl_s, max_value_size=max_value,
                                    storage=api.StorageType.FILE, replicas=self.limits.replicas)
        if self._create:
            try:
                return await self._js.create_key_value(config)
            except BadRequestError as exc:
                if exc.err_code != _STREAM_EXISTS:
                    raise
            if self._update:
                info = await self._js.stream_info(f"KV_{bucket}")
                await self._js.update_stream(replace(info.config, max_age=ttl_s, max_msg_size=max_value))
        await self._stream_info(f"KV_{bucket}")
        return await self._js.key_value(bucket)

    async def _stream_info(self, stream: str) -> api.StreamInfo:
        try:
            return await self._js.stream_info(stream)
        except NotFoundError:
            raise JobError(f"no stream {stream} on this NATS server: asynchronous jobs are not set up there "
                           f"(or under another name prefix)") from None

    @property
    def _nc_checked(self) -> Client:
        if self._nc is None:
            raise RuntimeError("JobStore is not connected")
        return self._nc

    @property
    def _js(self) -> JetStreamContext:
        if self._js_ctx is None or self._nc is None:
            raise RuntimeError("JobStore is not connected")
        return self._js_ctx

    @property
    def _status(self) -> KeyValue:
        assert self._status_kv is not None, "JobStore is not connected"
        return self._status_kv

    @property
    def _results(self) -> KeyValue:
        assert self._results_kv is not None, "JobStore is not connected"
        return self._results_kv

    # --- calls a caller waits on -------------------------------------------------------------------

    def _deadline(self) -> float:
        """When a caller-facing call must be done; raises StoreUnavailable at once when it cannot be."""
        nc = self._nc
        if nc is None or self._status_kv is None or self._results_kv is None:
            raise StoreUnavailable("not connected (yet)")
        if not nc.is_connected:  # nats-py would buffer the request until it reconnects, or time out
            state = "reconnecting" if nc.is_reconnecting else "connection closed"
            self.outage.failed(f"NATS {state}", back_off=False)
            raise StoreUnavailable(f"NATS {state}")
        if self.outage.skip():
            raise StoreUnavailable(f"{self.outage.reason}; retrying shortly")
        return asyncio.get_running_loop().time() + self._request_timeout

    async def _within(self, call: Awaitable[T], deadline: float) -> T:
        """Await ``call`` until ``deadline``; NATS not answering (or unreachable) becomes StoreUnavailable.

        Refusals (QueueFull, a key that exists...) pass through unchanged: NATS answered.
        """
        try:
            async with asyncio.timeout_at(deadline):
                result = await call
        except _UNREACHABLE as exc:
            reason = (f"no answer within {self._request_timeout:g}s" if isinstance(exc, TimeoutError)
                      else f"{type(exc).__name__} {exc}".strip())
            self.outage.failed(reason)
            raise StoreUnavailable(reason) from exc
        self.outage.recovered()
        return result

    # --- submission --------------------------------------------------------------------------------

    async def submit(self, job: Job, *, max_queued: int | None = None, max_body_bytes: int | None = None) -> Submitted:
        """Queue a job. ``max_queued``/``max_body_bytes`` tighten the store's limits for this service.

        Raises JobTooLarge, QueueFull, StoreUnavailable (within ``request_timeout_s``: NATS down or not
        answering), or ValueError for a job id already in use.
        """
        body_limit = min(self.max_body_bytes, max_body_bytes if max_body_bytes is not None else self.max_body_bytes)
        data = job.encode()
        if len(job.body) > body_limit or len(data) > self._max_msg:
            raise JobTooLarge(body_limit, len(job.body) + max(0, len(data) - self._max_msg))
        deadline = self._deadline()
        await self._within(self._check_depth(job, max_queued), deadline)
        now = time.time()
        record = StatusRecord(JobState.PENDING, job.service, job.namespace, job.submitted_at, job.attempt,
                              queued_at=now, updated_at=now, api=job.api.value)
        try:
            await self._within(self._status.create(job.job_id, record.encode()), deadline)
        except KeyWrongLastSequenceError:
            raise ValueError(f"job id {job.job_id} is already in use") from None
        try:
            await self._within(self._publish_job(job, data), deadline)
        except BaseException:
            # Best effort and short: after a timeout NATS is unlikely to answer this either.
            loop = asyncio.get_running_loop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._status.purge(job.job_id), max(deadline - loop.time(), _CLEANUP_S))
            raise
        if self.metrics:
            self.metrics.count(job.service, job.namespace, SUBMITTED)
        return self._submitted(job)

    async def queue_depth(self, namespace: str, service: str) -> int:
        """Jobs of one service still in the queue (waiting, backing off or running): exact, one API call."""
        subject = self.names.submit_subject(namespace, service)
        info = await self._js.stream_info(self.names.stream, subjects_filter=subject)
        return int((info.state.subjects or {}).get(subject, 0))

    async def _check_depth(self, job: Job, max_queued: int | None) -> None:
        limit = self._per_service_cap
        if max_queued is not None:
            limit = min(limit, max_queued)  # the stream's own cap is the hard ceiling
        depth = await self.queue_depth(job.namespace, job.service)
        if depth >= limit:
            raise QueueFull(job.service, depth, limit)

    async def _publish_job(self, job: Job, data: bytes) -> None:
        subject = self.names.submit_subject(job.namespace, job.service)
        try:
            # The message id makes a re-sent submission (ambiguous timeout) a no-op within two minutes.
            await self._js.publish(subject, data, stream=self.names.stream,
                                   headers={api.Header.MSG_ID: f"{job.job_id}.{job.attempt}"})
        except APIError as exc:
            # The server's own limits, hit when submissions race past the depth check.
            text = exc.description or ""
            if "maximum messages per subject" in text:
                raise QueueFull(job.service, self._per_service_cap, self._per_service_cap) from exc
            if "maximum messages" in text or "maximum bytes" in text:
                raise QueueFull(job.service, self._total_cap, self._total_cap) from exc
            raise

    def _submitted(self, job: Job) -> Submitted:
        return Submitted(job.job_id, self.names.result_subject(job.namespace, job.service),
                         self.names.dead_subject(job.namespace, job.service))

    # --- reading -----------------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobView | None:
        """The job's state, owner and (once done) result; None for unknown, malformed or expired ids.

        Raises StoreUnavailable (within ``request_timeout_s``) when NATS is down or not answering.
        """
        if not JOB_ID_RE.match(job_id):
            return None
        deadline = self._deadline()
        (status, _), result = await self._within(
            asyncio.gather(self._status_get(job_id), self._result_get(job_id)), deadline)
        if result is not None:
            doc, stored = result
            # The result record carries its owner, so it can be served even if its status expired first.
            return JobView(job_id, JobState.DONE, str(doc.get("svc", "")), str(doc.get("ns", "")),
                           status.submitted_at if status else 0.0, stored.attempts,
                           status.last_error if status else stored.error,
                           status.updated_at if status else stored.completed_at, stored,
                           status.api_of_call if status else None)
        if status is None or status.state == JobState.DONE:  # never seen, or its result has expired
            return None
        return _view(job_id, status)

    async def list(self, service: str | None = None, namespace: str | None = None, state: JobState | str | None = None,
                   limit: int = 50) -> list[JobView]:
        """Newest first. Reads every status entry (one ordered consumer): meant for operators, not hot paths."""
        wanted = JobState(state) if state else None
        views = [_view(job_id, record) for job_id, record in await self._status_records()
                 if (service is None or record.service == service) and
                 (namespace is None or record.namespace == namespace) and (wanted is None or record.state == wanted)]
        views.sort(key=lambda v: v.submitted_at, reverse=True)
        return views[:limit]

    async def _status_records(self) -> builtins.list[tuple[str, StatusRecord]]:  # `list` here is the method above
        """Every current status entry.

        Not nats-py's KV watcher: it can signal "no more entries" before delivering the first one
        (it compares the server's pending count with what the client has processed so far). Here the
        end is the stream's last sequence as of the start, which every delivery's metadata can be
        compared with.
        """
        stream = f"KV_{self.names.status_bucket}"
        info = await self._js.stream_info(stream)
        if not info.state.messages:
            return []
        last = info.state.last_seq or 0
        prefix = f"$KV.{self.names.status_bucket}."
        records: list[tuple[str, StatusRecord]] = []
        finished = asyncio.Event()

        async def collect(msg: Msg) -> None:
            if not (msg.headers or {}).get("KV-Operation"):  # not a delete or purge marker
                with contextlib.suppress(ValueError):
                    records.append((msg.subject.removeprefix(prefix), StatusRecord.decode(msg.data)))
            meta = msg.metadata
            if meta.sequence.stream >= last or meta.num_pending == 0:
                finished.set()

        subscription = await self._js.subscribe(f"{prefix}>", stream=stream, cb=collect, ordered_consumer=True,
                                                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                                                inactive_threshold=60.0)
        try:
            await asyncio.wait_for(finished.wait(), self._timeout * 4)
        finally:
            await subscription.unsubscribe()
        return records

    async def _status_get(self, job_id: str) -> tuple[StatusRecord | None, int]:
        """The status and its revision (0 when absent, for a compare-and-set create)."""
        try:
            entry = await self._status.get(job_id)
        except KeyNotFoundError:
            return None, 0
        if entry.value is None:
            return None, 0
        try:
            return StatusRecord.decode(entry.value), entry.revision or 0
        except ValueError:
            log.warning("job %s: unreadable status record, treating it as absent", job_id)
            return None, 0

    async def _result_get(self, job_id: str) -> tuple[dict[str, Any], JobResult] | None:
        try:
            entry = await self._results.get(job_id)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        doc = orjson.loads(entry.value)
        return doc, JobResult.from_doc(doc)

    # --- state changes -----------------------------------------------------------------------------

    async def _transition(self, job_id: str, change: Callable[[StatusRecord | None], StatusRecord | None],
                          ) -> tuple[StatusRecord | None, StatusRecord | None]:
        """Compare-and-set the status: ``change`` sees the current record and returns the new one, or None
        to leave it. Returns (old, new); new is None when nothing was written."""
        for _ in range(20):
            old, revision = await self._status_get(job_id)
            new = change(old)
            if new is None:
                return old, None
            try:
                if revision:
                    await self._status.update(job_id, new.encode(), last=revision)
                else:
                    await self._status.create(job_id, new.encode())
                return old, new
            except KeyWrongLastSequenceError:
                continue  # someone else changed it meanwhile: decide again on the fresh value
        raise RuntimeError(f"job {job_id}: status kept changing under us")

    async def start_attempt(self, job: Job) -> Attempt | None:
        """Mark running and count the attempt; None when the job is already finished (skip and ack it).

        A redelivered job whose result is stored but never announced (the completing worker died in
        between) is announced here, so the event is not lost.
        """
        result = await self._result_get(job.job_id)
        if result is not None:
            await self._announce(job.job_id, result[0])
            return None
        now = time.time()

        def change(old: StatusRecord | None) -> StatusRecord | None:
            if old is not None and old.state in _FINAL:
                return None
            base = old or StatusRecord(JobState.PENDING, job.service, job.namespace, job.submitted_at, job.attempt,
                                       queued_at=job.submitted_at, api=job.api.value)
            return replace(base, state=JobState.RUNNING, attempts=base.attempts + 1, updated_at=now)

        old, new = await self._transition(job.job_id, change)
        if new is None:
            return None
        return Attempt(new.attempts, old.queued_at if old and old.queued_at else job.submitted_at)

    async def requeue(self, job: Job, error: str) -> None:
        """A retriable failure: back to pending with its error, while the message waits out its backoff."""
        now = time.time()

        def change(old: StatusRecord | None) -> StatusRecord | None:
            if old is None or old.state in _FINAL:
                return None
            return replace(old, state=JobState.PENDING, last_error=error, queued_at=now, updated_at=now)

        await self._transition(job.job_id, change)

    async def complete(self, job_id: str, result: JobResult) -> bool:
        """Store the result and publish its event. The first completion wins; later ones return False."""
        status, _ = await self._status_get(job_id)
        if status is None:
            log.warning("job %s: completed but its status is gone (expired?); result dropped", job_id)
            return False
        record = self._result_record(replace(result, job_id=job_id), status)
        try:
            await self._results.create(job_id, record)
        except KeyWrongLastSequenceError:
            return False
        await self._announce(job_id, orjson.loads(record), result.error)
        return True

    def _result_record(self, result: JobResult, status: StatusRecord) -> bytes:
        doc = {**result.to_doc(), "svc": status.service, "ns": status.namespace}
        value = orjson.dumps(doc)
        if len(value) + _HEADER_ROOM <= self._nc_checked.max_payload:
            return value
        # Too big for one NATS message: the caller gets an error in its own format instead of nothing.
        api_name = status.api_of_call or Api.OPENAI
        error = ApiError(ErrorKind.TOO_LARGE, f"the response to this job is {len(result.body)} bytes, more than a job "
                         f"result may hold ({self.max_body_bytes} bytes)", "job_result_too_large")
        small = replace(result, status=error.kind.status, content_type="application/json",
                        body=error.render(api_name), error=f"result of {len(result.body)} bytes too large to store")
        return orjson.dumps({**small.to_doc(), "svc": status.service, "ns": status.namespace})

    async def _announce(self, job_id: str, doc: dict[str, Any], error: str = "") -> None:
        """Mark done and publish the result event, exactly once: only the writer of the DONE state publishes."""
        now = time.time()

        def change(old: StatusRecord | None) -> StatusRecord | None:
            if old is not None and old.state == JobState.DONE:
                return None
            base = old or StatusRecord(JobState.DONE, str(doc.get("svc", "")), str(doc.get("ns", "")), now)
            return replace(base, state=JobState.DONE, last_error=error or base.last_error, updated_at=now)

        _, new = await self._transition(job_id, change)
        if new is None:
            return
        subject = self.names.result_subject(new.namespace, new.service)
        headers = {api.Header.MSG_ID: job_id, "Ai-Job-Id": job_id, "Ai-Job-Status": str(doc.get("s", "")),
                   "Content-Type": "application/json"}
        await self._nc_checked.publish(subject, orjson.dumps(result_event(doc)), headers=headers)
        # On the wire before the worker acks the job. (nats-py annotates the timeout as int; it is only
        # handed to asyncio.wait_for.)
        await self._nc_checked.flush(timeout=self._timeout)  # type: ignore[arg-type]

    async def dead_letter(self, job: Job, error: str) -> bool:
        """Give up on a job: its message to the dead-letter stream, its state to dead. False if it already
        finished (a late duplicate)."""
        status, _ = await self._status_get(job.job_id)
        if status is not None and status.state in _FINAL:
            return False
        attempts = status.attempts if status else job.attempt
        ack = await self._js.publish(
            self.names.dead_subject(job.namespace, job.service), job.encode(), stream=self.names.dead_stream,
            headers={api.Header.MSG_ID: f"{job.job_id}.dead.{attempts}", "Ai-Job-Id": job.job_id,
                     "Ai-Job-Attempts": str(attempts), "Ai-Job-Error": _header_text(error)})
        now = time.time()

        def change(old: StatusRecord | None) -> StatusRecord | None:
            if old is not None and old.state in _FINAL:
                return None
            base = old or StatusRecord(JobState.PENDING, job.service, job.namespace, job.submitted_at, attempts,
                                       api=job.api.value)
            return replace(base, state=JobState.DEAD, last_error=error, dead_seq=ack.seq, updated_at=now)

        _, new = await self._transition(job.job_id, change)
        if new is None:  # finished meanwhile: the dead letter would be a lie
            with contextlib.suppress(Exception):
                await self._js.delete_msg(self.names.dead_stream, ack.seq)
            return False
        return True

    async def retry(self, job_id: str) -> Submitted:
        """Send a dead job back to the queue, its attempt budget renewed. Raises UnknownJob, NotRetriable."""
        status, _ = await self._status_get(job_id) if JOB_ID_RE.match(job_id) else (None, 0)
        if status is None:
            raise UnknownJob(job_id)
        if status.state != JobState.DEAD:
            raise NotRetriable(job_id, status.state.value)
        if not status.dead_seq:  # dead-lettering was interrupted before the letter was recorded
            raise UnknownJob(job_id)
        try:
            message = await self._js.get_msg(self.names.dead_stream, seq=status.dead_seq)
        except NotFoundError:
            raise UnknownJob(job_id) from None  # its dead letter has expired
        job = replace(Job.decode(message.data or b""), attempt=status.attempts)
        await self._check_depth(job, None)
        now = time.time()

        def claim(old: StatusRecord | None) -> StatusRecord | None:
            if old is None or old.state != JobState.DEAD or old.dead_seq != status.dead_seq:
                return None
            return replace(old, state=JobState.PENDING, queued_at=now, updated_at=now, dead_seq=0)

        old, new = await self._transition(job_id, claim)
        if new is None:  # a concurrent retry won
            raise NotRetriable(job_id, old.state.value if old else "gone")
        try:
            await self._publish_job(job, job.encode())
        except BaseException:
            await self._transition(job_id, lambda cur: replace(cur, state=JobState.DEAD, dead_seq=status.dead_seq)
                                   if cur is not None and cur.state == JobState.PENDING else None)
            raise
        with contextlib.suppress(Exception):  # keep the dead stream a list of jobs still dead
            await self._js.delete_msg(self.names.dead_stream, status.dead_seq)
        if self.metrics:
            self.metrics.count(job.service, job.namespace, RESUBMITTED)
        return self._submitted(job)

    # --- worker plumbing ---------------------------------------------------------------------------

    async def worker_subscription(self, ack_wait_s: float, max_ack_pending: int) -> JetStreamContext.PullSubscription:
        """Bind to the shared durable pull consumer, creating it or updating its ack wait / pending cap."""
        config = api.ConsumerConfig(
            durable_name=self.names.durable, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ack_wait_s,
            max_deliver=-1,  # the worker counts attempts itself (status record), so redelivery never stops
            max_ack_pending=max_ack_pending, filter_subject=f"{self.names.subject_root}.submit.>",
            deliver_policy=api.DeliverPolicy.ALL)
        await self._js.add_consumer(self.names.stream, config)
        return await self._js.pull_subscribe_bind(durable=self.names.durable, stream=self.names.stream)


def _view(job_id: str, status: StatusRecord) -> JobView:
    return JobView(job_id, status.state, status.service, status.namespace, status.submitted_at, status.attempts,
                   status.last_error, status.updated_at, api=status.api_of_call)


async def _log_nats_error(exc: Exception) -> None:
    log.warning("NATS: %s", str(exc) or type(exc).__name__)  # nats-py's default logs a traceback per reconnect try


def _header_text(text: str, limit: int = 1024) -> str:
    """NATS header values are one line of limited length."""
    return " ".join(text.split())[:limit]
