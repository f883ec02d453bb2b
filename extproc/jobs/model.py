"""What an asynchronous AI job is, what it produced, and how both travel through NATS.

A job is the caller's request frozen at submission: enough to replay it later through the same
Envoy path (method, path, headers, body) plus who submitted it. Encodings are compact JSON with
the body in base64, because JetStream messages and KV values are opaque bytes and the records
must stay readable with the ``nats`` CLI when debugging.
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from extproc.base.apis import Api, ApiError, ErrorKind

_FORMAT = 1  # bumped if an encoding changes incompatibly; decoders refuse what they do not know

# Not replayed: hop-by-hop headers belong to the original connection; the body length is recomputed;
# credentials are never persisted (the processor injects the provider's own on the replay);
# ``prefer`` would make the replay asynchronous again; ``x-ai-job`` only the worker may set;
# Envoy-internal and forwarding headers are re-created by the Envoy the worker calls.
_DROPPED = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "content-length", "accept-encoding",
    "authorization", "proxy-authorization", "x-api-key", "api-key", "cookie",
    "prefer", "x-ai-job",
})
_DROPPED_PREFIXES = ("x-envoy-", "x-forwarded-")
JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")


class JobState(StrEnum):
    PENDING = "pending"  # queued, or waiting out a retry backoff
    RUNNING = "running"  # a worker is executing an attempt
    DONE = "done"  # a result is stored
    DEAD = "dead"  # gave up; the job sits on the dead-letter subject until retried


def new_job_id() -> str:
    return uuid.uuid4().hex


def replay_headers(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The request headers worth storing for the replay (see ``_DROPPED`` for what is left out and why).

    ext_proc hands the processor HTTP/2-style pseudo headers; ``:authority`` becomes ``host`` so the
    replay reaches the same Envoy virtual host, the other pseudo headers are carried by the job itself.
    """
    kept: list[tuple[str, str]] = []
    authority = ""
    for raw_name, value in headers:
        name = raw_name.lower()
        if name == ":authority":
            authority = value
        elif name.startswith(":") or name in _DROPPED or name.startswith(_DROPPED_PREFIXES):
            continue
        else:
            kept.append((name, value))
    if authority and not any(name == "host" for name, _ in kept):
        kept.insert(0, ("host", authority))
    return tuple(kept)


def is_retriable_status(status: int) -> bool:
    """Worth another attempt: the provider (or a limit) may answer differently later."""
    return status >= 500 or status in (408, 409, 429)


