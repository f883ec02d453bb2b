"""The policy schema: what a policy file may say.

One pydantic model is the single source of truth for the file loader today and for the
``AIPolicy``/``AIProvider`` CRD schemas later (their OpenAPI schema is generated from it).
All models are frozen: a loaded policy is never mutated, only replaced.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from extproc.policy.units import Rate, duration_range_error, parse_duration_ms, parse_rate

ApiSchema = Literal["openai", "anthropic"]

_NAME = r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$"
_HEADER = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
# A model timeout longer than this is almost certainly a bare number meant as milliseconds.
_MAX_TIMEOUT_MS = 600_000
_MAX_TIMEOUT_TEXT = "10m"


def _duration(value: object) -> int:
    return parse_duration_ms(value)


def _duplicate(message: str, loc: tuple[str | int, ...], **context: object) -> PydanticCustomError:
    """A cross-item error (e.g. a name listed twice) that knows where, below the validated model, it is.

    A model validator's errors are located at the model itself; the loader appends ``ctx['loc']``
    so the problem points at the offending item's line (``ai_proxy.models[1].name``), not the list's.
    """
    return PydanticCustomError("duplicate", message, {**context, "loc": loc})


DurationMs = Annotated[int, BeforeValidator(_duration), PlainSerializer(lambda v: f"{v}ms", return_type=str)]
RateSpec = Annotated[Rate, BeforeValidator(parse_rate), PlainSerializer(str, return_type=str)]
Name = Annotated[str, Field(pattern=_NAME, min_length=1, max_length=253)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class CredentialSource(_Frozen):
    """Where a provider's API key comes from. Exactly one of ``env`` or ``file``."""

    env: str | None = Field(default=None, description="Environment variable holding the key.")
    file: str | None = Field(default=None, description="File holding the key (e.g. a mounted Secret).")

    @model_validator(mode="after")
    def _exactly_one(self) -> CredentialSource:
        if (self.env is None) == (self.file is None):
            raise ValueError("set exactly one of 'env' or 'file'")
        return self


class Provider(_Frozen):
    """An AI provider reachable from the mesh."""

    name: Name
    api: ApiSchema = Field(description="Wire format the provider speaks.")
    base_url: str = Field(description="API root as the sidecar sees it, e.g. http://api.openai.com/v1.")
    credential: CredentialSource | None = Field(
        default=None, description="API key source; omit for in-mesh model servers that need none."
    )
    anthropic_version: str = Field(default="2023-06-01", description="Sent when the caller sent none.")

    @field_validator("base_url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL such as http://api.openai.com/v1")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number in 0..65535
        except ValueError:
            raise ValueError("has an invalid port: use a number from 1 to 65535") from None
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return value.rstrip("/")

    @property
    def authority(self) -> str:
        """Host (and port if not the scheme default): what Envoy routes on."""
        parts = urlsplit(self.base_url)
        default_port = 443 if parts.scheme == "https" else 80
        host = parts.hostname or ""
        return host if parts.port in (None, default_port) else f"{host}:{parts.port}"

    @property
    def base_path(self) -> str:
        return urlsplit(self.base_url).path.rstrip("/")


# Known without a providers file, so that a service's policy works alone (`extproc check` on a seed file);
# a platform providers file that names one of these replaces it. Keys come from the conventional variables.
BUILTIN_PROVIDERS: tuple[Provider, ...] = (
    Provider(name="openai", api="openai", base_url="http://api.openai.com/v1",
             credential=CredentialSource(env="OPENAI_API_KEY")),
    Provider(name="anthropic", api="anthropic", base_url="http://api.anthropic.com/v1",
             credential=CredentialSource(env="ANTHROPIC_API_KEY")),
    Provider(name="claude", api="anthropic", base_url="http://api.anthropic.com/v1",
             credential=CredentialSource(env="ANTHROPIC_API_KEY")),
)


_PATH_PATTERN = r"^/[A-Za-z0-9._~!$&'()+,;=:@%/*-]*$"
_METHOD = r"^(GET|POST|PUT|PATCH|DELETE|HEAD)$"


class AllowedPath(_Frozen):
    """A provider path outside the governed AI endpoints that a service may call (files, batches, ...)."""

    path: str = Field(pattern=_PATH_PATTERN, description="Path pattern; '*' matches within a segment and '**' "
                      "across segments, e.g. /v1/files/** or /v1/batches/*.")
    methods: tuple[Annotated[str, Field(pattern=_METHOD)], ...] = Field(
        default=("GET", "POST"), min_length=1, description="HTTP methods allowed on it.")
    provider: Name = Field(description="The provider whose credential the call gets.")


class Variant(_Frozen):
    """One arm of an A/B split. Provider and model default to the model entry's own."""

    name: Name
    weight: int = Field(ge=0, le=1_000_000)
    provider: Name | None = None
    model: str | None = Field(default=None, min_length=1)


