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

ApiSchema = Literal["openai", "anthropic", "azure_openai", "bedrock", "gemini", "vertex", "openai_compatible"]

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


CredentialType = Literal["api_key", "entra_id", "aws", "google"]
# What each provider API can authenticate with; the first is what a bare {env|file} means.
CREDENTIAL_TYPES: dict[str, tuple[str, ...]] = {
    "openai": ("api_key",),
    "anthropic": ("api_key",),
    "openai_compatible": ("api_key",),
    "azure_openai": ("api_key", "entra_id"),
    "gemini": ("api_key",),
    "bedrock": ("aws",),
    "vertex": ("google",),
}
# The providers whose entry is incomplete without a credential (an in-mesh server may need none).
CREDENTIAL_REQUIRED = frozenset({"azure_openai", "bedrock", "gemini", "vertex"})
AZURE_V1 = "v1"  # api_version selecting Azure's v1 paths (/openai/v1/..., the model in the body)
_REGION = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-[0-9]$")
# Google's rule for project ids; the id goes into the request path, so nothing else may pass.
_GOOGLE_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_GOOGLE_LOCATION = re.compile(r"^(global|[a-z]+-[a-z]+[0-9])$")


class CredentialSource(_Frozen):
    """Where a provider's credential comes from.

    ``api_key`` (the default) and ``entra_id`` (an Azure Entra ID bearer token that the platform keeps
    fresh in a mounted file) read exactly one of ``env`` or ``file``. ``aws`` uses the standard AWS chain
    (environment, web identity token file for IRSA, instance or container role; ``profile`` picks a
    shared-config profile). ``google`` uses the service-account key in ``file``, or Application Default
    Credentials (GKE workload identity) when no file is given.
    """

    type: CredentialType = Field(default="api_key", description="api_key, entra_id, aws or google.")
    env: str | None = Field(default=None, description="Environment variable holding the key.")
    file: str | None = Field(default=None, description="File holding the key or token (e.g. a mounted Secret); "
                             "for type google, a service-account key file.")
    profile: str | None = Field(default=None, description="type aws only: the shared-config profile to use.")

    @model_validator(mode="after")
    def _one_source(self) -> CredentialSource:
        if self.type in ("api_key", "entra_id"):
            if (self.env is None) == (self.file is None):
                raise ValueError("set exactly one of 'env' or 'file'")
        elif self.env is not None or (self.type == "aws" and self.file is not None):
            allowed = "'profile'" if self.type == "aws" else "'file' (a service-account key)"
            raise ValueError(f"a {self.type} credential comes from its own chain: set only {allowed}, or nothing")
        if self.profile is not None and self.type != "aws":
            raise ValueError("'profile' applies to type aws only")
        return self


def _default_base_url(api: str, region: str | None, location: str | None) -> str:
    """Bedrock, Gemini and Vertex AI have one public endpoint per region or location (plain HTTP to the
    sidecar, which originates TLS)."""
    if api == "bedrock" and region:
        return f"http://bedrock-runtime.{region}.amazonaws.com"
    if api == "gemini":
        return "http://generativelanguage.googleapis.com"
    if api == "vertex" and location:
        return f"http://{'' if location == 'global' else location + '-'}aiplatform.googleapis.com"
    return ""


def _provider_problem(message: str, field: str) -> PydanticCustomError:
    """A provider entry's problem located at ``field`` (which may be missing: its line is then the entry's)."""
    return _duplicate(message, (field,))


