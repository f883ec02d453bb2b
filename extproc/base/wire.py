"""The wire contract between Envoy, the processor, the relay, the egress gateway and the worker.

Every header name, dynamic-metadata key and path that two of them must agree on is defined here and
only here; the tokens that travel in them each have one codec, next to their type (fallback.HopState,
settlement.SettleInfo, grants.Grant, jobs.claim.JobClaim).
"""

from __future__ import annotations

# --- dynamic metadata (the decision's answer, read by Envoy's header formatters and the usage stream) ---
METADATA_NAMESPACE = "ai.extproc"
SETTLE_KEY = "settle"  # the sealed SettleInfo: what the response side needs
FALLBACK_STATE_KEY = "fallback_state"  # the signed HopState, put on the relay's attempt only

# --- request headers the processor sets for Envoy (callers' copies are removed or ignored) ---
# Which response-side filter runs for this call (filter.usage_filter matches on it):
USAGE_HEADER = "x-ai-usage"
USAGE_OBSERVE = "observe"  # read the response without touching it (settle, cache, record)
USAGE_STRIP = "strip"  # also remove the usage chunk we asked for on the caller's behalf
USAGE_TRANSLATE = "translate"  # the provider speaks another API than the caller: rewrite the response
# Marks a call Envoy may retry to the relay; a provider's attempt carries only FALLBACK_MARKER, the
# relay's the signed state (filter.failover_protocol_options).
FALLBACK_HEADER = "x-ai-fallback"
FALLBACK_MARKER = "1"
TIMEOUT_HEADER = "x-envoy-upstream-rq-timeout-ms"
PER_TRY_TIMEOUT_HEADER = "x-envoy-upstream-rq-per-try-timeout-ms"  # Envoy ignores it once the response started
RETRIABLE_CODES_HEADER = "x-envoy-retriable-status-codes"
# The single-use grant the egress gateway trades for the provider key (grants.Grant).
GRANT_HEADER = "x-ai-grant"

# --- headers callers may send ---
CACHE_HEADER = "x-ai-cache"  # "bypass": neither read nor write the cache for this call
ASYNC_HEADER = "x-ai-async"  # "true": an asynchronous call, for clients that cannot set Prefer
JOB_HEADER = "x-ai-job"  # the worker's signed claim that it executes a job (jobs.claim.JobClaim)
JOBS_PATH = "/v1/ai-jobs/"  # GET /v1/ai-jobs/<id>: a job's result, answered by the processor

# --- what the processor's own sidecar tells it ---
XFCC_HEADER = "x-forwarded-client-cert"  # the caller's verified mTLS identity

# --- response headers the caller sees ---
FALLBACK_HOPS_HEADER = "x-ai-fallback-hops"
