"""Istio objects that put our filter into sidecars, rendered from the same definition as ``envoy/``.

* ``EnvoyFilter``: on SIDECAR_OUTBOUND, for every port an AI provider is called on, the processor's
  HTTP filters are inserted before the router *disabled*, and enabled again only on the provider
  virtual hosts (Istio names them ``host:port``), which also get the response headers. Other
  traffic through the same listener never reaches the processor. The processor is reached through
  Istio's own outbound cluster for its Service (``outbound|PORT||HOST``: EDS, auto-mTLS), with an
  explicit ``authority`` because a ``|`` is not valid in ``:authority``.
* ``ServiceEntry`` + ``DestinationRule`` per external provider: the application calls plain
  ``http://api.openai.com`` (port 80, so the sidecar sees and can rewrite the request; the entry has
  no other port, so there is no TLS route around the policy) and TLS to 443 is originated by the
  sidecar (``credentials="sidecar"``) or by the egress gateway (``credentials="gateway"``).
* The egress gateway (``credentials="gateway"``, the default; docs/istio-security.md): a dedicated
  gateway Deployment that holds no keys, the only way out to the provider hosts. Sidecars reach it
  over Istio mTLS; its ``EnvoyFilter`` trades the decision's single-use grant for the provider key at
  the processor's credential port, so no key ever enters an application's pod.
* The processor's closed ports: ``PeerAuthentication`` (STRICT), an ``AuthorizationPolicy`` and a
  ``NetworkPolicy`` that admit each port only from its intended callers, and a ``Sidecar`` with
  ``REGISTRY_ONLY`` egress in every client namespace (no way out to unregistered hosts).
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

from extproc.base.wire import GRANT_HEADER
from extproc.core.grants import in_mesh
from extproc.envoy_config.filter import (
    EXT_PROC_TYPE,
    FILTER_NAME,
    INTERNAL_REQUEST_HEADERS,
    MAX_FALLBACK_REQUEST_BYTES,
    credential_filter,
    failover_cluster,
    failover_cluster_name,
    failover_route_settings,
    local_reply_config,
    processor_http2_options,
    processor_http_filters,
    provider_vhost_settings,
    response_headers_to_add,
)
from extproc.envoy_config.versions import DEFAULT_ISTIO, EnvoyVersion, envoy_for_istio
from extproc.policy.crd import API_VERSION
from extproc.policy.model import Provider

HCM = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"
FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
SECRET_KEY = "api-key"


CREDENTIAL_MODES = ("gateway", "sidecar")
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
PROCESSOR_SERVICE = ("ai-extproc", "ai-system")  # istio/processor.yaml: the processor's Service and namespace


def service_host(name: str, namespace: str, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str:
    """A Service's fully qualified name, as Istio names its clusters (``outbound|PORT||<this>``)."""
    return f"{name}.{namespace}.svc.{cluster_domain}"
# Prometheus scraping /metrics with the mesh's certificates (kube-prometheus-stack's account).
METRICS_ACCOUNT = ("monitoring", "prometheus-k8s")


