"""Asynchronous AI calls (``Prefer: respond-async``): job model, NATS JetStream store, worker, executor.

Names are resolved lazily (PEP 562): the ``extproc`` CLI imports ``extproc.jobs.config`` to build its
parser, and must not pay for nats, aiohttp and prometheus on every command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "JobLimits": "config", "JobNames": "config", "subject_token": "config",
    "JobError": "errors", "JobTooLarge": "errors", "NotRetriable": "errors", "QueueFull": "errors",
    "StoreUnavailable": "errors", "UnknownJob": "errors",
    "HttpExecutor": "executor", "PermanentError": "executor", "RetriableError": "executor",
    "job_token": "executor",
    "JobMetrics": "metrics",
    "Job": "model", "JobResult": "model", "JobState": "model", "JobView": "model", "is_retriable_status": "model",
    "replay_headers": "model",
    "JobStore": "store", "Submitted": "store",
    "Backoff": "worker", "Worker": "worker",
}
__all__ = [
    "Backoff",
    "HttpExecutor",
    "Job",
    "JobError",
    "JobLimits",
    "JobMetrics",
    "JobNames",
    "JobResult",
    "JobState",
    "JobStore",
    "JobTooLarge",
    "JobView",
    "NotRetriable",
    "PermanentError",
    "QueueFull",
    "RetriableError",
    "StoreUnavailable",
    "Submitted",
    "UnknownJob",
    "Worker",
    "is_retriable_status",
    "job_token",
    "replay_headers",
    "subject_token",
]

if TYPE_CHECKING:
    from extproc.jobs.config import JobLimits, JobNames, subject_token
    from extproc.jobs.errors import JobError, JobTooLarge, NotRetriable, QueueFull, StoreUnavailable, UnknownJob
    from extproc.jobs.executor import HttpExecutor, PermanentError, RetriableError, job_token
    from extproc.jobs.metrics import JobMetrics
    from extproc.jobs.model import Job, JobResult, JobState, JobView, is_retriable_status, replay_headers
    from extproc.jobs.store import JobStore, Submitted
    from extproc.jobs.worker import Backoff, Worker


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"extproc.jobs.{module}"), name)