class Provider(_Frozen):
    """An AI provider reachable from the mesh."""

    name: Name
    api: ApiSchema = Field(description="Wire format the provider speaks.")
    base_url: str = Field(default="", description="API root as the sidecar sees it, e.g. http://api.openai.com/v1. "
                          "Bedrock, Gemini and Vertex AI default to their public endpoint for the region or location.")
    credential: CredentialSource | None = Field(
        default=None, description="Credential source; omit for in-mesh model servers that need none."
    )
    anthropic_version: str = Field(default="2023-06-01", description="Sent when the caller sent none.")
    api_version: str | None = Field(
        default=None, description="azure_openai: the api-version query of deployment paths (e.g. 2024-10-21), "
        "or 'v1' for the v1 API (/openai/v1/..., the model in the body).")
    deployments: dict[str, str] | None = Field(
        default=None, description="azure_openai with deployment paths: model name → deployment name.")
    region: str | None = Field(default=None, description="bedrock: the AWS region, e.g. us-east-1.")
    project: str | None = Field(default=None, description="vertex: the Google Cloud project id.")
    location: str | None = Field(default=None, description="vertex: the region, e.g. us-central1, or global.")
    upstream_tls: bool = Field(
        default=True, description="A host outside the mesh: the mesh originates TLS to it (the default). false: "
        "plain HTTP, e.g. a model server on a private network.")
    upstream_port: int | None = Field(
        default=None, ge=1, le=65535, description="A host outside the mesh: the port the mesh connects to (default "
        "443 with TLS, else the base_url's port).")

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

    @model_validator(mode="after")
    def _fields_of_api(self) -> Provider:
        """Each API's own fields: required where the API cannot be called without them, refused elsewhere."""
        api = str(self.api)
        own = {"azure_openai": ("api_version", "deployments"), "bedrock": ("region",),
               "vertex": ("project", "location")}.get(api, ())
        for field in ("api_version", "deployments", "region", "project", "location"):
            if getattr(self, field) is not None and field not in own:
                raise _provider_problem(f"'{field}' does not apply to a provider of api {api}", field)
        self._check_credential(api)
        if api == "azure_openai":
            self._check_azure()
        elif api == "bedrock":
            if self.region is None or not _REGION.match(self.region):
                raise _provider_problem("a bedrock provider needs 'region', an AWS region such as us-east-1", "region")
        elif api == "vertex":
            if not self.project or not _GOOGLE_PROJECT.match(self.project):
                raise _provider_problem("a vertex provider needs 'project', a Google Cloud project id (6 to 30 "
                                        "lowercase letters, digits and hyphens, starting with a letter)", "project")
            if self.location is None or not _GOOGLE_LOCATION.match(self.location):
                raise _provider_problem("a vertex provider needs 'location', a region such as us-central1 (or "
                                        "global)", "location")
        if not self.base_url:
            # A model-level "before" validator would hide the model's shape from the CRD schema generator;
            # the model is frozen, so the default is set the way pydantic itself sets fields.
            object.__setattr__(self, "base_url", _default_base_url(api, self.region, self.location))
        if not self.base_url:
            raise _provider_problem(f"a provider of api {api} needs 'base_url', its API root as the sidecar sees it "
                                    "(e.g. http://api.openai.com/v1)", "base_url")
        return self

    def _check_credential(self, api: str) -> None:
        types = CREDENTIAL_TYPES[api]
        if self.credential is None:
            if api in CREDENTIAL_REQUIRED:
                example = {"aws": "{type: aws}", "google": "{type: google, file: /path/key.json}"}.get(
                    types[0], "{env: VARIABLE} or {file: /path}")
                raise _provider_problem(f"a {api} provider needs a credential source, e.g. credential: {example}",
                                        "credential")
            return
        if self.credential.type not in types:
            raise _provider_problem(f"a {api} provider takes a credential of type {' or '.join(types)}, not "
                                    f"{self.credential.type}", "credential")

    def _check_azure(self) -> None:
        version = self.api_version
        if version is None:
            raise _provider_problem("an azure_openai provider needs 'api_version' (e.g. 2024-10-21, or v1)",
                                    "api_version")
        if version == AZURE_V1:
            if self.deployments is not None:
                raise _provider_problem("'deployments' does not apply with api_version v1 (the model is in the body)",
                                        "deployments")
            return
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}(-preview)?", version):
            raise _provider_problem(f"api_version {version!r} is not an Azure API version such as 2024-10-21 or "
                                    "2025-01-01-preview, or v1", "api_version")
        if not self.deployments:
            raise _provider_problem("an azure_openai provider with deployment paths needs 'deployments' (model name: "
                                    "deployment name)", "deployments")

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