@dataclass(frozen=True, slots=True)
class IstioSpec:
    providers: tuple[Provider, ...]
    processor_host: str = service_host(*PROCESSOR_SERVICE)
    processor_port: int = 50051
    relay_port: int = 50052  # the processor Service's fallback relay port (HTTP)
    credentials_port: int = 50053  # the processor Service's credential port (gRPC, the egress gateway only)
    admin_port: int = 9902  # the processor's /metrics, /config, /quota
    filter_namespace: str = "istio-system"  # the root namespace: the selector below applies in every namespace
    selector: tuple[tuple[str, str], ...] = (("ai.extproc.io/enabled", "true"),)  # () = every workload
    provider_namespace: str = "ai-system"  # AIProviders, ServiceEntries, DestinationRules, the egress gateway
    name: str = "ai-extproc"
    labels: Mapping[str, str] = field(default_factory=lambda: {"app.kubernetes.io/part-of": "ai-mesh-extproc"})
    # gateway: keys are added only at the egress gateway; sidecar: the decision hands them to the
    # caller's sidecar (single-tenant development clusters only: docs/istio-security.md).
    credentials: str = "gateway"
    gateway_name: str = "ai-egress"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    client_namespaces: tuple[str, ...] = ()  # where opted-in workloads run: they alone reach the decision port
    metrics_principal: str = ""  # default: <trust domain>/ns/monitoring/sa/prometheus-k8s
    max_body_bytes: int = 4 * 1024 * 1024  # the mesh settings' max_body_bytes: what a decision may let through
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN  # Service names: <name>.<namespace>.svc.<cluster domain>
    istio_version: str = DEFAULT_ISTIO  # the sidecars' Istio release: its Envoy decides which fields are written

    def __post_init__(self) -> None:
        if self.credentials not in CREDENTIAL_MODES:
            raise ValueError(f"credentials must be one of {', '.join(CREDENTIAL_MODES)}, not {self.credentials!r}")
        envoy_for_istio(self.istio_version)  # an unsupported release is refused here, not at apply time

    @property
    def envoy(self) -> EnvoyVersion:
        return envoy_for_istio(self.istio_version)

    @property
    def processor_cluster(self) -> str:
        return f"outbound|{self.processor_port}||{self.processor_host}"

    @property
    def relay_cluster(self) -> str:
        return f"outbound|{self.relay_port}||{self.processor_host}"

    @property
    def credentials_cluster(self) -> str:
        return f"outbound|{self.credentials_port}||{self.processor_host}"

    @property
    def processor_service(self) -> str:
        return self.processor_host.split(".")[0]

    @property
    def processor_namespace(self) -> str:
        """The processor's namespace: the platform namespace, the only one admitted to its admin port."""
        parts = self.processor_host.split(".")
        return parts[1] if len(parts) > 1 else self.provider_namespace

    @property
    def at_gateway(self) -> bool:
        return self.credentials == "gateway"

    @property
    def gateway_namespace(self) -> str:
        return self.provider_namespace  # next to the ServiceEntries and DestinationRules it uses

    @property
    def gateway_host(self) -> str:
        return service_host(self.gateway_name, self.gateway_namespace, self.cluster_domain)

    @property
    def gateway_principal(self) -> str:
        return self.principal(self.gateway_namespace, self.gateway_name)

    @property
    def gateway_buffer_bytes(self) -> int:
        """What the gateway may hold of one request: the credential filter buffers the whole body (its
        hash is checked), and Envoy answers 413 beyond the listener's buffer limit (1 MiB by default).
        Twice the policy's limit: a decision may rewrite the body (a fallback's translation)."""
        return max(MAX_FALLBACK_REQUEST_BYTES, 2 * self.max_body_bytes)

    @property
    def scraper_principal(self) -> str:
        return self.metrics_principal or self.principal(*METRICS_ACCOUNT)

    def principal(self, namespace: str, service_account: str) -> str:
        """An Istio AuthorizationPolicy principal: the peer certificate's SPIFFE id without ``spiffe://``."""
        return f"{self.trust_domain}/ns/{namespace}/sa/{service_account}"


@dataclass(frozen=True, slots=True)
class ProviderHost:
    host: str
    port: int
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN

    @property
    def fqdn(self) -> str:
        """The name Istio gives the host's clusters and virtual hosts: a Service's is fully qualified."""
        return f"{self.host}.{self.cluster_domain}" if self.host.endswith(".svc") else self.host

    @property
    def vhost(self) -> str:
        return f"{self.fqdn}:{self.port}"  # Istio's virtual host name in route configuration PORT

    @property
    def external(self) -> bool:
        return not in_mesh(self.host, self.cluster_domain)


