"""A standalone Envoy bootstrap shaped like an Istio sidecar's outbound HTTP path.

The node carries the metadata Istio gives a sidecar (NAMESPACE, WORKLOAD_NAME, LABELS.app,
SERVICE_ACCOUNT), provider clusters use Istio's ``outbound|PORT||HOST`` naming, and routing is by
virtual host on the provider's authority, exactly as the mesh routes. The application calls the
listener with plain HTTP; our filter picks the provider and rewrites ``:authority`` to reach it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

from extproc.envoy_config.filter import (
    EXT_PROC_RUNTIME,
    INTERNAL_REQUEST_HEADERS,
    failover_cluster,
    failover_cluster_name,
    failover_route_settings,
    local_reply_config,
    processor_failover,
    processor_http2_options,
    processor_http_filters,
    provider_vhost_settings,
    response_headers_to_add,
)
from extproc.envoy_config.versions import STANDALONE_ENVOY, EnvoyVersion
from extproc.policy.model import Provider

PROCESSOR_CLUSTER = "ai-extproc"
RELAY_CLUSTER = "ai-extproc-relay"
PROCESSOR_AUTHORITY = "ai-extproc.ai-system.svc.cluster.local"
_NO_ROUTE_BODY = (
    '{"error":{"message":"no AI provider serves this host; call an AI endpoint such as '
    '/v1/chat/completions","type":"invalid_request_error","param":null,"code":"no_route"}}'
)


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where Envoy sends one provider authority."""

    authority: str
    service_port: int  # the port the application addresses (Istio names clusters by it)
    address: str
    port: int
    tls: bool = False

    @property
    def cluster_name(self) -> str:
        return f"outbound|{self.service_port}||{self.authority.split(':', 1)[0]}"

    @property
    def vhost_name(self) -> str:
        """Istio's name for this host's virtual host (``HOST:PORT``), which EnvoyFilter patches match."""
        return f"{self.authority.split(':', 1)[0]}:{self.service_port}"


def upstream_for(provider: Provider, override: tuple[str, int] | None = None) -> Upstream:
    """The provider's own host, or ``override`` (e.g. a local mock) when given."""
    parts = urlsplit(provider.base_url)
    tls = parts.scheme == "https"
    service_port = parts.port or (443 if tls else 80)
    if override is not None:
        return Upstream(provider.authority, service_port, override[0], override[1], tls=False)
    return Upstream(provider.authority, service_port, parts.hostname or "", service_port, tls)


@dataclass(frozen=True, slots=True)
class SidecarSpec:
    service: str
    namespace: str
    listen_port: int
    admin_port: int
    processor: tuple[str, int]
    upstreams: tuple[Upstream, ...]
    service_account: str | None = None
    labels: tuple[tuple[str, str], ...] = field(default=())
    access_log: bool = True
    with_processor: bool = True  # False: the same Envoy without our filter (the benchmark's baseline)
    more_processors: tuple[tuple[str, int], ...] = ()  # further replicas, load-balanced per stream
    relay: tuple[tuple[str, int], ...] = ()  # the processors' fallback relay ports; empty: no fallback
    failure_mode_allow: bool = False  # processor unreachable: pass calls untouched instead of a 503
    envoy: EnvoyVersion = STANDALONE_ENVOY  # the binary this bootstrap is for (versions.py: fields it lacks)

    @property
    def failover(self) -> bool:
        return self.with_processor and bool(self.relay)


def render_bootstrap(spec: SidecarSpec) -> dict[str, Any]:
    return {
        "node": _node(spec),
        "admin": {"address": _address("127.0.0.1", spec.admin_port)},
        "static_resources": {
            "listeners": [_listener(spec)],
            "clusters": [_processor_cluster((spec.processor, *spec.more_processors)),
                         *(_upstream_cluster(u) for u in _unique(spec)),
                         *(_failover_clusters(spec) if spec.failover else [])],
        },
        "layered_runtime": {"layers": [
            {"name": "static", "static_layer": dict(EXT_PROC_RUNTIME)},
            {"name": "admin", "admin_layer": {}},
        ]},
        # Bound the number of downstream connections, as a sidecar should.
        "overload_manager": {
            "resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                             "downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": 10000,
                },
            }],
        },
    }


def to_yaml(config: dict[str, Any], header: str = "") -> str:
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=120)
    return header + body


def _unique(spec: SidecarSpec) -> Iterable[Upstream]:
    seen: set[str] = set()
    for upstream in spec.upstreams:
        if upstream.cluster_name not in seen:
            seen.add(upstream.cluster_name)
            yield upstream


def _node(spec: SidecarSpec) -> dict[str, Any]:
    account = spec.service_account or spec.service
    pod = f"{spec.service}-0"
    return {
        "id": f"sidecar~127.0.0.1~{pod}.{spec.namespace}~{spec.namespace}.svc.cluster.local",
        "cluster": f"{spec.service}.{spec.namespace}",
        "metadata": {
            "NAME": pod,
            "NAMESPACE": spec.namespace,
            "WORKLOAD_NAME": spec.service,
            "SERVICE_ACCOUNT": account,
            "LABELS": {"app": spec.service, **dict(spec.labels)},
        },
    }


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