def _listify(value: object) -> object:
    return [value] if isinstance(value, str | dict) else value


def _token_limit(value: object) -> object:
    return {"rate": value} if isinstance(value, str) else value


class TokenLimit(_Frozen):
    """Tokens per window, e.g. ``{rate: 20000/min, type: total}`` or just ``20000/min``."""

    rate: RateSpec
    type: Literal["input", "output", "total"] = "total"


class CostLimit(_Frozen):
    """Spend per calendar day or month (UTC), in USD, from the price table."""

    usd: float = Field(gt=0)
    per: Literal["day", "month"]


class Limits(_Frozen):
    """Quotas for one scope (a service, one of its models, or its use of one provider).

    Windows are fixed and aligned in UTC: ``/min`` windows start on the minute, ``/hour`` on the hour,
    ``/day`` at midnight UTC, ``30/5m`` on multiples of five minutes since the epoch, cost months on
    the first of the month. A call is admitted only if every applicable counter stays within its limit.
    """

    requests: Annotated[tuple[RateSpec, ...], BeforeValidator(_listify)] = ()
    tokens: Annotated[tuple[Annotated[TokenLimit, BeforeValidator(_token_limit)], ...],
                      BeforeValidator(_listify)] = ()
    cost: Annotated[tuple[CostLimit, ...], BeforeValidator(_listify)] = ()

    @property
    def empty(self) -> bool:
        return not (self.requests or self.tokens or self.cost)


class CacheOptions(_Frozen):
    """How a model's responses may be cached (the TTL is ``cache_ttl``)."""

    share_as: Name | None = Field(
        default=None, description="Share entries with every service that names the same pool; default: this "
        "service only.")
    nondeterministic: bool = Field(
        default=False, description="Also cache calls that are not deterministic (temperature absent or > 0).")


def _fallback_target(value: object) -> object:
    if isinstance(value, str) and "/" in value:
        provider, _, model = value.partition("/")
        return {"provider": provider, "model": model}
    return value


class FallbackTarget(_Frozen):
    """The next provider and model to try when the previous one fails (``provider/model`` also accepted)."""

    provider: Name
    model: str = Field(min_length=1)

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


class BreakerSettings(_Frozen):
    """A circuit breaker per (service, provider, model): stop sending calls to a target that keeps failing."""

    enabled: bool = True
    consecutive_failures: int = Field(default=5, ge=1, description="Open after this many failures in a row.")
    error_rate: float = Field(default=0.5, gt=0, le=1, description="Or open when this share of calls in the "
                              "window failed...")
    min_calls: int = Field(default=20, ge=1, description="...once the window holds at least this many calls.")
    window: DurationMs = Field(default=30_000, description="Error-rate window, e.g. 30s.")
    open_for: DurationMs = Field(default=30_000, description="How long an open breaker refuses calls before "
                                 "letting one probe through (half-open).")


