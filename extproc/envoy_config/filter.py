"""The one definition of the ext_proc HTTP filter and the Envoy route settings it relies on."""

from __future__ import annotations

from typing import Any

from extproc.base.wire import (
    FALLBACK_HEADER,
    FALLBACK_STATE_KEY,
    METADATA_NAMESPACE,
    USAGE_HEADER,
    USAGE_OBSERVE,
    USAGE_STRIP,
    USAGE_TRANSLATE,
)
from extproc.core.identity import REQUEST_ATTRIBUTES
from extproc.envoy_config.versions import CONTENT_LENGTH_AFTER_REWRITE, STANDALONE_ENVOY, EnvoyVersion

FILTER_NAME = "envoy.filters.http.ext_proc"
EXT_PROC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"

# Response headers that tell the caller what the policy did, filled from the dynamic metadata the
# processor returns with its decision (no response-path round trip needed). Empty values are not sent.
RESPONSE_HEADERS: tuple[tuple[str, str], ...] = (
    ("x-ai-provider", "provider"),
    ("x-ai-model", "model"),
    ("x-ai-route", "route"),
    ("x-ai-variant", "variant"),
    ("x-ai-policy-version", "policy_version"),
    ("x-ai-cache", "cache"),
    ("x-ai-fallback-hops", "fallback_hops"),
    ("x-ratelimit-limit-requests", "limit_requests"),
    ("x-ratelimit-remaining-requests", "remaining_requests"),
    ("x-ratelimit-reset-requests", "reset_requests"),
    ("x-ratelimit-limit-tokens", "limit_tokens"),
    ("x-ratelimit-remaining-tokens", "remaining_tokens"),
    ("x-ratelimit-reset-tokens", "reset_tokens"),
)
USAGE_FILTER_NAME = "ai.usage"


def ext_proc_filter(
    *,
    cluster_name: str,
    authority: str,
    message_timeout_ms: int = 5000,
    failure_mode_allow: bool = False,
    envoy: EnvoyVersion = STANDALONE_ENVOY,
) -> dict[str, Any]:
    """The HTTP filter entry for an HCM ``http_filters`` list.

    Processing mode: request headers SENT and the body STREAMED without waiting for the header
    answer, so the processor answers headers (routing, credentials) once the body is in: one round
    trip. Response phases are off: replies, including SSE streams, never pass through us.
    ``allow_all_routing`` lets us rewrite ``:authority`` to route to the provider; ``allow_envoy``
    lets us set ``x-envoy-upstream-rq-timeout-ms`` from policy; ``allow_content_length_header``
    keeps the content-length we set after rewriting the body (on an ``envoy`` that has it: versions.py).
    """
    return {
        "name": FILTER_NAME,
        "typed_config": {
            "@type": EXT_PROC_TYPE,
            "grpc_service": {
                # An explicit authority: Istio cluster names contain '|', which is not a valid :authority.
                "envoy_grpc": {"cluster_name": cluster_name, "authority": authority},
            },
            "failure_mode_allow": failure_mode_allow,
            "message_timeout": f"{message_timeout_ms / 1000:g}s",
            "processing_mode": {
                "request_header_mode": "SEND",
                "request_body_mode": "STREAMED",
                "request_trailer_mode": "SEND",
                "response_header_mode": "SKIP",
                "response_body_mode": "NONE",
                "response_trailer_mode": "SKIP",
            },
            "send_body_without_waiting_for_header_response": True,
            **({"allow_content_length_header": True} if envoy >= CONTENT_LENGTH_AFTER_REWRITE else {}),
            "request_attributes": list(REQUEST_ATTRIBUTES),
            "mutation_rules": {"allow_all_routing": True, "allow_envoy": True},
            "metadata_options": {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
            "stat_prefix": "ai_extproc",
        },
    }


def _usage_ext_proc(cluster_name: str, authority: str, *, observe: bool, required: bool = False) -> dict[str, Any]:
    mode: dict[str, str] = {
        "request_header_mode": "SKIP",
        "request_body_mode": "NONE",
        "request_trailer_mode": "SKIP",
        "response_header_mode": "SEND",
        "response_body_mode": "STREAMED" if observe else "FULL_DUPLEX_STREAMED",
        "response_trailer_mode": "SKIP" if observe else "SEND",  # full duplex requires trailers SENT
    }
    config: dict[str, Any] = {
        "@type": EXT_PROC_TYPE,
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster_name, "authority": authority}},
        "processing_mode": mode,
        # The decision's reservation and call facts reach the settling replica this way.
        "metadata_options": {"forwarding_namespaces": {"untyped": [METADATA_NAMESPACE]}},
        "stat_prefix": "ai_usage_observe" if observe else "ai_usage_strip",
    }
    if observe:
        # Send-and-go: Envoy never waits for us, so reading usage adds no latency to the response.
        config["observability_mode"] = True
        config["deferred_close_timeout"] = "2s"
    else:
        # Stripping our usage chunk is a nicety: a processor problem must not break the caller's
        # stream. A translation is not: an untranslated answer would be in the wrong API format.
        config["failure_mode_allow"] = not required
        config["message_timeout"] = "5s"
    return config


