"""The one definition of the ext_proc HTTP filter and the Envoy route settings it relies on."""

from __future__ import annotations

from typing import Any

from extproc.core.decision import METADATA_NAMESPACE
from extproc.core.identity import REQUEST_ATTRIBUTES

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
)


def ext_proc_filter(
    *,
    cluster_name: str,
    authority: str,
    message_timeout_ms: int = 5000,
    failure_mode_allow: bool = False,
) -> dict[str, Any]:
    """The HTTP filter entry for an HCM ``http_filters`` list.

    Processing mode: request headers SENT and the body STREAMED without waiting for the header
    answer, so the processor answers headers (routing, credentials) once the body is in: one round
    trip. Response phases are off: replies, including SSE streams, never pass through us.
    ``allow_all_routing`` lets us rewrite ``:authority`` to route to the provider; ``allow_envoy``
    lets us set ``x-envoy-upstream-rq-timeout-ms`` from policy; ``allow_content_length_header``
    keeps the content-length we set after rewriting the body.
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
            "allow_content_length_header": True,
            "request_attributes": list(REQUEST_ATTRIBUTES),
            "mutation_rules": {"allow_all_routing": True, "allow_envoy": True},
            "metadata_options": {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
            "stat_prefix": "ai_extproc",
        },
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


def local_reply_config() -> dict[str, Any]:
    """HCM ``local_reply_config``: Envoy-generated errors as OpenAI- or Anthropic-style JSON.

    The caller's format is told by the ``anthropic-version`` header every Anthropic client sends
    (the processor also sets it on calls it routes to an Anthropic provider). Replies that the
    processor generates itself carry no upstream flag and keep their own body.
    """
    flags = {"response_flag_filter": {"flags": list(UPSTREAM_FAILURE_FLAGS)}}
    anthropic = {"header_filter": {"header": {"name": "anthropic-version", "present_match": True}}}
    return {
        "mappers": [
            {
                "filter": {"and_filter": {"filters": [flags, anthropic]}},
                "body_format_override": {
                    "json_format": {"type": "error", "error": {"type": "api_error", "message": "%LOCAL_REPLY_BODY%"}},
                    "content_type": "application/json",
                },
            },
            {
                "filter": flags,
                "body_format_override": {
                    "json_format": {"error": {"message": "%LOCAL_REPLY_BODY%", "type": "server_error", "param": None,
                                              "code": "%RESPONSE_CODE_DETAILS%"}},
                    "content_type": "application/json",
                },
            },
        ]
    }
