"""Istio objects that put our filter into sidecars, rendered from the same definition as ``envoy/``.

* ``EnvoyFilter``: on SIDECAR_OUTBOUND, for every port an AI provider is called on, the processor's
  HTTP filters are inserted before the router *disabled*, and enabled again only on the provider
  virtual hosts (Istio names them ``host:port``), which also get the response headers. Other
  traffic through the same listener never reaches the processor. The processor is reached through
  Istio's own outbound cluster for its Service (``outbound|PORT||HOST``: EDS, auto-mTLS), with an
  explicit ``authority`` because a ``|`` is not valid in ``:authority``.
* ``ServiceEntry`` + ``DestinationRule`` per external provider: the application calls plain
  ``http://api.openai.com`` (port 80, so the sidecar sees and can rewrite the request) and the
  sidecar originates TLS to 443.
* ``AIProvider`` objects for the same providers (credential from a Secret) and ``AIPolicy`` objects
  from policy files.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from extproc.envoy_config.filter import (
    EXT_PROC_TYPE,
    FILTER_NAME,
    INTERNAL_REQUEST_HEADERS,
    failover_cluster,
    failover_cluster_name,
    failover_route_settings,
    local_reply_config,
    processor_http2_options,
    processor_http_filters,
    provider_vhost_settings,
    response_headers_to_add,
)
from extproc.policy.crd import API_VERSION
from extproc.policy.model import Provider

HCM = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"
FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
SECRET_KEY = "api-key"


@dataclass(frozen=True, slots=True)
class IstioSpec:
    providers: tuple[Provider, ...]
    processor_host: str = "ai-extproc.ai-system.svc.cluster.local"
    processor_port: int = 50051
    relay_port: int = 50052  # the processor Service's fallback relay port (HTTP)
    filter_namespace: str = "istio-system"  # the root namespace: the selector below applies in every namespace
    selector: tuple[tuple[str, str], ...] = (("ai.extproc.io/enabled", "true"),)  # () = every workload
    provider_namespace: str = "ai-system"  # AIProviders, ServiceEntries and DestinationRules live here
    name: str = "ai-extproc"
    labels: Mapping[str, str] = field(default_factory=lambda: {"app.kubernetes.io/part-of": "ai-mesh-extproc"})

    @property
    def processor_cluster(self) -> str:
        return f"outbound|{self.processor_port}||{self.processor_host}"

    @property
    def relay_cluster(self) -> str:
        return f"outbound|{self.relay_port}||{self.processor_host}"


@dataclass(frozen=True, slots=True)
class ProviderHost:
    host: str
    port: int

    @property
    def vhost(self) -> str:
        return f"{self.host}:{self.port}"  # Istio's virtual host name in route configuration PORT

    @property
    def external(self) -> bool:
        return not self.host.endswith((".svc", ".svc.cluster.local", ".local"))


def provider_host(provider: Provider) -> ProviderHost:
    parts = urlsplit(provider.base_url)
    if parts.scheme != "http":
        raise ValueError(f"provider {provider.name!r}: base_url must be http:// (the sidecar originates TLS); "
                         f"an https:// call is opaque to the sidecar and cannot be governed")
    return ProviderHost(parts.hostname or "", parts.port or 80)


def processor_filters(spec: IstioSpec) -> list[dict[str, Any]]:
    """The HTTP filters our processor needs, in order, pointed at the processor's Istio cluster."""
    return processor_http_filters(cluster_name=spec.processor_cluster, authority=spec.processor_host)


def _hosts(spec: IstioSpec) -> list[ProviderHost]:
    seen: dict[str, ProviderHost] = {}
    for provider in spec.providers:
        host = provider_host(provider)
        seen.setdefault(host.vhost, host)
    return list(seen.values())