# What every Istio sidecar route carries before our EnvoyFilter's MERGE, which keeps these (it sets only
# the retry fields it names): the standalone sidecar has them too, so fallback is tested under the
# retry settings a mesh uses (tests/istio/test_mesh_e2e.py compares the two routes).
ISTIO_ROUTE_RETRY_DEFAULTS: dict[str, Any] = {
    "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
    "host_selection_retry_max_attempts": "5",
}


def _provider_route(spec: SidecarSpec, upstream: Upstream) -> dict[str, Any]:
    # Model timeouts come per request from policy; this is only the ceiling.
    if not spec.failover:
        return {"cluster": upstream.cluster_name, "timeout": "300s"}
    route = {"cluster": failover_cluster_name(upstream.cluster_name), "timeout": "300s", **failover_route_settings()}
    route["retry_policy"] = {**route["retry_policy"], **copy.deepcopy(ISTIO_ROUTE_RETRY_DEFAULTS)}
    return route


def _virtual_hosts(spec: SidecarSpec) -> list[dict[str, Any]]:
    """One per provider authority, routed as Istio routes it; then a 404 for any other host."""
    virtual_hosts = [
        {
            "name": upstream.vhost_name,
            **provider_vhost_settings(),
            "domains": [upstream.authority, f"{upstream.authority}:*"] if ":" not in upstream.authority
            else [upstream.authority],
            "routes": [{"match": {"prefix": "/"}, "route": _provider_route(spec, upstream)}],
        }
        for upstream in _unique(spec)
    ]
    return [*virtual_hosts, {
        "name": "no_ai_route",
        "domains": ["*"],
        "routes": [{
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": _NO_ROUTE_BODY}},
            "response_headers_to_add": [
                {"header": {"key": "content-type", "value": "application/json"},
                 "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
            ],
        }],
    }]


def _listener(spec: SidecarSpec) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "outbound_ai",
        "local_reply_config": local_reply_config(),
        "route_config": {
            "name": "outbound_ai",
            "virtual_hosts": _virtual_hosts(spec),
            "response_headers_to_add": response_headers_to_add(),
            "request_headers_to_remove": list(INTERNAL_REQUEST_HEADERS),
        },
        # Filters and routes see the path a provider would read: %2F decoded, // merged, dot segments
        # resolved (the processor classifies the same canonical form).
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD",
        "http_filters": [
            *(processor_http_filters(cluster_name=PROCESSOR_CLUSTER, authority=PROCESSOR_AUTHORITY,
                                     failure_mode_allow=spec.failure_mode_allow, envoy=spec.envoy)
              if spec.with_processor else []),
            {"name": "envoy.filters.http.router",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    if spec.access_log:
        hcm["access_log"] = [_stdout_access_log()]
    return {
        "name": "outbound_ai",
        "address": _address("127.0.0.1", spec.listen_port),
        "enable_reuse_port": False,  # fail loudly if the port is taken
        "traffic_direction": "OUTBOUND",
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }


def _stdout_access_log() -> dict[str, Any]:
    """One JSON line per request on Envoy's stdout, with the processor's decision (its dynamic metadata)."""
    return {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"json_format": {
                "start": "%START_TIME%",
                "method": "%REQ(:METHOD)%",
                "authority": "%REQ(:AUTHORITY)%",
                "path": "%REQ(:PATH)%",
                "status": "%RESPONSE_CODE%",
                "details": "%RESPONSE_CODE_DETAILS%",
                "cluster": "%UPSTREAM_CLUSTER%",
                "duration_ms": "%DURATION%",
                "request_id": "%REQ(X-REQUEST-ID)%",
                "ai": "%DYNAMIC_METADATA(ai.extproc)%",
            }},
        },
    }


def _failover_clusters(spec: SidecarSpec) -> list[dict[str, Any]]:
    relay = {
        "name": RELAY_CLUSTER,
        "type": "STATIC" if all(_is_ip(host) for host, _ in spec.relay) else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": RELAY_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}
                                            for host, port in spec.relay]}],
        },
    }
    return [relay, *(failover_cluster(u.cluster_name, RELAY_CLUSTER) for u in _unique(spec))]


def _http2_options() -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": processor_http2_options()},
        }
    }


def _processor_cluster(replicas: tuple[tuple[str, int], ...]) -> dict[str, Any]:
    return {
        "name": PROCESSOR_CLUSTER,
        "type": "STATIC" if all(_is_ip(host) for host, _ in replicas) else "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _http2_options(),
        **processor_failover(),
        "load_assignment": {
            "cluster_name": PROCESSOR_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}
                                            for host, port in replicas]}],
        },
    }


def _upstream_cluster(upstream: Upstream) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": upstream.cluster_name,
        "type": "STATIC" if _is_ip(upstream.address) else "STRICT_DNS",
        "connect_timeout": "2s",
        "load_assignment": _endpoints(upstream.cluster_name, upstream.address, upstream.port),
    }
    if upstream.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": upstream.address,
            },
        }
    return cluster


def _endpoints(cluster: str, address: str, port: int) -> dict[str, Any]:
    return {"cluster_name": cluster,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(address, port)}}]}]}


def _is_ip(address: str) -> bool:
    parts = address.split(".")
    return len(parts) == 4 and all(p.isdigit() for p in parts)