def provider_host(provider: Provider, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> ProviderHost:
    parts = urlsplit(provider.base_url)
    if parts.scheme != "http":
        raise ValueError(f"provider {provider.name!r}: base_url must be http:// (the sidecar originates TLS); "
                         f"an https:// call is opaque to the sidecar and cannot be governed")
    return ProviderHost(parts.hostname or "", parts.port or 80, cluster_domain)


def processor_filters(spec: IstioSpec) -> list[dict[str, Any]]:
    """The HTTP filters our processor needs, in order, pointed at the processor's Istio cluster."""
    return processor_http_filters(cluster_name=spec.processor_cluster, authority=spec.processor_host,
                                  envoy=spec.envoy)


def _hosts(spec: IstioSpec) -> list[ProviderHost]:
    return list(_named_hosts(spec))


def _named_hosts(spec: IstioSpec) -> dict[ProviderHost, str]:
    """Each provider host, named after the first provider on it (a DNS label, for subsets and objects)."""
    seen: dict[ProviderHost, str] = {}
    for provider in spec.providers:
        host = provider_host(provider, spec.cluster_domain)
        seen.setdefault(host, re.sub(r"[^a-z0-9-]+", "-", provider.name.lower()).strip("-") or "provider")
    return seen


def external_hosts(spec: IstioSpec) -> dict[ProviderHost, str]:
    """The hosts outside the mesh (the ones the egress gateway serves in gateway mode), with their names."""
    return {host: name for host, name in _named_hosts(spec).items() if host.external}


GATEWAY_PORT = 80  # the egress gateway Service's port: sidecars reach it over Istio mTLS


def route_target(spec: IstioSpec, host: ProviderHost) -> str:
    """The cluster a provider route sends a call to first.

    Sidecar mode, and in-mesh model servers: the provider's own cluster. Gateway mode: the egress
    gateway's subset for that host (its SNI names the host the gateway's mTLS server expects). The
    route's cluster is replaced by our failover aggregate, which names this cluster directly: the
    VirtualService's mesh route to the gateway would be bypassed if it named the provider's.
    """
    if spec.at_gateway and host.external:
        return f"outbound|{GATEWAY_PORT}|{external_hosts(spec)[host]}|{spec.gateway_host}"
    return f"outbound|{host.port}||{host.fqdn}"


def provider_calls_only(config: dict[str, Any], hosts: Iterable[ProviderHost]) -> dict[str, Any]:
    """``local_reply_config`` whose mappers also require a provider host as ``:authority``.

    In a sidecar the HCM serves every service on the port, so replies to other services must keep
    Envoy's usual bodies; a call to (or re-routed to) a provider carries the provider's host.
    """
    # One small match per host, not one regex of all: RE2 refuses a program over 100 instructions, which
    # four provider hosts already exceed.
    matches = [{"header_filter": {"header": {"name": ":authority", "string_match": match}}}
               for h in hosts for match in ({"exact": h.host}, {"prefix": h.host + ":"})]
    to_provider = matches[0] if len(matches) == 1 else {"or_filter": {"filters": matches}}
    scoped = copy.deepcopy(config)
    for mapper in scoped["mappers"]:
        mapper["filter"] = {"and_filter": {"filters": [to_provider, mapper["filter"]]}}
    return scoped


def envoy_filter_object(spec: IstioSpec) -> dict[str, Any]:
    hosts = _hosts(spec)
    patches = [
        *(patch for port in sorted({h.port for h in hosts}) for patch in _listener_patches(spec, port, hosts)),
        _processor_pings_patch(spec),
        *(patch for host in hosts for patch in _provider_host_patches(spec, host)),
    ]
    envoy_filter_spec: dict[str, Any] = {"configPatches": patches}
    if spec.selector:
        envoy_filter_spec = {"workloadSelector": {"labels": dict(spec.selector)}, **envoy_filter_spec}
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": spec.name, "namespace": spec.filter_namespace, "labels": dict(spec.labels)},
        "spec": envoy_filter_spec,
    }


def _listener_patches(spec: IstioSpec, port: int, hosts: list[ProviderHost]) -> list[dict[str, Any]]:
    """On the outbound listener of a port providers are called on: our filters, and our error replies."""
    listener_match = {"portNumber": port, "filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}}}
    patches = [
        # Disabled in the chain, enabled per provider vhost (_provider_host_patches): nothing else pays for it.
        {
            "applyTo": "HTTP_FILTER",
            "match": {"context": "SIDECAR_OUTBOUND", "listener": copy.deepcopy(listener_match)},
            "patch": {"operation": "INSERT_BEFORE", "value": {**http_filter, "disabled": True}},
        }
        for http_filter in processor_filters(spec)
    ]
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
    return patches


def _processor_pings_patch(spec: IstioSpec) -> dict[str, Any]:
    """HTTP/2 pings on the connection to the processor: a frozen replica is left within seconds, even
    mid-stream (Istio sets http2_protocol_options on a gRPC port's cluster; this adds the pings)."""
    return {
        "applyTo": "CLUSTER",
        "match": {"context": "SIDECAR_OUTBOUND", "cluster": {"service": spec.processor_host,
                                                              "portNumber": spec.processor_port}},
        "patch": {"operation": "MERGE", "value": {"typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": processor_http2_options()},
            }}}},
    }