def provider_calls_only(config: dict[str, Any], hosts: Iterable[ProviderHost]) -> dict[str, Any]:
    """``local_reply_config`` whose mappers also require a provider host as ``:authority``.

    In a sidecar the HCM serves every service on the port, so replies to other services must keep
    Envoy's usual bodies; a call to (or re-routed to) a provider carries the provider's host.
    """
    names = "|".join(re.escape(h.host) for h in hosts)
    to_provider = {"header_filter": {"header": {
        "name": ":authority", "string_match": {"safe_regex": {"regex": f"^({names})(:[0-9]+)?$"}}}}}
    scoped = copy.deepcopy(config)
    for mapper in scoped["mappers"]:
        mapper["filter"] = {"and_filter": {"filters": [to_provider, mapper["filter"]]}}
    return scoped


def envoy_filter_object(spec: IstioSpec) -> dict[str, Any]:
    hosts = _hosts(spec)
    patches: list[dict[str, Any]] = []
    for port in sorted({h.port for h in hosts}):
        listener_match = {"portNumber": port, "filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}}}
        for http_filter in processor_filters(spec):
            # Disabled in the chain, enabled per provider vhost below: nothing else pays for it.
            patches.append({
                "applyTo": "HTTP_FILTER",
                "match": {"context": "SIDECAR_OUTBOUND", "listener": copy.deepcopy(listener_match)},
                "patch": {"operation": "INSERT_BEFORE", "value": {**http_filter, "disabled": True}},
            })
        # Envoy's own errors (provider or processor unreachable, timeouts) in the caller's API format.
        # The setting is HCM-wide, so it is narrowed to calls to provider hosts: other services on
        # this port keep Envoy's usual replies.
        patches.append({
            "applyTo": "NETWORK_FILTER",
            "match": {"context": "SIDECAR_OUTBOUND", "listener": {"portNumber": port, "filterChain": {
                "filter": {"name": HCM}}}},
            "patch": {"operation": "MERGE", "value": {"name": HCM, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                         "HttpConnectionManager",
                "local_reply_config": provider_calls_only(local_reply_config(), hosts),
            }}}},
        )
    # HTTP/2 pings on the connection to the processor: a frozen replica is left within seconds, even
    # mid-stream (Istio sets http2_protocol_options on a gRPC port's cluster; this adds the pings).
    patches.append({
        "applyTo": "CLUSTER",
        "match": {"context": "SIDECAR_OUTBOUND", "cluster": {"service": spec.processor_host,
                                                              "portNumber": spec.processor_port}},
        "patch": {"operation": "MERGE", "value": {"typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": processor_http2_options()},
            }}}},
    })
    for host in hosts:
        # Fallback: the provider's route targets [provider, relay], retrying a failed attempt of a
        # call with a fallback chain to the relay and following its redirect (docs/design/fallback.md).
        provider_cluster = f"outbound|{host.port}||{host.host}"
        patches.append({
            "applyTo": "CLUSTER",
            "match": {"context": "SIDECAR_OUTBOUND"},
            "patch": {"operation": "ADD", "value": failover_cluster(provider_cluster, spec.relay_cluster)},
        })
        patches.append({
            "applyTo": "HTTP_ROUTE",
            "match": {"context": "SIDECAR_OUTBOUND", "routeConfiguration": {
                "portNumber": host.port, "vhost": {"name": host.vhost, "route": {"action": "ROUTE"}}}},
            "patch": {"operation": "MERGE", "value": {"route": {
                "cluster": failover_cluster_name(provider_cluster), **failover_route_settings()}}},
        })
        vhost: dict[str, Any] = {
            "typed_per_filter_config": {f["name"]: {"@type": FILTER_CONFIG, "config": {}}
                                        for f in processor_filters(spec)},
            "response_headers_to_add": response_headers_to_add(),
            "request_headers_to_remove": list(INTERNAL_REQUEST_HEADERS),
            **provider_vhost_settings(),
        }
        patches.append({
            "applyTo": "VIRTUAL_HOST",
            "match": {"context": "SIDECAR_OUTBOUND", "routeConfiguration": {
                "portNumber": host.port, "vhost": {"name": host.vhost}}},
            "patch": {"operation": "MERGE", "value": vhost},
        })
    envoy_filter_spec: dict[str, Any] = {"configPatches": patches}
    if spec.selector:
        envoy_filter_spec = {"workloadSelector": {"labels": dict(spec.selector)}, **envoy_filter_spec}
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": spec.name, "namespace": spec.filter_namespace, "labels": dict(spec.labels)},
        "spec": envoy_filter_spec,
    }