def _execute(name: str, filter_config: dict[str, Any]) -> dict[str, Any]:
    """A composite filter's action: run ``filter_config`` (a named filter) for this request."""
    return {"action": {"name": name, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction",
        "typed_config": filter_config}}}


def _header_input(name: str, header: str) -> dict[str, Any]:
    return {"name": name, "typed_config": {
        "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput", "header_name": header}}


def _composite(name: str, matcher: dict[str, Any]) -> dict[str, Any]:
    """A filter chosen per request by ``matcher`` (an xds matcher over request headers), or none."""
    return {
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": {
                "name": "composite",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"},
            },
            "xds_matcher": matcher,
        },
    }


def usage_filter(*, cluster_name: str, authority: str) -> dict[str, Any]:
    """The response-side filter, attached per call by the processor through the ``x-ai-usage`` header.

    A composite filter matches that header after the decision filter has set it: ``observe`` runs
    an observability-mode ext_proc (no latency), ``strip`` a full-duplex one that also removes the
    usage chunk we requested on the caller's behalf, ``translate`` a full-duplex one that rewrites a
    fallback provider's response into the caller's API format.
    """
    def action(name: str, observe: bool, required: bool = False) -> dict[str, Any]:
        return _execute(name, {"name": f"{USAGE_FILTER_NAME}.{name}", "typed_config": _usage_ext_proc(
            cluster_name, authority, observe=observe, required=required)})

    return _composite(USAGE_FILTER_NAME, {"matcher_tree": {
        "input": _header_input("usage-mode", USAGE_HEADER),
        "exact_match_map": {"map": {USAGE_OBSERVE: action("observe", True),
                                    USAGE_STRIP: action("strip", False),
                                    USAGE_TRANSLATE: action("translate", False, required=True)}},
    }})


# The largest request a call with a fallback chain may have: Envoy must hold it whole to re-send it
# to the next provider (the policy's own, usually smaller, max_body_bytes is checked first).
MAX_FALLBACK_REQUEST_BYTES = 8 * 1024 * 1024
COMPLETE_REQUEST_FILTER_NAME = "ai.complete_request"


def complete_request_filter() -> dict[str, Any]:
    """Hold a call that may fall back until its request has fully arrived, then hand it to the router.

    Envoy follows the relay's redirect only for a complete downstream request ("Internal redirect
    failed: request incomplete" otherwise), and the decision may be answered at content-length,
    before the caller's end of stream (or an HTTP/2 caller may hold END_STREAM back): without this
    the failed attempt's 307 could reach the caller. Matched on the fallback header the decision
    sets, so calls without a chain, and pass-through uploads, keep streaming.
    """
    buffer = {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
              "max_request_bytes": MAX_FALLBACK_REQUEST_BYTES}
    return _composite(COMPLETE_REQUEST_FILTER_NAME, {"matcher_list": {"matchers": [{
        "predicate": {"single_predicate": {
            "input": _header_input("fallback-state", FALLBACK_HEADER),
            "value_match": {"safe_regex": {"google_re2": {}, "regex": ".+"}},
        }},
        "on_match": _execute("buffer", {"name": f"{COMPLETE_REQUEST_FILTER_NAME}.buffer", "typed_config": buffer}),
    }]}})