def _provider_host_patches(spec: IstioSpec, host: ProviderHost) -> list[dict[str, Any]]:
    """A provider host's failover cluster, its route through it, and its vhost with our filters enabled."""
    # Fallback: the provider's route targets [provider, relay], retrying a failed attempt of a
    # call with a fallback chain to the relay and following its redirect (docs/design/fallback.md).
    # In gateway mode "provider" is the egress gateway's cluster for that host.
    provider_cluster = route_target(spec, host)
    vhost: dict[str, Any] = {
        "typed_per_filter_config": {f["name"]: {"@type": FILTER_CONFIG, "config": {}}
                                    for f in processor_filters(spec)},
        "response_headers_to_add": response_headers_to_add(),
        "request_headers_to_remove": list(INTERNAL_REQUEST_HEADERS),
        **provider_vhost_settings(),
    }
    return [
        {
            "applyTo": "CLUSTER",
            "match": {"context": "SIDECAR_OUTBOUND"},
            "patch": {"operation": "ADD", "value": failover_cluster(provider_cluster, spec.relay_cluster)},
        },
        {
            "applyTo": "HTTP_ROUTE",
            "match": {"context": "SIDECAR_OUTBOUND", "routeConfiguration": {
                "portNumber": host.port, "vhost": {"name": host.vhost, "route": {"action": "ROUTE"}}}},
            "patch": {"operation": "MERGE", "value": {"route": {
                "cluster": failover_cluster_name(provider_cluster), **failover_route_settings()}}},
        },
        {
            "applyTo": "VIRTUAL_HOST",
            "match": {"context": "SIDECAR_OUTBOUND", "routeConfiguration": {
                "portNumber": host.port, "vhost": {"name": host.vhost}}},
            "patch": {"operation": "MERGE", "value": vhost},
        },
    ]


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
        host = provider_host(provider, spec.cluster_domain)
        meta = {"name": provider.name, "namespace": spec.provider_namespace, "labels": dict(spec.labels)}
        objects.append({"apiVersion": API_VERSION, "kind": "AIProvider", "metadata": meta,
                        "spec": _provider_spec(provider)})
        if not host.external:
            continue  # an in-mesh model server is already a Service: Istio knows its host and port
        if not provider.upstream_tls:
            objects.append(_plain_service_entry(provider, host, meta))
            continue
        objects.append({
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": copy.deepcopy(meta),
            "spec": {
                "hosts": [host.host],
                "exportTo": ["*"],
                "location": "MESH_EXTERNAL",
                "resolution": "DNS",
                # Only the plain-HTTP port the policy governs, sent on to 443 with TLS originated in
                # the mesh: no TLS port, so a workload has no route to the host around the policy
                # (with REGISTRY_ONLY egress, an https:// call goes nowhere).
                "ports": [
                    {"number": host.port, "name": f"http-{provider.name}", "protocol": "HTTP",
                     "targetPort": provider.upstream_port or 443},
                ],
            },
        })
        objects.append({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": copy.deepcopy(meta),
            "spec": {
                "host": host.host,
                # Gateway mode: TLS is originated by the egress gateway only (it runs in this
                # namespace); a sidecar elsewhere has no working route of its own to the provider.
                "exportTo": ["."] if spec.at_gateway else ["*"],
                "trafficPolicy": {"portLevelSettings": [
                    {"port": {"number": host.port}, "tls": {"mode": "SIMPLE", "sni": host.host}},
                ]},
            },
        })
    return objects


def _provider_spec(provider: Provider) -> dict[str, Any]:
    """The AIProvider spec: the provider entry without its name, a key or token file as a Secret reference
    (the processor mounts it), a cloud credential chain as it is (it needs no Secret)."""
    spec: dict[str, Any] = provider.model_dump(mode="json", exclude={"name", "credential"}, exclude_defaults=True)
    spec["api"], spec["base_url"] = provider.api, provider.base_url
    if provider.api == "anthropic":
        spec["anthropic_version"] = provider.anthropic_version
    source = provider.credential
    if source is None:
        return spec
    credential: dict[str, Any] = {"type": source.type} if source.type != "api_key" else {}
    if source.type == "aws":
        credential.update({"profile": source.profile} if source.profile else {})
    elif source.type != "google" or source.file is not None:
        credential["secretRef"] = {"name": f"{provider.name}-{_SECRET_SUFFIX.get(source.type, 'api-key')}",
                                   "key": SECRET_KEY}
    spec["credential"] = credential
    return spec


_SECRET_SUFFIX = {"entra_id": "entra-token", "google": "service-account"}


