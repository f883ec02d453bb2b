"""Prometheus metrics for every decision and every settled response.

Names follow the OpenTelemetry GenAI semantic conventions in their Prometheus form
(``gen_ai.client.token.usage`` → ``gen_ai_client_token_usage``). Label values come from the
active policy only (its services, models and providers); anything else is folded into ``other``,
so a misbehaving caller cannot blow up the series count.

A provider is named twice: ``gen_ai_provider_name`` is the GenAI convention's value for its API
(``openai``, ``anthropic``, ``azure.ai.openai``, ``aws.bedrock``, ``gcp.gemini``, ``gcp.vertex_ai``),
``provider`` the name the policy gave it (``claude``, ``my-bedrock``), which is what an operator
configured and what breakers and fallbacks are keyed on.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from extproc.base.apis import GENAI_PROVIDER
from extproc.policy.compiled import PolicySet

OTHER = "other"
_TOKEN_BUCKETS = tuple(4.0 ** i for i in range(14))  # 1 .. 67M, as Envoy AI Gateway uses
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPOT_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_PHASE_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        caller = ["service", "namespace"]
        providers = ["gen_ai_provider_name", "provider"]  # the GenAI value of its API, the policy's name
        genai = ["gen_ai_operation_name", *providers, "gen_ai_request_model", "gen_ai_response_model"]
        self.calls = Counter("ai_extproc_calls", "AI calls decided, by outcome (forwarded, cache_hit or the "
                             "refusal code).", [*caller, *providers, "gen_ai_request_model", "outcome"],
                             registry=r)
        self.quota_rejections = Counter("ai_extproc_quota_rejections", "Calls refused by a quota, by the kind of "
                                        "limit that tripped.", [*caller, "limit"], registry=r)
        self.cache_lookups = Counter("ai_extproc_cache_lookups", "Response cache lookups.", [*caller, "result"],
                                     registry=r)
        self.tokens = Histogram("gen_ai_client_token_usage", "Tokens used per call, as the provider reported them "
                                "(estimated for cut streams).", [*caller, *genai, "gen_ai_token_type"],
                                buckets=_TOKEN_BUCKETS, registry=r)
        self.cost = Counter("ai_extproc_cost_usd", "Spend in USD from the price table.",
                            [*caller, *providers, "gen_ai_response_model"], registry=r)
        self.duration = Histogram("gen_ai_server_request_duration_seconds", "From the decision to the end of the "
                                  "response.", [*caller, *genai, "status"], buckets=_SECONDS, registry=r)
        self.ttft = Histogram("gen_ai_server_time_to_first_token_seconds", "From the decision to the first "
                              "response byte of a streamed call.", [*caller, *genai], buckets=_SECONDS, registry=r)
        self.phase = Histogram("ai_extproc_processing_seconds", "Time spent inside the processor per ext_proc "
                               "stream, by phase.", ["phase"], buckets=_PHASE_SECONDS, registry=r)
        self.in_flight = Gauge("ai_extproc_streams_in_flight", "Open ext_proc streams, by kind.", ["kind"],
                               registry=r)
        self.tpot = Histogram("gen_ai_server_time_per_output_token_seconds", "Mean time per output token after "
                              "the first, for streamed calls.", [*caller, *genai], buckets=_TPOT_SECONDS, registry=r)
        # Resilience: fallback hops, circuit breakers and bulkheads (docs/design/fallback.md).
        self.fallbacks = Counter("ai_extproc_fallbacks", "Fallback hops taken: the provider left, the one tried "
                                 "next, and why.", [*caller, "from_provider", "to_provider", "reason"], registry=r)
        self.breaker_state = Gauge("ai_extproc_breaker_state", "Circuit breaker state per service, provider and "
                                   "model: 0 closed, 1 half-open, 2 open.", [*caller, *providers,
                                                                           "gen_ai_request_model"], registry=r)
        self.bulkhead_rejections = Counter("ai_extproc_bulkhead_rejections", "Calls refused because the service "
                                           "had too many AI calls in flight.", caller, registry=r)
        self.calls_swept = Counter("ai_extproc_calls_swept", "Admitted calls whose end was never seen (caller "
                                   "gone, response lost): slot and reservation released after their deadline.",
                                   registry=r)
        self.identity_refusals = Counter("ai_extproc_identity_refusals", "Calls refused because the caller's "
                                         "claimed identity did not match its mTLS peer (mismatch) or no verified "
                                         "peer came with it (no_peer).", ["reason"], registry=r)
        self.tokens_refused = Counter("ai_extproc_tokens_refused", "Signed tokens refused: forged, expired, "
                                      "replayed or of another caller.", ["kind"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class CallLabels:
    """Label values for one call, bounded by the policy in force."""

    service: str
    namespace: str
    genai_provider: str  # gen_ai_provider_name: the GenAI convention's value for the provider's API
    provider: str  # provider: the policy's name for it
    request_model: str
    response_model: str

    @classmethod
    def of(cls, policy: PolicySet, *, service: str | None, namespace: str | None, provider: str | None = None,
           request_model: str | None = None, response_model: str | None = None) -> CallLabels:
        known = service in policy.known_services
        configured = _bounded(provider, policy.providers)
        return cls(
            service if known and service else OTHER,
            (namespace or "") if known else OTHER,
            genai_provider(policy, configured) or configured,  # "" and "other" as the name is
            configured,
            _bounded(request_model, policy.model_names),
            _bounded(response_model, policy.model_names),
        )

    @property
    def caller(self) -> tuple[str, str]:
        return self.service, self.namespace

    @property
    def providers(self) -> tuple[str, str]:
        """``gen_ai_provider_name`` and ``provider``, in label order."""
        return self.genai_provider, self.provider

    def genai(self, operation: str) -> tuple[str, str, str, str, str]:
        """The GenAI labels of the token and latency histograms, in label order."""
        return operation, *self.providers, self.request_model, self.response_model


def bounded(policy: PolicySet, provider: str) -> str:
    """A provider name as a label value: one the policy defines, else ``other``."""
    return _bounded(provider, policy.providers)


def genai_provider(policy: PolicySet, provider: str | None) -> str:
    """The OpenTelemetry GenAI ``gen_ai.provider.name`` of a provider the policy defines (``aws.bedrock``
    for a bedrock provider, whatever its name); "" when the policy has no such provider."""
    found = policy.providers.get(provider) if provider else None
    return GENAI_PROVIDER.get(str(found.api), OTHER) if found is not None else ""


def _bounded(value: str | None, known: Collection[str]) -> str:
    if value is None:
        return ""
    return value if value in known else OTHER


class TokenCounts(Protocol):
    """What a provider reported a call used (core.usage.Usage)."""

    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def cached_input_tokens(self) -> int: ...
    @property
    def reasoning_tokens(self) -> int: ...


def record_usage(metrics: Metrics, labels: CallLabels, operation: str, usage: TokenCounts) -> None:
    genai = labels.genai(operation)
    for kind, value in (("input", usage.input_tokens), ("output", usage.output_tokens),
                        ("cached_input", usage.cached_input_tokens), ("reasoning", usage.reasoning_tokens)):
        if value or kind in ("input", "output"):
            metrics.tokens.labels(*labels.caller, *genai, kind).observe(value)