def processor_http_filters(*, cluster_name: str, authority: str, failure_mode_allow: bool = False,
                           envoy: EnvoyVersion = STANDALONE_ENVOY) -> list[dict[str, Any]]:
    """Our HTTP filters, in order, for an HCM's http_filters (before the router), for that Envoy."""
    return [ext_proc_filter(cluster_name=cluster_name, authority=authority, failure_mode_allow=failure_mode_allow,
                            envoy=envoy),
            usage_filter(cluster_name=cluster_name, authority=authority),
            complete_request_filter()]


# A replica that stops answering (frozen, or its host gone) is noticed within a few seconds by HTTP/2
# pings, even mid-stream: a full-duplex stream (translation) has no per-message timer to notice it.
PROCESSOR_KEEPALIVE = {"interval": "1s", "timeout": "2s"}


# Envoy closes an ext_proc stream with a reset (RST_STREAM CANCEL) unless this is on; a reset that
# races the processor's last write makes grpc log an ExecuteBatchError traceback for a call that
# succeeded. Off by default in Envoy 1.40: sidecars must set it (bootstrap layered_runtime here;
# ProxyConfig runtimeValues in Istio).
EXT_PROC_RUNTIME = {"envoy.reloadable_features.ext_proc_graceful_grpc_close": True}


def processor_http2_options() -> dict[str, Any]:
    """``http2_protocol_options`` for the processor's cluster."""
    return {"connection_keepalive": dict(PROCESSOR_KEEPALIVE)}


def processor_failover() -> dict[str, Any]:
    """Processor cluster settings: a dead or draining replica stops getting new streams at once.

    Its first refused connection ejects it (outlier detection on local-origin failures), and the
    gRPC health check, which the processor turns NOT_SERVING when asked to stop, keeps it out.
    """
    return {
        "health_checks": [{
            "timeout": "1s", "interval": "2s", "unhealthy_threshold": 1, "healthy_threshold": 1,
            "no_traffic_interval": "2s",
            "grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"},
        }],
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "consecutive_gateway_failure": 2,
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        },
    }


# Fallback (docs/design/fallback.md): every provider route targets an aggregate cluster of
# [provider, relay]; a failed attempt of a call that carries a fallback token is retried once, which
# previous_priorities sends to the relay; the relay's 307 is followed internally with the body.
RETRIABLE_STATUS_CODES = (429, 500, 502, 503, 504, 529)  # 529: Anthropic's "overloaded"
MAX_INTERNAL_REDIRECTS = 4  # the longest chain: the first provider and four fallbacks
MAX_CONCURRENT_FALLBACKS = 10_000  # per sidecar; a fallback is cheap, and refusing one returns an error


def failover_cluster_name(provider_cluster: str) -> str:
    return f"ai-failover|{provider_cluster}"


def failover_cluster(provider_cluster: str, relay_cluster: str) -> dict[str, Any]:
    """The aggregate cluster a provider route targets: the provider first, the relay when it failed."""
    return {
        "name": failover_cluster_name(provider_cluster),
        "connect_timeout": "2s",
        "lb_policy": "CLUSTER_PROVIDED",
        # Every fallback is a retry of this cluster: Envoy's default of 3 concurrent retries would
        # hand most failing calls their error instead of the fallback under load (measured in bench/).
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_retries": MAX_CONCURRENT_FALLBACKS}]},
        "typed_extension_protocol_options": failover_protocol_options(),
        "cluster_type": {
            "name": "envoy.clusters.aggregate",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                             "clusters": [provider_cluster, relay_cluster]},
        },
    }


