"""Executing a job: replay the stored request through Envoy, so policy applies exactly as for a live call.

The replay carries ``x-ai-job``, a token signed with the processors' shared key, proving that this
call is the execution of job X submitted by service S (with quota reservation R): the processor
then attributes it to S rather than to whoever runs the worker, and does not charge quota twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp
from multidict import CIMultiDict  # aiohttp's own header type: a repeated header stays repeated

from extproc.base.tokens import Signer
from extproc.base.wire import JOB_HEADER
from extproc.jobs.claim import JobClaim
from extproc.jobs.model import Job, JobResult, is_retriable_status

_TOKEN_SLACK_S = 60.0  # the token must outlive the call, including fallback hops that re-verify it
_ERROR_PREVIEW = 300


class RetriableError(Exception):
    """The call did not produce an answer (connection refused/reset, timeout): try again later."""


class PermanentError(Exception):
    """The job cannot be executed by this worker as configured (e.g. no Envoy for its service):
    retrying will not help, so it is dead-lettered at once for an operator to look at."""


def job_token(signer: Signer, job: Job, ttl_s: float) -> str:
    """The ``x-ai-job`` token the decision verifies (one codec: jobs.claim.JobClaim)."""
    return JobClaim(job.job_id, job.service, job.namespace, job.reservation).encode(signer, ttl_s)


class HttpExecutor:
    def __init__(self, envoy_url_for: Callable[[Job], str], signer: Signer, timeout_s: float = 300.0) -> None:
        self._envoy_url_for = envoy_url_for
        self._signer = signer
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, job: Job) -> JobResult:
        try:
            base = self._envoy_url_for(job)
        except (KeyError, LookupError) as exc:
            raise PermanentError(f"no Envoy configured for {job.namespace}/{job.service}") from exc
        headers = [(name, value) for name, value in job.headers if name != JOB_HEADER]
        headers.append((JOB_HEADER, job_token(self._signer, job, self.timeout_s + _TOKEN_SLACK_S)))
        try:
            async with self._client().request(job.method, base.rstrip("/") + job.path, data=job.body,
                                              headers=CIMultiDict(headers), allow_redirects=False) as response:
                # A streamed (SSE) answer is read to its end: the caller polls for it as one body,
                # exactly the bytes it would have received live.
                body = await response.read()
                status, content_type = response.status, response.headers.get("content-type", "")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise RetriableError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc
        error = ""
        if status >= 400:
            kind = "retriable" if is_retriable_status(status) else "error"
            error = f"HTTP {status} ({kind}): {body[:_ERROR_PREVIEW].decode(errors='replace')}"
        return JobResult(job.job_id, status, content_type, body, time.time(), 0, error)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # auto_decompress: we dropped the caller's accept-encoding, so bodies are stored decoded.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                                  auto_decompress=True)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