@dataclass(frozen=True, slots=True)
class Job:
    job_id: str
    service: str
    namespace: str
    api: Api
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    submitted_at: float
    attempt: int = 0  # attempts made before this submission (non-zero after `jobs retry`)
    reservation: str | None = None  # opaque quota-engine reservation, handed back on execution
    policy_version: str = ""

    @classmethod
    def new(cls, *, service: str, namespace: str, api: Api | str, path: str, headers: Iterable[tuple[str, str]],
            body: bytes, method: str = "POST", reservation: str | None = None, policy_version: str = "",
            now: float | None = None) -> Job:
        """A fresh job with a new id; ``headers`` may be the raw request headers (filtered here)."""
        return cls(new_job_id(), service, namespace, Api(api), method.upper(), path, replay_headers(headers), body,
                   time.time() if now is None else now, 0, reservation, policy_version)

    def encode(self) -> bytes:
        return orjson.dumps({
            "v": _FORMAT, "id": self.job_id, "svc": self.service, "ns": self.namespace, "api": self.api.value,
            "m": self.method, "p": self.path, "h": [list(pair) for pair in self.headers], "b": _b64(self.body),
            "t": self.submitted_at, "a": self.attempt, "r": self.reservation, "pv": self.policy_version,
        })

    @classmethod
    def decode(cls, data: bytes) -> Job:
        """Raises ValueError on anything that is not a job we wrote."""
        doc = _load(data)
        try:
            headers = tuple((str(n), str(v)) for n, v in doc["h"])
            job = cls(_id(doc["id"]), str(doc["svc"]), str(doc["ns"]), Api(doc["api"]), str(doc["m"]), str(doc["p"]),
                      headers, _unb64(doc["b"]), float(doc["t"]), int(doc["a"]),
                      None if doc.get("r") is None else str(doc["r"]), str(doc.get("pv") or ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a job record: {exc}") from exc
        return job


@dataclass(frozen=True, slots=True)
class JobResult:
    """What the caller gets when polling: the response exactly as the synchronous call would have returned it."""

    job_id: str
    status: int
    content_type: str
    body: bytes
    completed_at: float
    attempts: int = 0
    error: str = ""  # why it is not a success, for operators; empty for a 2xx/3xx

    def to_doc(self) -> dict[str, Any]:
        return {"v": _FORMAT, "id": self.job_id, "s": self.status, "ct": self.content_type, "b": _b64(self.body),
                "t": self.completed_at, "a": self.attempts, "e": self.error}

    def encode(self) -> bytes:
        return orjson.dumps(self.to_doc())

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> JobResult:
        try:
            return cls(_id(doc["id"]), int(doc["s"]), str(doc["ct"]), _unb64(doc["b"]), float(doc["t"]),
                       int(doc.get("a", 0)), str(doc.get("e") or ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a job result: {exc}") from exc

    @classmethod
    def decode(cls, data: bytes) -> JobResult:
        return cls.from_doc(_load(data))


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """The status bucket's value: lets ``get()`` tell pending from unknown, and carries the owner."""

    state: JobState
    service: str
    namespace: str
    submitted_at: float
    attempts: int = 0
    last_error: str = ""
    queued_at: float = 0.0  # since when it waits (submission or last backoff): the queue-latency metric
    updated_at: float = 0.0
    dead_seq: int = 0  # sequence of its message in the dead-letter stream, for `retry`
    api: str = ""  # the caller's API, to render an error the store itself must answer with

    @property
    def api_of_call(self) -> Api | None:
        """``api`` as an Api; None when absent or unknown (a record written by another version)."""
        try:
            return Api(self.api) if self.api else None
        except ValueError:
            return None

    def encode(self) -> bytes:
        return orjson.dumps({
            "state": self.state.value, "service": self.service, "namespace": self.namespace,
            "submitted_at": self.submitted_at, "attempts": self.attempts, "last_error": self.last_error,
            "queued_at": self.queued_at, "updated_at": self.updated_at, "dead_seq": self.dead_seq, "api": self.api,
        })

    @classmethod
    def decode(cls, data: bytes) -> StatusRecord:
        doc = _load(data, versioned=False)
        try:
            return cls(JobState(doc["state"]), str(doc["service"]), str(doc["namespace"]),
                       float(doc["submitted_at"]), int(doc.get("attempts", 0)), str(doc.get("last_error") or ""),
                       float(doc.get("queued_at", 0.0)), float(doc.get("updated_at", 0.0)),
                       int(doc.get("dead_seq", 0)), str(doc.get("api") or ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a job status: {exc}") from exc


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as the poller and the CLI see it."""

    job_id: str
    state: JobState
    service: str
    namespace: str
    submitted_at: float
    attempts: int
    last_error: str
    updated_at: float = 0.0
    result: JobResult | None = field(default=None)
    api: Api | None = None  # the API of the submitted call (None for records older than this field)

    def owned_by(self, service: str, namespace: str) -> bool:
        """Results are only for the service that submitted the job; others must get a 404, not a 403."""
        return self.service == service and self.namespace == (namespace or "")

    def failure(self) -> ApiError | None:
        """For a dead job: the error to answer a poll with, to render in the job's own API format (``api``):
        the format its submitter reads, whatever headers its poll happens to carry."""
        if self.state != JobState.DEAD:
            return None
        return ApiError(ErrorKind.UNAVAILABLE, f"the asynchronous job failed after {self.attempts} attempt(s): "
                        f"{self.last_error or 'unknown error'}", "job_failed")


def _id(value: object) -> str:
    if not isinstance(value, str) or not JOB_ID_RE.match(value):
        raise ValueError(f"bad job id {value!r}")
    return value


def _load(data: bytes, versioned: bool = True) -> dict[str, Any]:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if versioned and doc.get("v") != _FORMAT:
        raise ValueError(f"unknown record format {doc.get('v')!r}")
    return doc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("body is not base64 text")
    return base64.b64decode(text, validate=True)
