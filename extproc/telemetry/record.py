"""One AI call as telemetry sees it: the single record every sink (metrics, access log, trace,
usage event) is built from, so they can never disagree about a call.

A record is produced once per AI call, on whichever replica saw the call end: by the response
side (``Settlement``) for forwarded calls, by the decision for calls answered locally (refusals,
cache hits). Content (prompt, completion) is present only when the operator enabled capture, and
is redacted before any sink sees it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from extproc.telemetry.redact import Redactor


@dataclass(frozen=True, slots=True)
class Hop:
    """One provider attempt of a call, in order; the last one answered (or failed) the call."""

    provider: str
    model: str
    outcome: str  # "ok", or why we moved on: "status_503", "status_429", "timeout", "reset", "breaker_open", ...
    started_at: float = 0.0  # epoch seconds, 0 when unknown


@dataclass(frozen=True, slots=True)
class CallRecord:
    # who
    service: str
    namespace: str
    # what
    operation: str  # "chat_completions", "messages", "embeddings"
    caller_api: str  # the API format the caller spoke: "openai" or "anthropic"
    requested_model: str  # the model name the caller asked for (policy model name or alias)
    route: str  # the policy model entry that served it
    provider: str  # provider of the final hop ("" when never forwarded), as the policy names it
    response_model: str  # model of the final hop
    # outcome
    status: int  # HTTP status the caller received
    outcome: str  # "ok", "error", "cut" (stream ended early), "refused:<code>", "cache_hit"
    streamed: bool
    # usage
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    usage_reported: bool = False  # False: tokens are an estimate
    cost_usd: float = 0.0
    # timing (epoch seconds; durations derived)
    started_at: float = 0.0
    ended_at: float = 0.0
    first_byte_at: float | None = None
    # policy effects
    cache: str = ""  # "hit", "miss" or "" when the cache was not consulted
    variant: str = ""
    hops: Sequence[Hop] = field(default=())  # fallback attempts; empty when the first provider answered
    policy_version: str = ""
    # correlation
    request_id: str = ""
    traceparent: str = ""  # W3C traceparent as received (Envoy/Istio propagate it), or ""
    b3: str = ""  # single-header B3, or "" (x-b3-* multi-headers are folded into this form)
    # content: None unless capture is enabled; already redacted when set
    prompt: str | None = None
    completion: str | None = None
    error: str = ""  # short error type/message for failed calls, never content
    # the final hop's provider as OpenTelemetry GenAI names its API ("aws.bedrock", "azure.ai.openai", ...),
    # "" when never forwarded
    genai_provider: str = ""

    @property
    def duration_s(self) -> float:
        return max(0.0, self.ended_at - self.started_at) if self.started_at else 0.0

    @property
    def ttft_s(self) -> float | None:
        if self.first_byte_at is None or not self.started_at:
            return None
        return max(0.0, self.first_byte_at - self.started_at)


class CallSink(Protocol):
    """Receives every finished call. Must not block or raise: the AI call has already happened."""

    def emit(self, record: CallRecord) -> None: ...


class CallTelemetry(CallSink, Protocol):
    """What the call path holds as its telemetry (``telemetry.Telemetry``): the sink every record goes
    to, plus what producers need to fill a record.

    ``sinks``: the sinks behind it; none means no record is wanted, so a call need not be read to its
    end just for one. ``capture_content``: whether records carry prompt/completion at all;
    ``redactor``: applied to that content at the source, before any sink sees it.
    """

    @property
    def sinks(self) -> Sequence[CallSink]: ...

    @property
    def redactor(self) -> Redactor: ...

    @property
    def capture_content(self) -> bool: ...