def provider_vhost_settings() -> dict[str, Any]:
    """VirtualHost fields for a provider host: the attempt count our upstream filters read, and the
    fallback state kept from callers (even in a 307 Envoy could not follow)."""
    return {"include_request_attempt_count": True,
            "response_headers_to_remove": list(INTERNAL_RESPONSE_HEADERS)}


def failover_route_settings() -> dict[str, Any]:
    """RouteAction fields for a provider route: retry to the relay, follow its redirect."""
    return {
        "retry_policy": {
            # Per-try timeouts count as resets; Envoy ignores them once the response has started,
            # so the policy's first_byte_timeout never cuts a stream that is flowing.
            "retry_on": "connect-failure,reset,retriable-status-codes",
            "retriable_status_codes": list(RETRIABLE_STATUS_CODES),
            "num_retries": 1,
            # The retry goes to the relay, not back to the failed provider: no reason to wait
            # Envoy's default 25 ms jittered back-off (it was most of the fallback's cost).
            "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.002s"},
            "retry_priority": {
                "name": "envoy.retry_priorities.previous_priorities",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3."
                             "PreviousPrioritiesConfig",
                    "update_frequency": 1,
                },
            },
            # Calls without a fallback chain are never retried here: their error goes to the caller.
            "retriable_request_headers": [{"name": FALLBACK_HEADER, "present_match": True}],
        },
        "internal_redirect_policy": {
            "max_internal_redirects": MAX_INTERNAL_REDIRECTS,
            "redirect_response_codes": [307],
            "response_headers_to_copy": [FALLBACK_HEADER],
        },
    }


# The usage switch is for Envoy only: never sent to providers (route_config.request_headers_to_remove).
INTERNAL_REQUEST_HEADERS: tuple[str, ...] = (USAGE_HEADER,)
# The relay's fallback state is for Envoy and the processor only: never shown to a caller, even in a
# 307 that Envoy could not follow (route_config.response_headers_to_remove).
INTERNAL_RESPONSE_HEADERS: tuple[str, ...] = (FALLBACK_HEADER,)


def failover_protocol_options() -> dict[str, Any]:
    """The failover cluster's upstream filters: the fallback state reaches the relay and nothing else.

    Envoy retries only calls whose request carries the fallback header, so the decision sets it to a
    bare marker and leaves the signed state in the call's metadata. Upstream filters belong to the
    aggregate cluster and so run for both of its members; the attempt count tells them apart (the
    provider is attempt 1, the relay attempt 2, as previous_priorities sends the one retry there):
    the provider's attempt goes without the marker, the relay's gets the state. Both mutate the one
    request the attempts share, which is why the relay's sets the header rather than keeps it.
    """
    strip = {"name": "ai.fallback_marker", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {"request_mutations": [{"remove": FALLBACK_HEADER}]},
    }}
    state = {"name": "ai.fallback_state", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {"request_mutations": [{"append": {
            "header": {"key": FALLBACK_HEADER,
                       "value": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{FALLBACK_STATE_KEY})%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}]},
    }}
    first_attempt = _composite("ai.first_attempt", {"matcher_tree": {
        "input": _header_input("attempt", "x-envoy-attempt-count"),
        "exact_match_map": {"map": {"1": _execute("provider", strip), "2": _execute("relay", state)}},
    }})
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http_protocol_options": {}},
            "http_filters": [
                first_attempt,
                {"name": "envoy.filters.http.upstream_codec", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}},
            ],
        }
    }


def response_headers_to_add() -> list[dict[str, Any]]:
    return [
        {
            "header": {"key": header, "value": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{key})%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            "keep_empty_value": False,
        }
        for header, key in RESPONSE_HEADERS
    ]


# Envoy's own error replies (upstream timeout, connection failure, ...) are plain text by default;
# these flags mark them, and the mappers below give them a JSON body in the caller's API format.
UPSTREAM_FAILURE_FLAGS = ("UT", "UF", "UH", "UC", "URX", "UO", "NR", "UMSDR", "DF")


