"""Asynchronous AI calls: ``Prefer: respond-async`` on a normal AI endpoint.

The decision checks the call exactly as a synchronous one (policy, model, quota), then, instead of
forwarding it, persists it as a job in NATS JetStream and answers ``202 Accepted`` with where to
poll and which subject the result will be published on. ``extproc worker`` later replays the call
through the same Envoy path with a signed ``x-ai-job`` token, which the decision honours as the
submitting service (no second quota charge, never made asynchronous again). Results are polled at
``GET /v1/ai-jobs/<id>``, answered here, and only for the submitting service.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import orjson

from extproc.base.apis import ApiError, ErrorKind, api_of_caller, split_path
from extproc.base.wire import ASYNC_HEADER, JOBS_PATH
from extproc.core.identity import Caller
from extproc.core.messages import HttpRequest, LocalReply, reject

if TYPE_CHECKING:
    from extproc.core.admission import Admission, Charge
    from extproc.core.routing import Target
    from extproc.jobs.store import JobStore
    from extproc.policy.model import ModelRoute

log = logging.getLogger(__name__)


def wants_async(headers: Mapping[str, str]) -> bool:
    """``Prefer: respond-async`` (RFC 7240), among other preferences, or ``x-ai-async: true``."""
    prefer = headers.get("prefer", "")
    preferences = {part.split("=", 1)[0].strip().lower() for part in prefer.replace(";", ",").split(",")}
    return "respond-async" in preferences or headers.get(ASYNC_HEADER, "").strip().lower() == "true"


Headers = tuple[tuple[str, str], ...]


def accepted(job_id: str, location: str, subject: str, dead_subject: str) -> tuple[int, bytes, Headers]:
    """The 202 for a queued call: where to poll, and where the result will be published."""
    body = orjson.dumps({"id": job_id, "object": "ai.job", "status": "queued", "location": location,
                         "result_subject": subject, "dead_letter_subject": dead_subject})
    return 202, body, (("content-type", "application/json"), ("location", location),
                       ("preference-applied", "respond-async"), ("x-ai-job-id", job_id))


class JobLookup:
    """``GET /v1/ai-jobs/<id>``: decided on headers alone, answered from the job store."""

    def __init__(self, store: JobStore, path: str, headers: Mapping[str, str], caller: Caller) -> None:
        self._store = store
        self._job_id = split_path(path)[0][len(JOBS_PATH):].strip("/")
        self._api = api_of_caller(path, dict(headers))
        self._caller = caller

    async def reply(self) -> LocalReply:
        from extproc.jobs.errors import StoreUnavailable

        try:
            view = await self._store.get(self._job_id)  # bounded: NATS trouble is a quick StoreUnavailable
        except StoreUnavailable as exc:  # NATS down or not answering: say so, in the caller's format
            return reject(self._api, ApiError(ErrorKind.UNAVAILABLE, f"the job store cannot be reached: "
                                              f"{exc.reason}", "job_store_unavailable"))
        except Exception as exc:
            return reject(self._api, ApiError(ErrorKind.UNAVAILABLE, f"the job store cannot be reached: "
                                              f"{type(exc).__name__}", "job_store_unavailable"))
        if view is None or not view.owned_by(self._caller.service or "", self._caller.namespace or ""):
            return reject(self._api, ApiError(ErrorKind.NOT_FOUND, f"no job {self._job_id!r} for "
                                              f"{self._caller.describe()} (unknown, expired or not yours)",
                                              "job_not_found"))
        failure = view.failure()
        if failure is not None:
            # In the format of the call that was submitted, which its submitter parses, not in the one the
            # poll's path and headers suggest: a bare GET on /v1/ai-jobs/ looks like an OpenAI call.
            return reject(view.api or self._api, failure)
        if view.result is None:
            body = orjson.dumps({"id": view.job_id, "object": "ai.job", "status": str(view.state),
                                 "attempts": view.attempts})
            return LocalReply(202, body, "ai_job_pending", (("content-type", "application/json"),
                                                           ("retry-after", "1"), ("x-ai-job-id", view.job_id)))
        result = view.result
        return LocalReply(result.status, result.body, "ai_job_result",
                          (("content-type", result.content_type or "application/json"), ("x-ai-job-id", view.job_id)))



async def submit(admission: Admission, request: HttpRequest, body: bytes, data: dict[str, object],
                 route: ModelRoute, target: Target) -> LocalReply:
    """Check and charge the call as a synchronous one, then queue it as a job: 202 at once.

    What it was charged is refunded if it is not queued: nothing else would ever settle it.
    """
    charge = await admission.charge(data, route, target)
    if isinstance(charge, LocalReply):
        return charge
    reservation = charge.reservation if charge is not None else None
    try:
        reply = await _queue(admission, request, body, charge)
    except BaseException:
        if reservation is not None:
            await admission.runtime.quota.refund(reservation)
        raise
    if reply.status != 202 and reservation is not None:
        await admission.runtime.quota.refund(reservation)
    return reply


async def _queue(admission: Admission, request: HttpRequest, body: bytes, charge: Charge | None) -> LocalReply:
    from extproc.jobs.errors import JobError
    from extproc.jobs.model import Job

    jobs = admission.runtime.jobs
    assert jobs is not None
    api = admission.endpoint.api
    reservation = (charge.reservation.encode() if charge is not None and charge.reservation is not None
                   and charge.settles_tokens else None)
    headers = [(":authority", request.authority), *request.headers.items()]
    namespace, service = admission.scope
    job = Job.new(service=service, namespace=namespace, api=api, path=request.path, headers=headers, body=body,
                  reservation=reservation, policy_version=admission.policy.version)
    try:
        limits = admission.service.proxy.async_calls
        submitted = await jobs.submit(job, max_queued=limits.max_queued, max_body_bytes=limits.max_body_bytes)
    except JobError as exc:
        return reject(api, exc.api_error())
    except Exception as exc:  # NATS unreachable: a clear 503, the call is not lost silently
        log.warning("job submission failed: %s", exc)
        return reject(api, ApiError(ErrorKind.UNAVAILABLE, "asynchronous calls are unavailable: the job queue "
                                    f"cannot be reached ({type(exc).__name__})", "job_queue_unavailable"))
    status, reply, headers_out = accepted(submitted.job_id, submitted.location, submitted.subject,
                                          submitted.dead_subject)
    return LocalReply(status, reply, "ai_job_accepted", headers_out)
