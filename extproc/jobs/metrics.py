"""Prometheus metrics of asynchronous jobs (the processor counts submissions, the worker the rest)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# Queued time spans backoffs and backlogs, so buckets reach an hour.
_QUEUE_SECONDS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_RUN_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# outcome values of ai_extproc_jobs_total
SUBMITTED = "submitted"
COMPLETED = "completed"  # a success result stored
FAILED = "failed"  # a non-retriable error result stored (a 4xx the caller must fix)
RETRIED = "retried"  # an attempt failed retriably and the job was queued again with backoff
DEAD_LETTERED = "dead_lettered"
RESUBMITTED = "resubmitted"  # a dead job sent back to the queue (`extproc jobs retry`)


class JobMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        caller = ["service", "namespace"]
        self.jobs = Counter("ai_extproc_jobs", "Asynchronous AI jobs by outcome (submitted, completed, failed, "
                            "retried, dead_lettered, resubmitted).", [*caller, "outcome"], registry=self.registry)
        self.queue_seconds = Histogram("ai_extproc_job_queue_seconds", "Time a job waited before an attempt "
                                       "started (since submission or its last backoff).", caller,
                                       buckets=_QUEUE_SECONDS, registry=self.registry)
        self.run_seconds = Histogram("ai_extproc_job_run_seconds", "Duration of one execution attempt.",
                                     caller, buckets=_RUN_SECONDS, registry=self.registry)
        self.attempts = Counter("ai_extproc_job_attempts", "Execution attempts started.", caller,
                                registry=self.registry)

    def count(self, service: str, namespace: str, outcome: str) -> None:
        self.jobs.labels(service, namespace or "", outcome).inc()
