"""The ``x-ai-job`` token: the worker's signed claim that a call executes a queued job on behalf of the
service that submitted it. One codec: the worker writes it (executor), the decision verifies it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from extproc.base.tokens import Signer
from extproc.base.wire import JOB_HEADER


@dataclass(frozen=True, slots=True)
class JobClaim:
    """A verified ``x-ai-job`` token: this call executes job ``job_id`` on behalf of its submitter."""

    job_id: str
    service: str
    namespace: str
    reservation: str | None

    def encode(self, signer: Signer, ttl_s: float) -> str:
        """The worker's ``x-ai-job`` token for this job (``verify`` reads it)."""
        return signer.sign({"job": self.job_id, "svc": self.service, "ns": self.namespace, "r": self.reservation},
                           ttl_s)

    @classmethod
    def verify(cls, headers: Mapping[str, str], signer: Signer, caller_service: str | None, workers: frozenset[str]
               ) -> JobClaim | None:
        """The claim a call's ``x-ai-job`` header makes, if genuine and presented by the submitting service's
        own sidecar or by a worker identity; None otherwise."""
        token = headers.get(JOB_HEADER)
        if token is None:
            return None
        payload = signer.verify(token)
        if payload is None:
            return None
        service, namespace = str(payload.get("svc", "")), str(payload.get("ns", ""))
        # The worker calls through the submitter's own sidecar, or through its own (a worker identity).
        if not service or (caller_service != service and caller_service not in workers):
            return None
        reservation = payload.get("r")
        return cls(str(payload.get("job", "")), service, namespace,
                   reservation if isinstance(reservation, str) else None)