def _plain_service_entry(provider: Provider, host: ProviderHost, meta: dict[str, Any]) -> dict[str, Any]:
    """A host outside the mesh reached in plain HTTP (``upstream_tls: false``): no TLS origination."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": copy.deepcopy(meta),
        "spec": {
            "hosts": [host.host], "exportTo": ["*"], "location": "MESH_EXTERNAL", "resolution": "DNS",
            "ports": [{"number": host.port, "name": f"http-{provider.name}", "protocol": "HTTP",
                       "targetPort": provider.upstream_port or host.port}],
        },
    }


# --- the egress gateway (credentials="gateway"): the only way out to the provider hosts ----------------------------


def egress_gateway_objects(spec: IstioSpec) -> list[dict[str, Any]]:
    """The egress gateway and the routes through it, for every external provider host (none in sidecar mode).

    Sidecars send provider calls to the gateway over Istio mTLS (a subset per host whose SNI names
    the host: the gateway's mTLS server accepts only those names); the gateway's credential filter
    asks the processor's credential port for the key, which it grants only for the decision's own
    grant, presented by the caller it was issued to; the gateway originates TLS to the provider.
    The gateway holds no key itself: no Secret, no volume, no API access.
    """
    hosts = external_hosts(spec)
    if not spec.at_gateway or not hosts:
        return []
    return [
        # Its mTLS identity is what the processor's credential port admits; it is bound to nothing.
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _gateway_meta(spec, spec.gateway_name),
         "automountServiceAccountToken": False},
        _gateway_deployment(spec),
        _gateway_service(spec),
        _gateway_object(spec, hosts),
        _gateway_destination_rule(spec, hosts),
        *(_gateway_virtual_service(spec, host, subset) for host, subset in hosts.items()),
        gateway_envoy_filter_object(spec),
    ]


def _gateway_meta(spec: IstioSpec, object_name: str, **labels: str) -> dict[str, Any]:
    return {"name": object_name, "namespace": spec.gateway_namespace, "labels": {**spec.labels, **labels}}


def _gateway_selector(spec: IstioSpec) -> dict[str, str]:
    return {"istio": spec.gateway_name}


def _gateway_deployment(spec: IstioSpec) -> dict[str, Any]:
    name, selector = spec.gateway_name, _gateway_selector(spec)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _gateway_meta(spec, name, app=name, **selector),
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": dict(selector)},
            "template": {
                "metadata": {
                    # Istio's gateway injection: the proxy is the pod's only container.
                    "annotations": {"inject.istio.io/templates": "gateway"},
                    "labels": {"app": name, **selector, "sidecar.istio.io/inject": "true"},
                },
                "spec": {
                    "serviceAccountName": name,
                    # Bind port 80 as non-root (Istio's manual gateway deployment does the same).
                    "securityContext": {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start",
                                                     "value": "0"}]},
                    "containers": [{
                        "name": "istio-proxy",
                        "image": "auto",  # filled in by the injector, updated with the control plane
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "runAsNonRoot": True, "runAsUser": 1337, "runAsGroup": 1337},
                    }],
                },
            },
        },
    }


def _gateway_service(spec: IstioSpec) -> dict[str, Any]:
    name, selector = spec.gateway_name, _gateway_selector(spec)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _gateway_meta(spec, name, app=name, **selector),
        "spec": {"type": "ClusterIP", "selector": dict(selector),
                 "ports": [{"name": "http", "port": GATEWAY_PORT, "protocol": "TCP"}]},
    }


def _gateway_object(spec: IstioSpec, hosts: dict[ProviderHost, str]) -> dict[str, Any]:
    """The Istio Gateway: the gateway pods' server for the provider hosts."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": _gateway_meta(spec, spec.gateway_name),
        "spec": {
            "selector": _gateway_selector(spec),
            "servers": [{
                # HTTP inside Istio mTLS: the gateway sees each caller's sidecar certificate, which
                # the credential port checks against the grant. Only VirtualServices in this
                # namespace may bind routes to it.
                "port": {"number": GATEWAY_PORT, "name": "https-providers", "protocol": "HTTPS"},
                "hosts": [f"{spec.gateway_namespace}/{host.host}" for host in hosts],
                "tls": {"mode": "ISTIO_MUTUAL"},
            }],
        },
    }


