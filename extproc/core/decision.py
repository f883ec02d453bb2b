"""The request's journey: identify caller → resolve policy → decide (route, cache, quota) → mutations → observe.

Two entry points mirror what Envoy tells us and when: :meth:`Decider.on_headers` may answer on
headers alone (a pass-through path, an unknown caller, a bad content type); otherwise
:meth:`Exchange.on_body` decides on the complete body. Both return plain data that the gRPC
layer turns into one ext_proc response.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import orjson

from extproc.cache.entry import CacheEntry
from extproc.cache.key import CachePlan, plan_cache
from extproc.cache.store import ResponseCache
from extproc.core.apis import Api, ApiError, Endpoint, ErrorKind, api_of_caller, classify, split_path
from extproc.core.credentials import CredentialStore
from extproc.core.identity import Caller, identify
from extproc.core.routing import Target, choose_target
from extproc.core.settlement import SettleInfo
from extproc.core.usage import estimate_request_tokens
from extproc.policy.compiled import PolicySet, ServiceModels
from extproc.policy.model import ModelRoute
from extproc.quota.engine import QuotaEngine, Refused, Reservation, Unavailable
from extproc.quota.plan import METRIC_REQUESTS, Estimate, plan_counters
from extproc.telemetry.metrics import CallLabels, Metrics

METADATA_NAMESPACE = "ai.extproc"
# Set on calls whose response must be read for token settlement; Envoy's usage filter keys on it
# ("observe": read without touching; "strip": also remove the usage chunk we asked for on the caller's behalf).
USAGE_HEADER = "x-ai-usage"
USAGE_OBSERVE = "observe"
USAGE_STRIP = "strip"
SETTLE_KEY = "settle"
TIMEOUT_HEADER = "x-envoy-upstream-rq-timeout-ms"
_JSON_TYPES = ("application/json",)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str
    authority: str
    headers: Mapping[str, str]  # lower-case names, pseudo-headers excluded
    attributes: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request on, changed as described."""

    set_headers: tuple[tuple[str, str], ...]
    remove_headers: tuple[str, ...]
    body: bytes | None  # None: body unchanged
    metadata: Mapping[str, str]
    clear_route_cache: bool = True


@dataclass(frozen=True, slots=True)
class LocalReply:
    """Answer the caller directly; the request never leaves the mesh."""

    status: int
    body: bytes
    details: str  # short token for Envoy's %RESPONSE_CODE_DETAILS%
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)


Decision = Forward | LocalReply


@dataclass(frozen=True, slots=True)
class Charge:
    """What quota admission reserved for a call, and what the caller is told about its limits."""

    reservation: Reservation | None
    headers: dict[str, str]
    input_tokens: int

    @property
    def settles_tokens(self) -> bool:
        return self.reservation is not None and any(m != METRIC_REQUESTS for m in self.reservation.metrics)