class ModelRoute(_Frozen):
    """One model a service may call, under a logical ``name``."""

    name: str = Field(min_length=1, max_length=253, description="Logical name the service asks for.")
    provider: Name
    model: str = Field(min_length=1, description="Model name sent to the provider.")
    purpose: str | None = None
    rate_limit: RateSpec | None = Field(default=None, description="e.g. 100/min (enforced by the quota engine).")
    cache_ttl: DurationMs | None = Field(default=None, description="Cache identical calls this long, e.g. 3600 "
                                         "(seconds) or 1h; omit to never cache.")
    cache: CacheOptions = CacheOptions()
    timeout: DurationMs | None = Field(default=None, description="Upstream timeout, e.g. 2000ms.")
    variants: tuple[Variant, ...] = Field(default=(), description="Weighted A/B split; empty = no split.")
    sticky_header: str | None = Field(
        default=None, description="Request header whose value pins a caller to one variant (e.g. x-user-id)."
    )
    limits: Limits | None = Field(default=None, description="Quotas narrowed to this model.")
    first_byte_timeout: DurationMs | None = Field(
        default=None, description="Per attempt: a provider that has not started answering within this time is "
        "abandoned for the next fallback (or the call fails), e.g. 1500ms.")
    fallback: tuple[Annotated[FallbackTarget, BeforeValidator(_fallback_target)], ...] = Field(
        default=(), description="Tried in order, within the same call, when the provider fails: connection "
        "failure or reset, 5xx, 429, first-byte timeout, an open circuit breaker. The caller's API format is kept "
        "(OpenAI and Anthropic are translated both ways).")
    fallback_on_context_length: bool = Field(
        default=False, description="Also fall back on a 400 (e.g. the prompt exceeds the model's context window): "
        "list a model with a larger window. Any 400 then moves on; the last one is returned.")
    circuit_breaker: BreakerSettings | None = Field(
        default=None, description="Per model; default: the mesh's resilience.circuit_breaker for models with a "
        "fallback (without one, set it here to fail fast while the provider is down).")

    def breaker(self, mesh_default: BreakerSettings) -> BreakerSettings | None:
        """The breaker guarding this model's targets: its own, else the mesh default when it has a
        fallback to send calls to while open; none otherwise."""
        if self.circuit_breaker is not None:
            return self.circuit_breaker
        return mesh_default if self.fallback else None

    @field_validator("timeout", "first_byte_timeout", mode="wrap")
    @classmethod
    def _sane_timeout(cls, value: object, handler: ValidatorFunctionWrapHandler) -> int | None:
        # Wraps the parsing so the message can depend on how the value was written (2000 vs 20m).
        ms: int | None = handler(value)  # the fields' own type
        if ms is not None and not 0 < ms <= _MAX_TIMEOUT_MS:
            raise ValueError(duration_range_error(value, ms, _MAX_TIMEOUT_MS, _MAX_TIMEOUT_TEXT))
        return ms

    @field_validator("sticky_header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        if value is not None and not _HEADER.match(value.lower()):
            raise ValueError(f"{value!r} is not a valid HTTP header name")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _split(self) -> ModelRoute:
        if self.variants:
            first: dict[str, int] = {}
            for j, variant in enumerate(self.variants):
                if variant.name in first:
                    raise _duplicate("variant names must be unique ({name} is also variants[{first}])",
                                    ("variants", j, "name"), name=repr(variant.name), first=first[variant.name])
                first[variant.name] = j
            if sum(v.weight for v in self.variants) == 0:
                raise ValueError("variant weights must not all be zero")
        elif self.sticky_header:
            raise ValueError("sticky_header needs variants")
        if self.fallback_on_context_length and not self.fallback:
            raise ValueError("fallback_on_context_length needs a fallback list")
        if self.first_byte_timeout is not None and self.timeout is not None and self.first_byte_timeout > self.timeout:
            raise ValueError("first_byte_timeout must not exceed timeout")
        return self


class AsyncLimits(_Frozen):
    """Bounds on a service's asynchronous calls (``Prefer: respond-async``)."""

    max_queued: int | None = Field(default=None, ge=1, description="Jobs not yet finished (queued, backing "
                                   "off or running); more get a 429 job_queue_full. Default: the job store's (1000).")
    max_body_bytes: int | None = Field(default=None, ge=1, description="Largest request body of one job; larger "
                                       "gets a 413 job_too_large. Default: the job store's (512 KiB).")


_ACCOUNT = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class AIProxy(_Frozen):
    models: tuple[ModelRoute, ...] = Field(min_length=1)
    allow_paths: tuple[AllowedPath, ...] = Field(
        default=(), description="Provider paths beyond the AI endpoints this service may call (denied by "
        "default): they get the provider's credential, the service's request limits and a usage event each.")
    service_accounts: tuple[Annotated[str, Field(pattern=_ACCOUNT)], ...] | None = Field(
        default=None, description="The mTLS identities (Kubernetes service accounts, 'name' in the service's own "
        "namespace or 'namespace/name') that may act as this service. Default: the service account named like the "
        "service. Checked when the processor verifies callers' peer certificates (--peer-identity xfcc).")
    limits: Limits | None = Field(default=None, description="Quotas for the whole service.")
    provider_limits: dict[Name, Limits] = Field(
        default_factory=dict, description="Quotas narrowed to the service's use of one provider."
    )
    on_quota_backend_failure: Literal["open", "closed"] | None = Field(
        default=None, description="When the shared quota store is down: admit against a local backstop "
        "limiter (open) or refuse with 503 (closed). Default: the mesh setting.",
    )
    max_in_flight: int | None = Field(
        default=None, ge=1, description="Bulkhead: at most this many of the service's AI calls at once (per "
        "processor replica); more get a 429 in the caller's format. Default: the mesh setting.")
    on_processor_failure: Literal["open", "closed"] | None = Field(
        default=None, description="When the processor cannot be reached: let calls pass untouched (open) or "
        "answer 503 (closed). Applied in the service's sidecar. Default: the mesh setting.")
    async_calls: AsyncLimits = Field(default_factory=AsyncLimits,
                                     description="Limits on the service's asynchronous calls.")

    @model_validator(mode="after")
    def _unique(self) -> AIProxy:
        seen: set[str] = set()
        for i, model in enumerate(self.models):
            if model.name in seen:
                raise _duplicate("model name {name} is listed twice", ("models", i, "name"), name=repr(model.name))
            seen.add(model.name)
        return self


class ServicePolicy(_Frozen):
    """A service's own policy: the per-service YAML shape, accepted as written."""

    service: Name
    namespace: Name | None = Field(default=None, description="Restrict to one namespace; omit for any.")
    ai_proxy: AIProxy


class IdentitySettings(_Frozen):
    header: str = Field(
        default="x-ai-service",
        description="Request header that may name the calling service (as 'service' or 'namespace/service').",
    )
    trust_header: bool = Field(
        default=False,
        description="Honour that header. Only for callers you trust (e.g. a shared gateway in front of the "
        "processor); when false the header is stripped and ignored, so nobody can spoof another service.",
    )

    @field_validator("header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _HEADER.match(value.lower()):
            raise ValueError(f"{value!r} is not a valid HTTP header name")
        return value.lower()


class QuotaSettings(_Frozen):
    backend: Literal["memory", "redis"] = Field(
        default="memory", description="memory: per replica; redis: shared by all replicas, exact."
    )
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = Field(default="aiq", pattern=r"^[A-Za-z0-9_.:-]+$")
    timeout_ms: int = Field(default=500, ge=1, le=10_000, description="Per Redis operation.")
    on_backend_failure: Literal["open", "closed"] = "open"
    default_max_output_tokens: int = Field(
        default=4096, ge=1, description="Output reservation for calls that set no max_tokens."
    )


class CacheSettings(_Frozen):
    backend: Literal["memory", "redis"] = Field(
        default="memory", description="memory: per replica; redis: entries shared by all replicas."
    )
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = Field(default="aic", pattern=r"^[A-Za-z0-9_.:-]+$")
    timeout_ms: int = Field(default=500, ge=1, le=10_000)
    max_entries: int = Field(default=10_000, ge=1, description="Memory store: least recently used go first.")
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, description="Memory store: total size bound.")
    max_entry_bytes: int = Field(default=1024 * 1024, ge=256, description="Larger responses are not cached.")
    charge_hits: bool = Field(
        default=False, description="Count hits against request/token/cost quotas as if the provider answered.")


class Price(_Frozen):
    """USD per million tokens for one provider's model (overrides the shipped table)."""

    provider: Name
    model: str = Field(min_length=1)
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cached_input_per_mtok: float | None = Field(default=None, ge=0)


class ResilienceSettings(_Frozen):
    circuit_breaker: BreakerSettings = BreakerSettings()
    max_in_flight: int | None = Field(
        default=None, ge=1, description="Default bulkhead for services whose policy sets none; omit for none.")
    on_processor_failure: Literal["open", "closed"] = Field(
        default="closed", description="Default for every service's sidecar when the processor is unreachable.")
    default_timeout: DurationMs = Field(
        default=120_000, description="Whole-call timeout (fallbacks included) for models that set none, e.g. 120s; "
        "a hung provider never holds a caller, a bulkhead slot or a reservation longer than this.")

    @field_validator("default_timeout")
    @classmethod
    def _bounded_default_timeout(cls, value: int) -> int:
        if not 0 < value <= _MAX_TIMEOUT_MS:
            raise ValueError(f"must be between 1ms and {_MAX_TIMEOUT_TEXT}")
        return value


class MeshSettings(_Frozen):
    """Mesh-wide behaviour, set by the platform team."""

    unknown_service: Literal["deny", "default"] = Field(
        default="deny", description="Callers with no policy: deny, or use default_policy."
    )
    default_policy: AIProxy | None = None
    unknown_paths: Literal["pass", "deny"] = Field(
        default="deny", description="Paths on an AI host that no AI endpoint and no allow_paths entry covers: "
        "deny (403 in the caller's format) or pass through untouched (ungoverned: not for production)."
    )
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    identity: IdentitySettings = IdentitySettings()
    credential_injection: Literal["sidecar", "gateway"] = Field(
        default="sidecar", description="Where provider credentials are added: by the caller's sidecar (standalone, "
        "or single-tenant development clusters), or only at the egress gateway, which trades the decision's "
        "signed single-use grant for the key (the Istio install: no key ever reaches an application's pod).")
    cluster_domain: str = Field(
        default="cluster.local", pattern=r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$",
        description="The Kubernetes cluster domain: a provider host under .svc.<cluster_domain> (or .svc) is an "
        "in-mesh model server, reached directly rather than through the egress gateway.")
    default_limits: Limits | None = Field(
        default=None, description="Service-wide quotas for services whose policy sets no limits."
    )
    quota: QuotaSettings = QuotaSettings()
    cache: CacheSettings = CacheSettings()
    resilience: ResilienceSettings = ResilienceSettings()

    @model_validator(mode="after")
    def _default_present(self) -> MeshSettings:
        if self.unknown_service == "default" and self.default_policy is None:
            raise ValueError("unknown_service: default needs a default_policy")
        return self


class MeshConfig(_Frozen):
    """The mesh document: providers and mesh-wide settings."""

    mesh: MeshSettings = MeshSettings()
    providers: tuple[Provider, ...] = ()
    prices: tuple[Price, ...] = ()