def _gateway_destination_rule(spec: IstioSpec, hosts: dict[ProviderHost, str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": _gateway_meta(spec, spec.gateway_name),
        "spec": {
            "host": spec.gateway_host,
            "exportTo": ["*"],
            "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}},
            # One subset per provider host: its SNI selects the gateway server's filter chain.
            "subsets": [{"name": subset, "trafficPolicy": {"portLevelSettings": [
                {"port": {"number": GATEWAY_PORT}, "tls": {"mode": "ISTIO_MUTUAL", "sni": host.host}}]}}
                for host, subset in hosts.items()],
        },
    }


def _gateway_virtual_service(spec: IstioSpec, host: ProviderHost, subset: str) -> dict[str, Any]:
    """A provider host's calls: from the mesh to the gateway's subset, from the gateway to the provider."""
    gateway_ref = f"{spec.gateway_namespace}/{spec.gateway_name}"
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": _gateway_meta(spec, subset),
        "spec": {
            "hosts": [host.host],
            "exportTo": ["*"],
            "gateways": ["mesh", gateway_ref],
            "http": [
                {"name": "to-egress-gateway", "match": [{"gateways": ["mesh"], "port": host.port}],
                 "route": [{"destination": {"host": spec.gateway_host, "subset": subset,
                                            "port": {"number": GATEWAY_PORT}}}]},
                {"name": "to-provider", "match": [{"gateways": [gateway_ref], "port": GATEWAY_PORT}],
                 # The grant is for the credential port only: never sent on to the provider.
                 "headers": {"request": {"remove": [GRANT_HEADER]}},
                 "route": [{"destination": {"host": host.host, "port": {"number": host.port}}}]},
            ],
        },
    }


def gateway_envoy_filter_object(spec: IstioSpec) -> dict[str, Any]:
    """The egress gateway's credential filter (filter.py's ``credential_filter``), before its router.

    On every listener of the gateway: it serves the provider hosts only. A call without a valid
    grant for its caller, host and body is refused there and never reaches a provider.
    """
    listener = {"filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}}}
    patches: list[dict[str, Any]] = [
        # The credential filter buffers each request whole: room for the largest one a decision lets through.
        {
            "applyTo": "LISTENER",
            "match": {"context": "GATEWAY"},
            "patch": {"operation": "MERGE", "value": {"per_connection_buffer_limit_bytes": spec.gateway_buffer_bytes}},
        },
        {
            "applyTo": "HTTP_FILTER",
            "match": {"context": "GATEWAY", "listener": listener},
            "patch": {"operation": "INSERT_BEFORE",
                      "value": credential_filter(cluster_name=spec.credentials_cluster, authority=spec.processor_host)},
        },
        # Envoy's own errors here (provider or credential port unreachable) in the caller's API format.
        {
            "applyTo": "NETWORK_FILTER",
            "match": {"context": "GATEWAY", "listener": {"filterChain": {"filter": {"name": HCM}}}},
            "patch": {"operation": "MERGE", "value": {"name": HCM, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                         "HttpConnectionManager",
                "local_reply_config": local_reply_config(),
            }}},
        },
        # HTTP/2 pings on the connection to the credential port, as sidecars have to the decision port.
        {
            "applyTo": "CLUSTER",
            "match": {"context": "GATEWAY", "cluster": {"service": spec.processor_host,
                                                         "portNumber": spec.credentials_port}},
            "patch": {"operation": "MERGE", "value": {"typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": processor_http2_options()},
                }}}},
        },
    ]
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": f"{spec.gateway_name}-credentials", "namespace": spec.gateway_namespace,
                     "labels": dict(spec.labels)},
        "spec": {"workloadSelector": {"labels": {"istio": spec.gateway_name}}, "configPatches": patches},
    }


# --- the processor's closed ports -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortAccess:
    """Who may call some of the processor's ports: one AuthorizationPolicy rule and one NetworkPolicy rule."""

    ports: tuple[int, ...]
    principals: tuple[str, ...]  # Istio principals (peer certificate identities, trust domain included)
    peers: tuple[dict[str, Any], ...]  # the same callers as NetworkPolicy peers
    serves: str
    paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()

    def rule(self) -> dict[str, Any]:
        operation: dict[str, Any] = {"ports": [str(p) for p in self.ports]}
        if self.paths:
            operation["paths"] = list(self.paths)
        if self.methods:
            operation["methods"] = list(self.methods)
        return {"from": [{"source": {"principals": list(self.principals)}}], "to": [{"operation": operation}]}

    def ingress(self) -> dict[str, Any]:
        return {"from": copy.deepcopy(list(self.peers)), "ports": [{"port": p, "protocol": "TCP"} for p in self.ports]}


ISTIO_AGENT_PORT = 15020  # pilot-agent: merged Prometheus metrics (plaintext, never through the proxy's policies)
# The processor's --metrics port (GET /metrics only; istio/processor.yaml): the PodMonitor's target, left out
# of the sidecar's inbound capture (excludeInboundPorts), so plaintext and never through the proxy's policies.
METRICS_PORT = 9903


def _namespace_peer(namespace: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}


def principal_namespace(principal: str) -> str:
    parts = principal.split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not parts[2]:
        raise ValueError(f"{principal!r} is not a principal of the form TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT")
    return parts[2]


