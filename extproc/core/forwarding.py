"""The request as the chosen provider must receive it: its format, model, path, credential, timeout,
fallback marker and the metadata the response side and later hops need.

A call may reach a provider of another API than the caller's (a cross-provider fallback): the body is
translated on the way there and the answer on the way back (the usage filter's ``translate`` mode).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from extproc.base.apis import (
    BEDROCK_FORMAT,
    ENDPOINTS,
    GEMINI_FORMAT,
    RESPONSES_FORMAT,
    Api,
    ApiError,
    Endpoint,
    ErrorKind,
    native_api,
    split_path,
    wire_format,
)
from extproc.base.wire import (
    FALLBACK_HEADER,
    FALLBACK_MARKER,
    FALLBACK_STATE_KEY,
    GRANT_HEADER,
    PER_TRY_TIMEOUT_HEADER,
    RETRIABLE_CODES_HEADER,
    SETTLE_KEY,
    TIMEOUT_HEADER,
    USAGE_HEADER,
    USAGE_OBSERVE,
    USAGE_STRIP,
    USAGE_TRANSLATE,
)
from extproc.core import fallback
from extproc.core.admission import FREE_OPERATIONS
from extproc.core.credentials import api_headers
from extproc.core.grants import Grant, body_digest, through_gateway
from extproc.core.identity import Caller
from extproc.core.inflight import GRACE_S
from extproc.core.messages import Decision, Forward, HttpRequest, reject
from extproc.core.paths import NO_USAGE
from extproc.core.provider_request import CREDENTIAL_HEADERS, body_model, provider_auth, provider_path
from extproc.core.request_body import dump_json
from extproc.core.routing import Target
from extproc.core.settlement import SettleInfo
from extproc.policy.model import MeshSettings, ModelRoute, Provider
from extproc.translate import TranslationError, canonical

if TYPE_CHECKING:
    from extproc.core.runtime import Runtime
    from extproc.policy.compiled import PolicySet

# Envoy-control headers only policy may set; an internal redirect adds x-envoy-original-url.
UNTRUSTED_HEADERS = (TIMEOUT_HEADER, PER_TRY_TIMEOUT_HEADER, RETRIABLE_CODES_HEADER, "x-envoy-original-url")
# Chat in each wire format: the operations translation maps onto each other (through the canonical form).
_CHAT_OPERATION = {"openai": "chat_completions", "anthropic": "messages", BEDROCK_FORMAT: "converse",
                   GEMINI_FORMAT: "generate_content"}
# The streaming spellings of a provider path, seen on a fallback attempt re-sent to it.
_STREAM_OPERATIONS = frozenset({"converse_stream", "stream_generate_content"})
_CHAT = frozenset(_CHAT_OPERATION.values()) | _STREAM_OPERATIONS
# The provider APIs that serve the Responses API themselves (its stored state, its built-in tools).
_RESPONSES_NATIVE = frozenset({"openai", "azure_openai"})
# A Responses request that names state one provider keeps, or tools only OpenAI runs, stays with OpenAI.
_RESPONSES_STATE = ("previous_response_id", "conversation")


def provider_form(endpoint: Endpoint, provider_api: str) -> tuple[str, str] | None:
    """(operation, body format) in which a provider of ``provider_api`` serves a call to ``endpoint``;
    None when it cannot (an operation only the caller's API has)."""
    wire = wire_format(provider_api)
    if endpoint.operation in _CHAT:
        return _CHAT_OPERATION[wire], wire
    if endpoint.operation == "responses":
        return ("responses", RESPONSES_FORMAT) if provider_api in _RESPONSES_NATIVE else (_CHAT_OPERATION[wire], wire)
    return (endpoint.operation, endpoint.body_format) if native_api(provider_api) == endpoint.api else None


def translatable(body_format: str, provider_format: str) -> bool:
    """Every chat format reaches every provider's through the canonical form; the Responses format is only
    ever sent as the caller wrote it."""
    return body_format == provider_format or provider_format != RESPONSES_FORMAT


def streamed(data: Mapping[str, object], endpoint: Endpoint) -> bool:
    """Whether the call streams: its body says so, or (a Converse or Gemini body re-sent on a fallback) its path."""
    return data.get("stream") is True or endpoint.operation in _STREAM_OPERATIONS


def format_api(body_format: str) -> Api:
    """The API whose error envelope a body format's callers understand."""
    return Api.OPENAI if body_format == RESPONSES_FORMAT else Api(body_format)


def usable_hops(endpoint: Endpoint, hops: list[Target], data: dict[str, object]) -> int:
    """How many hops of the chain this request can be sent to and answered from in the caller's format.

    Each hop gets the body the previous one was sent (Envoy re-sends it), so a hop is usable only if
    that body translates to its API and its answer translates back; the chain stops at the first
    that is not. A Responses request naming state one provider keeps stays with its first hop.
    """
    caller = endpoint.body_format
    if caller == RESPONSES_FORMAT and _stays_with_openai(data):
        if any(data.get(key) not in (None, "") for key in _RESPONSES_STATE):
            return 1
        return max(1, next((n for n, hop in enumerate(hops) if hop.provider.api not in _RESPONSES_NATIVE),
                           len(hops)))
    body = caller
    for n, hop in enumerate(hops):
        form = provider_form(endpoint, hop.provider.api)
        if form is None:
            return max(1, n)
        operation, provider_format = form
        if not (translatable(body, provider_format) and translatable(caller, provider_format)):
            return max(1, n)
        endpoint = _endpoint_of(operation, provider_format, endpoint)
        body = provider_format
    return len(hops)


def _endpoint_of(operation: str, body_format: str, current: Endpoint) -> Endpoint:
    """The endpoint a hop's body is re-sent to on the next attempt, as the next decision will see it."""
    if body_format in (BEDROCK_FORMAT, GEMINI_FORMAT):
        return Endpoint(Api.ANTHROPIC, operation, "", body_format)
    found = next((e for e in ENDPOINTS.values() if e.body_format == body_format and e.operation == operation), None)
    return found or current


def _stays_with_openai(data: dict[str, object]) -> bool:
    if any(data.get(key) not in (None, "") for key in _RESPONSES_STATE):
        return True
    tools = data.get("tools")
    if isinstance(tools, list) and any(isinstance(t, dict) and t.get("type") != "function" for t in tools):
        return True  # built-in tools (web_search, file_search, computer use, ...) run at OpenAI
    items = data.get("input")
    return isinstance(items, list) and any(isinstance(i, dict) and i.get("type") == "item_reference" for i in items)


def asks_usage(data: dict[str, object]) -> bool:
    options = data.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


@dataclass(frozen=True, slots=True)
class Forwarder:
    """Builds the forward of one call's attempt (the first, or a fallback hop)."""

    runtime: Runtime
    policy: PolicySet
    request: HttpRequest
    endpoint: Endpoint
    caller: Caller
    strip: tuple[str, ...]  # caller headers only we may set
    rewrite: bool  # the body must be re-serialised even if nothing in it changes (duplicate keys)
    body: bytes  # the request as it arrived (a grant covers the body that is sent on)

    async def forward(self, data: dict[str, object], route: ModelRoute, hops: list[Target],
                      state: fallback.HopState, extra: Mapping[str, str]) -> Decision:
        """Send the call to ``hops[state.index]``, in that provider's format, ready to fall back further."""
        target = hops[state.index]
        provider = target.provider
        caller_api = format_api(state.caller_api)
        form = provider_form(self.endpoint, provider.api)
        if form is None:
            return reject(caller_api, ApiError(
                ErrorKind.INVALID_REQUEST, f"{self.endpoint.operation} is not served by the {provider.api} API of "
                f"provider {provider.name!r}", "untranslatable_request"))
        operation, provider_format = form
        stream = streamed(data, self.endpoint)
        translated = for_provider(data, self.endpoint.body_format, provider_format, body_model(provider, target.model),
                                  self.policy.mesh, stream=stream, provider_api=provider.api)
        if isinstance(translated, ApiError):
            return reject(caller_api, translated)
        data, rewrite = translated
        same_api = state.caller_api == provider_format
        if same_api and state.settle.reservation is not None and provider_format == "openai":
            # Token quotas settle on the provider's own count: ask a stream for it.
            rewrite = _inject_stream_usage(data, operation) or rewrite
        new_body = dump_json(data) if rewrite or self.rewrite else None
        suffix = _suffix(operation, provider_format, self.endpoint)
        path = provider_path(provider, operation, suffix, model=target.model, stream=stream,
                             query=split_path(self.request.path)[1])
        at_gateway = self._at_gateway(provider)
        credential = (api_headers(provider, self.request.headers) if at_gateway else await provider_auth(
            provider, self.runtime.credentials, self.runtime.cloud, path=path,
            body=self.body if new_body is None else new_body, request_headers=self.request.headers))
        if isinstance(credential, ApiError):
            return reject(caller_api, credential)
        headers = [(":authority", provider.authority), (":path", path), *credential, *self._timeouts(route, state)]
        remove = self._removed(provider, caller_api, credential, at_gateway)
        hop_token = self._fallback(route, hops, state, headers, remove)
        # A free operation's answer (count_tokens: {"input_tokens": n}) is not usage: nothing to read.
        settle = replace(state.settle, api=NO_USAGE if operation in FREE_OPERATIONS else provider_format,
                         provider=provider.name, model=target.model)
        self._usage_mode(data, route, settle, same_api, headers, remove)
        metadata = self._metadata(route, target, state, settle, hop_token, extra)
        if new_body is not None:
            headers.append(("content-length", str(len(new_body))))
        if at_gateway:
            headers.append((GRANT_HEADER, self._grant(target, state, self.body if new_body is None else new_body,
                                                      path)))
        return Forward(tuple(headers), tuple(remove), new_body, metadata)

    def _at_gateway(self, provider: Provider) -> bool:
        """Whether the provider's key is added at the egress gateway (which then wants a grant)."""
        mesh = self.policy.mesh
        return mesh.credential_injection == "gateway" and through_gateway(provider, mesh.cluster_domain)

    def _removed(self, provider: Provider, caller_api: Api, credential: list[tuple[str, str]],
                 at_gateway: bool) -> list[str]:
        """The caller's headers that must not reach the provider: any credential of its own (ours replaces
        it; a header we set is not removed, or ours would go too)."""
        remove = [*self.strip, *UNTRUSTED_HEADERS]
        ours = {name for name, _ in credential}
        remove += [name for name in CREDENTIAL_HEADERS if name not in ours]
        if not at_gateway:
            remove.append(GRANT_HEADER)
        if provider.api != "anthropic" and caller_api != Api.ANTHROPIC:
            # Left by an earlier Anthropic hop. (An Anthropic caller keeps it: Envoy's own error
            # replies pick the caller's format by this header.)
            remove.append("anthropic-version")
        return remove

    @staticmethod
    def _timeouts(route: ModelRoute, state: fallback.HopState) -> list[tuple[str, str]]:
        """The timeout is the budget of the whole call, fallbacks included; the mesh's default when the
        model sets none, so that a hung provider never holds the caller (or its slot) for long."""
        left = state.timeout_ms - int((time.time() - state.started_at) * 1000)
        headers = [(TIMEOUT_HEADER, str(max(left, 1)))]
        if route.first_byte_timeout is not None:
            headers.append((PER_TRY_TIMEOUT_HEADER, str(route.first_byte_timeout)))
        return headers

    def _fallback(self, route: ModelRoute, hops: list[Target], state: fallback.HopState,
                  headers: list[tuple[str, str]], remove: list[str]) -> str:
        """Mark the attempt retriable when a hop is left; the signed state for the relay ("" if none)."""
        if state.index + 1 >= len(hops):
            remove.append(FALLBACK_HEADER)
            return ""
        # Envoy retries only calls carrying this header; the retry reaches the relay, which moves on.
        # The provider sees only the marker: the state itself rides in the call's metadata, and
        # Envoy puts it on the relay's attempt alone (filter.failover_protocol_options).
        headers.append((FALLBACK_HEADER, FALLBACK_MARKER))
        if route.fallback_on_context_length:
            headers.append((RETRIABLE_CODES_HEADER, "400"))
        return replace(state, hop_started_at=time.time(), nonce=fallback.new_nonce(),
                       relayed=False).encode(self.runtime.signer)  # good only at the relay

    def _usage_mode(self, data: dict[str, object], route: ModelRoute, settle: SettleInfo, same_api: bool,
                    headers: list[tuple[str, str]], remove: list[str]) -> None:
        """Which response-side filter runs: none unless something must read or change the response."""
        if not same_api:
            mode: str | None = USAGE_TRANSLATE
        elif data.get("stream") is True and asks_usage(data) and not settle.include_usage:
            mode = USAGE_STRIP  # the usage chunk is ours (injected or left by a translation): remove it
        elif self._observed(route, settle):
            mode = USAGE_OBSERVE
        else:
            mode = None  # nothing reads this response: no second stream (it costs the processor CPU)
        if mode is not None:
            headers.append((USAGE_HEADER, mode))
        elif USAGE_HEADER in self.request.headers:
            remove.append(USAGE_HEADER)

    def _observed(self, route: ModelRoute, settle: SettleInfo) -> bool:
        """Whether the response must be read: token quotas, a cache fill, a breaker, a bulkhead slot,
        a job's result, or telemetry that records every call."""
        return bool(self.runtime.observe_all or settle.reservation is not None or settle.cache_key
                    or settle.call_id or settle.job_id
                    or route.breaker(self.policy.mesh.resilience.circuit_breaker) is not None)

    def _metadata(self, route: ModelRoute, target: Target, state: fallback.HopState, settle: SettleInfo,
                  hop_token: str, extra: Mapping[str, str]) -> dict[str, str]:
        ttl = max(1.0, state.started_at + state.timeout_ms / 1000 + GRACE_S + 60 - time.time())
        metadata = {
            "service": self.caller.service or "",
            "namespace": self.caller.namespace or "",
            "provider": target.provider.name,
            "model": target.model,
            "requested_model": state.requested,
            "route": route.name,
            "variant": state.variant,
            "policy_version": self.policy.version,
            SETTLE_KEY: settle.seal(self.runtime.signer, ttl),
            **({FALLBACK_STATE_KEY: hop_token} if hop_token else {}),
            **extra,
        }
        if state.hops:
            metadata["fallback_hops"] = fallback.hops_header(state.hops, target)
        return metadata

    def _grant(self, target: Target, state: fallback.HopState, body: bytes, path: str) -> str:
        """This attempt's single-use grant for the provider's credential, redeemed at the egress gateway."""
        # Bound to the workload whose sidecar presents it (a worker replaying a job presents its own).
        peer = self.request.peer
        namespace = peer.namespace if peer is not None else state.namespace
        account = peer.service_account if peer is not None else (self.caller.service_account or "")
        grant = Grant(target.provider.name, target.provider.authority, namespace, state.service, account,
                      fallback.new_nonce(), body_digest(body), "POST", path)
        ttl = max(1.0, state.started_at + state.timeout_ms / 1000 + GRACE_S - time.time())
        return grant.encode(self.runtime.signer, ttl)


def _suffix(operation: str, body_format: str, endpoint: Endpoint) -> str:
    """The endpoint path of ``operation`` under an OpenAI-shaped or Anthropic provider's base path."""
    found = next((e for e in ENDPOINTS.values() if e.body_format == body_format and e.operation == operation), None)
    return found.suffix if found is not None else endpoint.suffix


def for_provider(data: dict[str, object], body_format: str, provider_format: str, model: str, mesh: MeshSettings,
                 *, stream: bool = False, provider_api: str = "") -> tuple[dict[str, object], bool] | ApiError:
    """The request body in the provider's format, for ``model``; True when it had to change."""
    if body_format == provider_format:
        if provider_format in canonical.MODEL_IN_PATH or data.get("model") == model:
            return data, False
        return {**data, "model": model}, True
    if not translatable(body_format, provider_format):
        return ApiError(ErrorKind.INVALID_REQUEST, f"the model is served through the {provider_format} API, and a "
                        f"{body_format} call is not translated to it", "untranslatable_request")
    try:
        return canonical.to_provider(data, body_format, provider_format, model=model, stream=stream,
                                     default_max_tokens=mesh.quota.default_max_output_tokens,
                                     provider_api=provider_api), True
    except TranslationError as exc:
        return ApiError(ErrorKind.INVALID_REQUEST, f"the model is served through the {provider_format} API and this "
                        f"call cannot be translated to it: {exc.message}", "untranslatable_request")


def _inject_stream_usage(data: dict[str, object], operation: str) -> bool:
    """Ask an OpenAI stream for its usage chunk when the caller did not; True if we had to."""
    if operation not in ("chat_completions", "completions") or data.get("stream") is not True:
        return False
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    data["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True
