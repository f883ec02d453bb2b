"""Refusals of the job store, each with the error the processor should answer the caller with."""

from __future__ import annotations

from extproc.base.apis import ApiError, ErrorKind


class JobError(Exception):
    def api_error(self) -> ApiError:
        return ApiError(ErrorKind.UNAVAILABLE, str(self), "job_error")


class StoreUnavailable(JobError):
    """NATS is down, reconnecting, or did not answer within the store's request timeout.

    Raised at once (or after that short timeout), so the caller gets a 503 well before Envoy's
    ext_proc message timeout would answer it with a 504.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"the job store cannot be reached: {reason}")
        self.reason = reason

    def api_error(self) -> ApiError:
        return ApiError(ErrorKind.UNAVAILABLE, f"asynchronous calls are unavailable: {self}", "job_queue_unavailable")


class JobTooLarge(JobError):
    def __init__(self, limit: int, size: int) -> None:
        super().__init__(f"the request is {size} bytes; asynchronous jobs are limited to {limit} bytes")
        self.limit = limit
        self.size = size

    def api_error(self) -> ApiError:
        return ApiError(ErrorKind.TOO_LARGE, str(self), "job_too_large")


class QueueFull(JobError):
    def __init__(self, service: str, depth: int, limit: int) -> None:
        super().__init__(f"{service} already has {depth} asynchronous job(s) waiting or running; the limit is {limit}")
        self.service = service
        self.depth = depth
        self.limit = limit

    def api_error(self) -> ApiError:
        return ApiError(ErrorKind.RATE_LIMIT, str(self), "job_queue_full", openai_type="requests")


class UnknownJob(JobError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r} (unknown or expired)")
        self.job_id = job_id

    def api_error(self) -> ApiError:
        return ApiError(ErrorKind.NOT_FOUND, str(self), "job_not_found")


class NotRetriable(JobError):
    """``retry`` applies to dead jobs only."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job {job_id} is {state}, only dead jobs can be retried")
        self.job_id = job_id
        self.state = state