def processor_access(spec: IstioSpec) -> list[PortAccess]:
    """Every caller of every processor port; anything not listed is refused (docs/istio-security.md)."""
    access: list[PortAccess] = []
    clients = spec.client_namespaces
    if clients:  # none: the decision port is closed to everyone (calls fail closed)
        access.append(PortAccess(
            (spec.processor_port, spec.relay_port), tuple(spec.principal(ns, "*") for ns in clients),
            tuple(_namespace_peer(ns) for ns in clients),
            "decisions (ext_proc) and the fallback relay: the sidecars of opted-in workloads"))
    if spec.at_gateway and external_hosts(spec):  # the egress gateway exists
        gateway_pods = {**_namespace_peer(spec.gateway_namespace),
                        "podSelector": {"matchLabels": {"istio": spec.gateway_name}}}
        access.append(PortAccess((spec.credentials_port,), (spec.gateway_principal,), (gateway_pods,),
                                 "credentials for grants (ext_proc): the egress gateway only"))
    scraper = spec.scraper_principal
    access.append(PortAccess((spec.admin_port,), (scraper,), (_namespace_peer(principal_namespace(scraper)),),
                             "/metrics: the metrics scraper", paths=("/metrics",), methods=("GET",)))
    access.append(PortAccess((spec.admin_port,), (spec.principal(spec.processor_namespace, "*"),),
                             (_namespace_peer(spec.processor_namespace),),
                             "/metrics, /config, /quota, /healthz, /readyz: the platform namespace"))
    return access


def security_objects(spec: IstioSpec) -> list[dict[str, Any]]:
    """The processor's PeerAuthentication (STRICT mTLS), AuthorizationPolicy and NetworkPolicy."""
    namespace, app = spec.processor_namespace, {"app": spec.processor_service}
    access = processor_access(spec)

    def meta() -> dict[str, Any]:
        return {"name": spec.processor_service, "namespace": namespace, "labels": dict(spec.labels)}

    # The metrics-only port (the PodMonitor's target) bypasses the sidecar, and Istio's merged metrics
    # (for prometheus.io annotation users) are served by pilot-agent, outside the proxy: only the
    # NetworkPolicy can keep them to the scraper's namespace. The kubelet's probes (15021, and the
    # rewritten app probes on 15020) come from the node, which NetworkPolicy always admits.
    agent = {"from": [_namespace_peer(principal_namespace(spec.scraper_principal))],
             "ports": [{"port": port, "protocol": "TCP"} for port in (METRICS_PORT, ISTIO_AGENT_PORT)]}
    return [
        {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": meta(),
         "spec": {"selector": {"matchLabels": dict(app)}, "mtls": {"mode": "STRICT"}}},
        # ALLOW with these rules: every other port, path and caller is denied.
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": meta(),
         "spec": {"selector": {"matchLabels": dict(app)}, "action": "ALLOW", "rules": [a.rule() for a in access]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta(),
         "spec": {"podSelector": {"matchLabels": dict(app)}, "policyTypes": ["Ingress"],
                  "ingress": [*(a.ingress() for a in access), agent]}},
    ]


# The asynchronous-jobs worker (istio/async-jobs/worker.yaml) replays calls through its own opted-in
# sidecar, from the platform namespace, with its own service account: the processor binds callers to
# their mTLS identity, and a worker's account is the one named like its app.
WORKER_ACCOUNT = "ai-extproc-worker"
WORKER_LABELS = {"app": "ai-extproc-worker"}


def worker_access_objects(spec: IstioSpec) -> list[dict[str, Any]]:
    """With istio/async-jobs: the worker may reach the decision and relay ports too (ALLOW rules add up)."""
    namespace, app = spec.processor_namespace, {"app": spec.processor_service}
    access = PortAccess((spec.processor_port, spec.relay_port), (spec.principal(namespace, WORKER_ACCOUNT),),
                        ({"podSelector": {"matchLabels": dict(WORKER_LABELS)}},), "the async worker's sidecar")
    meta = {"name": f"{spec.processor_service}-worker", "namespace": namespace, "labels": dict(spec.labels)}
    return [
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": copy.deepcopy(meta),
         "spec": {"selector": {"matchLabels": dict(app)}, "action": "ALLOW", "rules": [access.rule()]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": copy.deepcopy(meta),
         "spec": {"podSelector": {"matchLabels": dict(app)}, "policyTypes": ["Ingress"],
                  "ingress": [access.ingress()]}},
    ]