FAIL_OPEN_LABEL = ("ai.extproc.io/on-processor-failure", "open")


def fail_open_object(spec: IstioSpec) -> dict[str, Any]:
    """Pods labelled ``ai.extproc.io/on-processor-failure: open`` pass AI calls untouched when the
    processor is unreachable; every other opted-in pod fails closed (503 JSON). Applied after the
    main EnvoyFilter (higher priority), on the filter it inserted."""
    ports = sorted({h.port for h in _hosts(spec)})
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": f"{spec.name}-fail-open", "namespace": spec.filter_namespace,
                     "labels": dict(spec.labels)},
        "spec": {
            "workloadSelector": {"labels": dict([FAIL_OPEN_LABEL])},
            "priority": 10,
            "configPatches": [{
                "applyTo": "HTTP_FILTER",
                "match": {"context": "SIDECAR_OUTBOUND", "listener": {"portNumber": port, "filterChain": {
                    "filter": {"name": HCM, "subFilter": {"name": FILTER_NAME}}}}},
                "patch": {"operation": "MERGE", "value": {"name": FILTER_NAME, "typed_config": {
                    "@type": EXT_PROC_TYPE, "failure_mode_allow": True}}},
            } for port in ports],
        },
    }


def provider_objects(spec: IstioSpec) -> list[dict[str, Any]]:
    """Per provider: its AIProvider and, for hosts outside the mesh, ServiceEntry + DestinationRule."""
    objects: list[dict[str, Any]] = []
    for provider in spec.providers:
        host = provider_host(provider)
        meta = {"name": provider.name, "namespace": spec.provider_namespace, "labels": dict(spec.labels)}
        provider_spec: dict[str, Any] = {"api": provider.api, "base_url": provider.base_url}
        if provider.credential is not None:
            provider_spec["credential"] = {"secretRef": {"name": f"{provider.name}-api-key", "key": SECRET_KEY}}
        if provider.api == "anthropic":
            provider_spec["anthropic_version"] = provider.anthropic_version
        objects.append({"apiVersion": API_VERSION, "kind": "AIProvider", "metadata": meta, "spec": provider_spec})
        if not host.external:
            continue  # an in-mesh model server is already a Service: Istio knows its host and port
        objects.append({
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": copy.deepcopy(meta),
            "spec": {
                "hosts": [host.host],
                "exportTo": ["*"],
                "location": "MESH_EXTERNAL",
                "resolution": "DNS",
                "ports": [
                    # The application speaks plain HTTP to port 80; the sidecar sends it to 443.
                    {"number": host.port, "name": f"http-{provider.name}", "protocol": "HTTP", "targetPort": 443},
                    {"number": 443, "name": f"https-{provider.name}", "protocol": "HTTPS"},
                ],
            },
        })
        objects.append({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": copy.deepcopy(meta),
            "spec": {
                "host": host.host,
                "exportTo": ["*"],
                "trafficPolicy": {"portLevelSettings": [
                    {"port": {"number": host.port}, "tls": {"mode": "SIMPLE", "sni": host.host}},
                ]},
            },
        })
    return objects


def policy_objects(policies: Iterable[tuple[str, Mapping[str, Any]]], namespace: str) -> list[dict[str, Any]]:
    """AIPolicy objects whose spec is each policy file's content, unchanged."""
    objects = []
    for service, data in policies:
        spec = {k: v for k, v in data.items() if k != "namespace"}
        objects.append({"apiVersion": API_VERSION, "kind": "AIPolicy",
                        "metadata": {"name": service, "namespace": namespace}, "spec": spec})
    return objects