@dataclass(slots=True)
class Exchange:
    """One AI call between its headers and its body; holds the policy snapshot it started with."""

    decider: Decider
    request: HttpRequest
    endpoint: Endpoint
    caller: Caller
    policy: PolicySet
    service: ServiceModels
    _strip: tuple[str, ...] = field(default=())

    @property
    def max_body_bytes(self) -> int:
        return self.policy.mesh.max_body_bytes

    @property
    def declared_length(self) -> int | None:
        """The request's content-length, if any: Envoy enforces it, so reaching it means the body is in."""
        value = self.request.headers.get("content-length", "")
        return int(value) if value.isdigit() else None

    def too_large(self) -> LocalReply:
        limit = self.max_body_bytes
        return self.reject(ApiError(ErrorKind.TOO_LARGE, f"request body exceeds the limit of {limit} bytes",
                                    "request_too_large"))

    def reject(self, error: ApiError) -> LocalReply:
        return _reject(self.endpoint.api, error)

    async def on_body(self, body: bytes) -> Decision:
        decision = await self._decide(body)
        self.decider.count(decision, self.policy, self.caller)
        return decision

    @property
    def caller_labels(self) -> tuple[str, str]:
        labels = CallLabels.of(self.policy, service=self.caller.service, namespace=self.caller.namespace)
        return labels.caller

    async def _decide(self, body: bytes) -> Decision:
        if len(body) > self.max_body_bytes:
            return self.too_large()
        data = _parse_json(body)
        if isinstance(data, ApiError):
            return self.reject(data)
        requested = data.get("model")
        if not isinstance(requested, str) or not requested:
            return self.reject(ApiError(ErrorKind.INVALID_REQUEST, "'model' is required and must be a string",
                                        "missing_model", "model"))
        route = self.service.resolve(requested)
        if route is None:
            allowed = ", ".join(self.service.allowed)
            return self.reject(ApiError(
                ErrorKind.PERMISSION,
                f"model {requested!r} is not allowed for {self.caller.describe()}; allowed models: {allowed}",
                "model_not_allowed", "model"))
        target = choose_target(route, self.policy.providers, self.request.headers)
        if target.provider.api != self.endpoint.api:
            return self.reject(ApiError(
                ErrorKind.INVALID_REQUEST,
                f"model is served by provider {target.provider.name!r}, which speaks the {target.provider.api} "
                f"API; this call uses the {self.endpoint.api} API", "api_mismatch", "model"))
        credential = self._credential_headers(target)
        if isinstance(credential, ApiError):
            return self.reject(credential)
        cache = self._cache_plan(data, route, target)
        if cache is not None and cache.read:
            entry = await self.decider.cache.get(cache.key)
            self.decider.metrics.cache_lookups.labels(*self.caller_labels, "miss" if entry is None else "hit").inc()
            if entry is not None:
                return await self._cache_hit(entry, data, requested, route, target)
        # Quota last: a call refused for any other reason must not consume it.
        charge = await self._charge(data, route, target)
        if isinstance(charge, LocalReply):
            return charge
        return self._forward(data, requested, route, target, credential, charge, cache)

    def _cache_plan(self, data: dict[str, object], route: ModelRoute, target: Target) -> CachePlan | None:
        namespace, service = self.service.scope or (self.caller.namespace, self.caller.service or "unknown")
        return plan_cache(
            prefix=self.policy.mesh.cache.key_prefix, scope=f"{namespace or '*'}/{service}",
            provider=target.provider.name, operation=self.endpoint.operation, route=route,
            body={**data, "model": target.model}, headers=self.request.headers)

    async def _cache_hit(self, entry: CacheEntry, data: dict[str, object], requested: str, route: ModelRoute,
                         target: Target) -> Decision:
        """Answer from the cache, in the caller's format (a stored stream is replayed whole)."""
        if self.policy.mesh.cache.charge_hits:
            charge = await self._charge(data, route, target)
            if isinstance(charge, LocalReply):
                return charge
            if charge is not None and charge.reservation is not None:
                price = self.policy.prices.lookup(target.provider.name, target.model)
                cost = price.micro_usd(entry.input_tokens, entry.output_tokens) if price is not None else 0
                await self.decider.quota.settle(charge.reservation,
                                                Estimate(entry.input_tokens, entry.output_tokens, cost))
        headers = [("content-type", entry.content_type), ("x-ai-cache", "hit"), ("age", str(entry.age_s())),
                   ("x-ai-provider", target.provider.name), ("x-ai-model", target.model), ("x-ai-route", route.name),
                   ("x-ai-policy-version", self.policy.version)]
        if target.variant:
            headers.append(("x-ai-variant", target.variant))
        return LocalReply(entry.status, entry.body, "ai_cache_hit", tuple(headers))

    def _credential_headers(self, target: Target) -> list[tuple[str, str]] | ApiError:
        provider = target.provider
        headers: list[tuple[str, str]] = []
        if provider.credential is not None:
            key = self.decider.credentials.get(provider.credential)
            if key is None:
                return ApiError(
                    ErrorKind.UNAVAILABLE,
                    f"the credential for provider {provider.name!r} is not available; the platform team must "
                    "provide it", "credential_unavailable")
            headers.append(("x-api-key", key) if provider.api == Api.ANTHROPIC else ("authorization", f"Bearer {key}"))
        if provider.api == Api.ANTHROPIC and "anthropic-version" not in self.request.headers:
            headers.append(("anthropic-version", provider.anthropic_version))
        return headers

    async def _charge(self, data: dict[str, object], route: ModelRoute, target: Target) -> Charge | LocalReply | None:
        quota = self.decider.quota
        proxy = self.service.proxy
        namespace, service = self.service.scope or (self.caller.namespace, self.caller.service or "unknown")
        counters = plan_counters(
            prefix=self.policy.mesh.quota.key_prefix, namespace=namespace, service=service, proxy=proxy,
            mesh=self.policy.mesh, route=route, provider=target.provider.name, now=quota.now())
        if not counters:
            return None
        input_tokens = estimate_request_tokens(data, self.endpoint.api)
        output_tokens = _max_output_tokens(data, self.endpoint, self.policy.mesh.quota.default_max_output_tokens)
        price = self.policy.prices.lookup(target.provider.name, target.model)
        estimate = Estimate(input_tokens, output_tokens,
                            price.micro_usd(input_tokens, output_tokens) if price is not None else 0)
        fail_mode = proxy.on_quota_backend_failure or self.policy.mesh.quota.on_backend_failure
        admission = await quota.admit(counters, estimate, fail_mode)
        if isinstance(admission, Refused):
            counter = admission.counter
            self.decider.metrics.quota_rejections.labels(*self.caller_labels, counter.metric).inc()
            kind = "requests" if counter.metric == METRIC_REQUESTS else "tokens"
            reject = self.reject(ApiError(
                ErrorKind.RATE_LIMIT,
                f"rate limit exceeded: {counter.label}; retry after {admission.retry_after_s}s",
                "rate_limit_exceeded", openai_type=kind))
            return LocalReply(reject.status, reject.body, reject.details,
                          (*reject.headers, ("retry-after", str(admission.retry_after_s))))
        if isinstance(admission, Unavailable):
            return self.reject(ApiError(ErrorKind.UNAVAILABLE, f"quota cannot be checked: {admission.reason}",
                                        "quota_backend_unavailable"))
        return Charge(admission.reservation, admission.headers, input_tokens)

    def _forward(self, data: dict[str, object], requested: str, route: ModelRoute, target: Target,
                 credential: list[tuple[str, str]], charge: Charge | None, cache: CachePlan | None) -> Decision:
        provider = target.provider
        headers: list[tuple[str, str]] = [
            (":authority", provider.authority),
            (":path", provider.base_path + self.endpoint.suffix + split_path(self.request.path)[1]),
            *credential,
        ]
        remove = list(self._strip)
        if provider.credential is not None:
            remove.append("authorization" if provider.api == Api.ANTHROPIC else "x-api-key")
        if route.timeout is not None:
            headers.append((TIMEOUT_HEADER, str(route.timeout)))
        elif TIMEOUT_HEADER in self.request.headers:
            remove.append(TIMEOUT_HEADER)  # only policy sets upstream timeouts
        metadata = {
            "service": self.caller.service or "",
            "namespace": self.caller.namespace or "",
            "provider": provider.name,
            "model": target.model,
            "requested_model": requested,
            "route": route.name,
            "variant": target.variant or "",
            "policy_version": self.policy.version,
        }
        rewrite = target.model != requested
        if rewrite:
            data["model"] = target.model
        reservation = charge.reservation if charge is not None and charge.settles_tokens else None
        store = cache if cache is not None and cache.write else None
        if charge is not None:
            metadata.update(charge.headers)
        if cache is not None:
            metadata["cache"] = "miss"
        usage_mode = None
        if reservation is not None or store is not None:
            # The response must be read: to settle tokens, to store it in the cache, or both.
            usage_mode = USAGE_OBSERVE
            if reservation is not None and _inject_stream_usage(data, self.endpoint):
                usage_mode, rewrite = USAGE_STRIP, True
            metadata[SETTLE_KEY] = SettleInfo(
                reservation, str(self.endpoint.api), charge.input_tokens if charge else 0, provider.name,
                target.model, store.key if store else None, store.ttl_s if store else 0,
                self.endpoint.operation, route.name, time.time(), self.caller.service or "",
                self.caller.namespace or "").encode()
        if usage_mode is not None:
            headers.append((USAGE_HEADER, usage_mode))
        elif USAGE_HEADER in self.request.headers:
            remove.append(USAGE_HEADER)
        new_body: bytes | None = None
        if rewrite:
            new_body = orjson.dumps(data)
            headers.append(("content-length", str(len(new_body))))
        return Forward(tuple(headers), tuple(remove), new_body, metadata)