def client_sidecar_objects(spec: IstioSpec) -> list[dict[str, Any]]:
    """Per client namespace: egress only to registered hosts (REGISTRY_ONLY), so an unknown host, or a
    provider's https:// port, is no way around the policy. The provider ServiceEntries, the egress
    gateway and the processor stay visible: every namespace of ``required_egress_hosts`` (what
    ``extproc check sidecars`` checks a platform team's own Sidecars against)."""
    platform = {spec.processor_namespace, spec.provider_namespace}
    needed = {need.namespace for need in required_egress_hosts(spec)} - {"istio-system"}

    def hosts(namespace: str) -> list[str]:
        return ["./*", "istio-system/*", *sorted(f"{ns}/*" for ns in needed if ns != namespace)]

    return [{
        "apiVersion": "networking.istio.io/v1",
        "kind": "Sidecar",
        "metadata": {"name": "default", "namespace": namespace, "labels": dict(spec.labels)},
        "spec": {"egress": [{"hosts": hosts(namespace)}], "outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}},
    } for namespace in spec.client_namespaces if namespace not in platform]


def policy_objects(policies: Iterable[tuple[str, Mapping[str, Any]]], namespace: str) -> list[dict[str, Any]]:
    """AIPolicy objects whose spec is each policy file's content, unchanged."""
    objects = []
    for service, data in policies:
        spec = {k: v for k, v in data.items() if k != "namespace"}
        objects.append({"apiVersion": API_VERSION, "kind": "AIPolicy",
                        "metadata": {"name": service, "namespace": namespace}, "spec": spec})
    return objects


# --- what an opted-in workload's sidecar must see -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EgressNeed:
    """A host an opted-in workload's sidecar must import (Sidecar ``egress[].hosts``, ``namespace/dnsName``).

    ``namespace`` is where Istio finds the host: a Service's own namespace, a ServiceEntry's or
    VirtualService's namespace. ``vhost``: the filter also patches the host's virtual host on ``port``,
    so the egress listener that makes the route table for that port must import it; otherwise only its
    cluster is needed, which any egress listener of the Sidecar provides (docs/istio-security.md)."""

    namespace: str
    host: str
    port: int
    why: str
    vhost: bool = False

    @property
    def entry(self) -> str:
        """The egress host entry that imports exactly this host."""
        return f"{self.namespace}/{self.host}"


def _service_namespace(host: str, cluster_domain: str) -> tuple[str, str] | None:
    """``name.ns.svc[.<cluster domain>]`` as Istio names the Service (the FQDN), and its namespace."""
    labels = host.lower().rstrip(".").split(".")
    if len(labels) < 3 or labels[2] != "svc" or not labels[0] or not labels[1]:
        return None
    return ".".join(labels if len(labels) > 3 else [*labels, cluster_domain]), labels[1]


def required_egress_hosts(spec: IstioSpec) -> list[EgressNeed]:
    """What an opted-in workload's sidecar must import for the rendered objects to work.

    A host a ``Sidecar`` hides has no cluster (and no virtual host) in that sidecar: the processor's
    hides every decision (500 ``cluster_not_available``, fail closed), a provider's or the gateway's
    leaves every call to it without a route. ``client_sidecar_objects`` renders its egress hosts from these;
    ``extproc check sidecars`` (sidecar_check.py) checks other Sidecars against them.
    """
    needs = [
        EgressNeed(spec.processor_namespace, spec.processor_host, spec.processor_port, "ext_proc decisions"),
        EgressNeed(spec.processor_namespace, spec.processor_host, spec.relay_port, "the fallback relay"),
    ]
    for host, name in _named_hosts(spec).items():
        if host.external:
            # Its ServiceEntry (and, in gateway mode, its VirtualService to the gateway) is in the provider
            # namespace; the filter is enabled on its virtual host in either mode.
            needs.append(EgressNeed(spec.provider_namespace, host.host, host.port, f"provider {name}", vhost=True))
            continue
        service = _service_namespace(host.host, spec.cluster_domain)
        if service is not None:
            fqdn, namespace = service
            needs.append(EgressNeed(namespace, fqdn, host.port, f"in-mesh model server {name}", vhost=True))
        else:  # cluster-local but not a Service name: wherever its ServiceEntry is; assume the provider namespace
            needs.append(EgressNeed(spec.provider_namespace, host.host, host.port,
                                    f"in-mesh model server {name}, assumed registered in {spec.provider_namespace}",
                                    vhost=True))
    if spec.at_gateway and external_hosts(spec):
        needs.append(EgressNeed(spec.gateway_namespace, spec.gateway_host, GATEWAY_PORT,
                                "the egress gateway, where provider calls go"))
    return needs
