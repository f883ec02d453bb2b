"""Names and limits of the job infrastructure in NATS.

Every name is configurable so two installations (or two test sessions) can share one NATS server:
JetStream refuses two streams whose subjects overlap, so a prefix must change subjects too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNSAFE = re.compile(r"[.*>%\s\x00-\x1f\x7f]")


def subject_token(value: str) -> str:
    """One subject token for a service or namespace name.

    ``.`` would split the token, ``*``/``>`` are wildcards and whitespace is illegal, so those (and
    ``%``, the escape itself) are percent-encoded: the mapping stays one-to-one, and ordinary
    Kubernetes names are left readable. An empty namespace becomes ``_``.
    """
    if not value:
        return "_"
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), value)


@dataclass(frozen=True, slots=True)
class JobNames:
    stream: str = "AI_JOBS"
    dead_stream: str = "AI_JOBS_DEAD"
    results_bucket: str = "ai_job_results"
    status_bucket: str = "ai_job_status"
    subject_root: str = "ai.jobs"
    durable: str = "ai-jobs-worker"

    @classmethod
    def prefixed(cls, prefix: str) -> JobNames:
        """All names under ``prefix`` (letters, digits, ``_``, ``-``): an isolated set on a shared server."""
        if not prefix:
            return cls()
        if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
            raise ValueError(f"a jobs prefix may only hold letters, digits, _ and -: {prefix!r}")
        base = cls()
        return cls(f"{prefix}_{base.stream}", f"{prefix}_{base.dead_stream}", f"{prefix}_{base.results_bucket}",
                   f"{prefix}_{base.status_bucket}", f"{prefix}.{base.subject_root}", f"{prefix}-{base.durable}")

    def _subject(self, kind: str, namespace: str, service: str) -> str:
        return f"{self.subject_root}.{kind}.{subject_token(namespace)}.{subject_token(service)}"

    def submit_subject(self, namespace: str, service: str) -> str:
        return self._subject("submit", namespace, service)

    def result_subject(self, namespace: str, service: str) -> str:
        return self._subject("result", namespace, service)

    def dead_subject(self, namespace: str, service: str) -> str:
        return self._subject("dead", namespace, service)


@dataclass(frozen=True, slots=True)
class JobLimits:
    max_body_bytes: int = 512 * 1024  # request body of one job (clamped to what the server's max payload allows)
    max_queued_per_service: int = 1000  # jobs of one service not yet finished (queued, backing off or running)
    max_queued_total: int = 100_000
    result_ttl_s: float = 24 * 3600.0
    # Status outlives results so a poll after expiry can still be told apart from a never-seen id if
    # needed, and so dead jobs can be inspected and retried for as long as their dead letter is kept.
    status_ttl_s: float = 7 * 24 * 3600.0
    dead_ttl_s: float = 7 * 24 * 3600.0
    replicas: int = 1  # JetStream replicas of every stream and bucket (3 on a clustered server)