class Decider:
    """Stateless apart from the current policy snapshot and the credential cache."""

    def __init__(self, policies: Callable[[], PolicySet], credentials: CredentialStore, quota: QuotaEngine,
                 cache: ResponseCache, metrics: Metrics | None = None) -> None:
        self._policies = policies
        self.credentials = credentials
        self.quota = quota
        self.cache = cache
        self.metrics = metrics or Metrics()

    def policy(self) -> PolicySet:
        return self._policies()

    def count(self, decision: Decision, policy: PolicySet, caller: Caller) -> None:
        """One AI call decided: forwarded, answered from the cache, or refused (by its code)."""
        if isinstance(decision, Forward):
            meta = decision.metadata
            labels = CallLabels.of(policy, service=caller.service, namespace=caller.namespace,
                                   provider=meta.get("provider"), request_model=meta.get("route"))
            outcome = "forwarded"
        else:
            labels = CallLabels.of(policy, service=caller.service, namespace=caller.namespace)
            outcome = decision.details.removeprefix("ai_")
        self.metrics.calls.labels(*labels.caller, labels.provider, labels.request_model, outcome).inc()

    def on_headers(self, request: HttpRequest, end_of_stream: bool) -> Decision | Exchange:
        """Decide on headers alone, or return the :class:`Exchange` that waits for the body."""
        result = self._on_headers(request, end_of_stream)
        if isinstance(result, LocalReply):
            policy = self._policies()
            self.count(result, policy, identify(request.attributes, request.headers, policy.mesh.identity))
        return result

    def _on_headers(self, request: HttpRequest, end_of_stream: bool) -> Decision | Exchange:
        policy = self._policies()
        mesh = policy.mesh
        # Headers only we may set: the identity header (unless trusted) and the usage-filter switch.
        strip = (USAGE_HEADER,) if mesh.identity.trust_header else (mesh.identity.header, USAGE_HEADER)
        strip = tuple(h for h in strip if h in request.headers)
        endpoint = classify(request.path)
        if endpoint is None:
            if mesh.unknown_paths == "pass":
                return Forward((), strip, None, {}, clear_route_cache=False)
            return _reject(api_of_caller(request.path, dict(request.headers)), ApiError(
                ErrorKind.NOT_FOUND, f"path {split_path(request.path)[0]!r} is not an AI endpoint handled here",
                "unknown_path"))
        if request.method != "POST":
            return _reject(endpoint.api, ApiError(
                ErrorKind.METHOD, f"{request.method} is not allowed on {endpoint.suffix}; use POST", "method"))
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type not in _JSON_TYPES:
            return _reject(endpoint.api, ApiError(
                ErrorKind.MEDIA_TYPE, f"content-type must be application/json, got {content_type or 'none'!r}",
                "unsupported_media_type"))
        if end_of_stream:
            return _reject(endpoint.api, ApiError(ErrorKind.INVALID_REQUEST, "request body is empty",
                                                  "empty_body"))
        caller = identify(request.attributes, request.headers, mesh.identity)
        service = policy.for_caller(caller.service, caller.namespace)
        if service is None:
            return _reject(endpoint.api, ApiError(
                ErrorKind.PERMISSION, f"{caller.describe()} has no AI policy in this mesh", "no_policy"))
        return Exchange(self, request, endpoint, caller, policy, service, strip)


def _max_output_tokens(data: dict[str, object], endpoint: Endpoint, default: int) -> int:
    if endpoint.operation == "embeddings":
        return 0
    for key in ("max_completion_tokens", "max_tokens"):
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def _inject_stream_usage(data: dict[str, object], endpoint: Endpoint) -> bool:
    """Ask an OpenAI stream for its usage chunk when the caller did not; True if we had to."""
    if endpoint.operation != "chat_completions" or data.get("stream") is not True:
        return False
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    data["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True


def _reject(api: Api, error: ApiError) -> LocalReply:
    return LocalReply(error.kind.status, error.render(api), f"ai_{error.code}")


def _parse_json(body: bytes) -> dict[str, object] | ApiError:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            return ApiError(ErrorKind.INVALID_REQUEST, f"request body is not valid UTF-8 (byte {bad.start})",
                            "invalid_utf8")
        return ApiError(ErrorKind.INVALID_REQUEST, f"request body is not valid JSON: {exc}", "invalid_json")
    if not isinstance(data, dict):
        return ApiError(ErrorKind.INVALID_REQUEST, "request body must be a JSON object", "invalid_json")
    return data
