"""The record of a call the processor answered itself, and the trace context a call carries."""

from __future__ import annotations

import time
from collections.abc import Mapping

from extproc.base.apis import Endpoint
from extproc.core.identity import Caller
from extproc.core.messages import HttpRequest, LocalReply
from extproc.policy.compiled import PolicySet
from extproc.telemetry.metrics import genai_provider
from extproc.telemetry.record import CallRecord

# Calls the processor answers itself that are not refusals: served from the cache, or queued as a job.
_LOCAL_OUTCOMES = {"cache_hit": "cache_hit", "job_accepted": "queued"}


def reply_record(request: HttpRequest, caller: Caller, endpoint: Endpoint, reply: LocalReply, policy: PolicySet,
                 requested: str) -> CallRecord:
    """The record of a call answered by the processor itself: refused, or served from the cache."""
    now = time.time()
    headers = dict(reply.headers)
    code = reply.details.removeprefix("ai_")
    provider = headers.get("x-ai-provider", "")
    return CallRecord(
        service=caller.service or "", namespace=caller.namespace or "", operation=endpoint.operation,
        caller_api=str(endpoint.api), requested_model=requested, route=headers.get("x-ai-route", ""),
        provider=provider, genai_provider=genai_provider(policy, provider),
        response_model=headers.get("x-ai-model", ""),
        status=reply.status, outcome=_LOCAL_OUTCOMES.get(code, f"refused:{code}"),
        streamed=headers.get("content-type", "").startswith("text/event-stream"), started_at=now, ended_at=now,
        cache="hit" if code == "cache_hit" else "", variant=headers.get("x-ai-variant", ""),
        hops=reply.hops,
        policy_version=policy.version, request_id=request.headers.get("x-request-id", ""),
        traceparent=request.headers.get("traceparent", ""), b3=b3_of(request.headers),
        error="" if code in _LOCAL_OUTCOMES else code)


def b3_of(headers: Mapping[str, str]) -> str:
    """The B3 trace context in its single-header form, from either B3 encoding."""
    single = headers.get("b3", "")
    if single:
        return single
    trace, span = headers.get("x-b3-traceid", ""), headers.get("x-b3-spanid", "")
    if not (trace and span):
        return ""
    sampled = headers.get("x-b3-sampled", "")
    return "-".join(part for part in (trace, span, sampled) if part)