def _json_bodies(condition: dict[str, Any], message: str, code: str) -> list[dict[str, Any]]:
    """Two mappers for one condition: Anthropic-style JSON for Anthropic callers, else OpenAI-style."""
    anthropic = {"header_filter": {"header": {"name": "anthropic-version", "present_match": True}}}
    return [
        {
            "filter": {"and_filter": {"filters": [condition, anthropic]}},
            "body_format_override": {
                "json_format": {"type": "error", "error": {"type": "api_error", "message": message}},
                "content_type": "application/json",
            },
        },
        {
            "filter": condition,
            "body_format_override": {
                "json_format": {"error": {"message": message, "type": "server_error", "param": None, "code": code}},
                "content_type": "application/json",
            },
        },
    ]


def local_reply_config() -> dict[str, Any]:
    """HCM ``local_reply_config``: Envoy-generated errors as OpenAI- or Anthropic-style JSON.

    The caller's format is told by the ``anthropic-version`` header every Anthropic client sends
    (the processor also sets it on calls it routes to an Anthropic provider). Replies that the
    processor generates itself keep their own body.
    """
    return {"mappers": [*upstream_failure_mappers(), *processor_failure_mappers()]}


def upstream_failure_mappers() -> list[dict[str, Any]]:
    """Upstream timeout, connection failure, overflow...: Envoy's reply body, as JSON."""
    flags = {"response_flag_filter": {"flags": list(UPSTREAM_FAILURE_FLAGS)}}
    return _json_bodies(flags, "%LOCAL_REPLY_BODY%", "%RESPONSE_CODE_DETAILS%")


def processor_failure_mappers() -> list[dict[str, Any]]:
    """The processor unreachable, failing (500) or too slow (504): a clear JSON error, 500 becoming 503.

    Matching on status is exact because the processor's own replies never use 500 or 504, and
    upstream failures are taken by the mappers before these (they carry response flags).
    """
    message = "the AI policy processor could not be reached; the call was not sent to any provider"
    mappers = []
    for status, answer in ((500, 503), (504, 504)):
        condition = {"status_code_filter": {"comparison": {
            "op": "EQ", "value": {"default_value": status, "runtime_key": f"ai_extproc.local_reply.status_{status}"}}}}
        for mapper in _json_bodies(condition, message, "%RESPONSE_CODE_DETAILS%"):
            if answer != status:
                mapper["status_code"] = answer
            mappers.append(mapper)
    return mappers


# --- the egress gateway's credential filter (docs/design/trust.md) ------------------------------------------
CREDENTIAL_FILTER_NAME = "ai.credentials"
# What the gateway tells the processor about the call: who sent it (the sidecar's mTLS peer), and where to.
CREDENTIAL_ATTRIBUTES: tuple[str, ...] = ("connection.uri_san_peer_certificate",)


def credential_filter(*, cluster_name: str, authority: str, message_timeout_ms: int = 2000) -> dict[str, Any]:
    """The egress gateway's HTTP filter: it trades the decision's grant for the provider credential.

    The processor's credential port checks the grant (signature, expiry, single use, the caller's
    mTLS identity, the provider host, the body it was issued for) and answers with the credential
    header; anything else is refused. The body is buffered so that its hash can be checked: a
    caller holding a grant cannot send another request than the one the policy decided.
    """
    return {
        "name": CREDENTIAL_FILTER_NAME,
        "typed_config": {
            "@type": EXT_PROC_TYPE,
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster_name, "authority": authority}},
            "failure_mode_allow": False,  # no grant check, no credential: fail closed
            "message_timeout": f"{message_timeout_ms / 1000:g}s",
            "processing_mode": {
                "request_header_mode": "SEND",
                "request_body_mode": "BUFFERED",
                "request_trailer_mode": "SKIP",
                "response_header_mode": "SKIP",
                "response_body_mode": "NONE",
                "response_trailer_mode": "SKIP",
            },
            "request_attributes": list(CREDENTIAL_ATTRIBUTES),
            "mutation_rules": {"allow_all_routing": False, "allow_envoy": False},
            "stat_prefix": "ai_credentials",
        },
    }
