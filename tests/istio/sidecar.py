"""An Envoy bootstrap shaped like an Istio sidecar's outbound HTTP path, and EnvoyFilter patching.

What Istio would build for a pod with the provider ServiceEntries: node metadata as the injector
sets it, the ``0.0.0.0_80`` outbound listener whose HCM routes with route configuration ``80``,
virtual hosts named ``host:port`` (plus ``allow_any``), clusters named ``outbound|PORT||HOST`` and
the processor reached through its Service's ``outbound|50051||…`` HTTP/2 cluster. The listener is
bound to a free 127.0.0.1 port instead of being reached through iptables, and the clusters point at
local mock providers instead of DNS + TLS origination; names, order and shapes are Istio's.

``apply_envoy_filter`` applies an EnvoyFilter's configPatches the way istiod does for the patch
kinds our renderer uses (HTTP_FILTER insert before a sub-filter or merge into one, NETWORK_FILTER,
VIRTUAL_HOST and HTTP_ROUTE merge, CLUSTER add and merge); anything else raises, so the renderer cannot
silently use a patch this test does not model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
PROCESSOR_HOST = "ai-extproc.ai-system.svc.cluster.local"
PROCESSOR_CLUSTER = f"outbound|50051||{PROCESSOR_HOST}"
RELAY_CLUSTER = f"outbound|50052||{PROCESSOR_HOST}"  # the Service's http-relay port


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _typed(name: str, type_url: str) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": type_url}}


def istio_node(service: str, namespace: str, labels: Mapping[str, str]) -> dict[str, Any]:
    pod = f"{service}-6d5f7c9b8-x2x7q"
    return {
        "id": f"sidecar~10.244.0.17~{pod}.{namespace}~{namespace}.svc.cluster.local",
        "cluster": f"{service}.{namespace}",
        "metadata": {
            "NAME": pod,
            "NAMESPACE": namespace,
            "WORKLOAD_NAME": service,
            "SERVICE_ACCOUNT": service,
            "OWNER": f"kubernetes://apis/apps/v1/namespaces/{namespace}/deployments/{service}",
            "LABELS": {"app": service, "version": "v1", "security.istio.io/tlsMode": "istio",
                       "service.istio.io/canonical-name": service, "service.istio.io/canonical-revision": "v1",
                       **labels},
            "MESH_ID": "cluster.local",
            "CLUSTER_ID": "Kubernetes",
            "ISTIO_VERSION": "1.27.1",
            "INSTANCE_IPS": "10.244.0.17",
        },
    }


def _cluster(name: str, port: int, http2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "10s",
        "load_assignment": {"cluster_name": name,
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(port)}}]}]},
    }
    if http2:  # Istio: a port named grpc-* / appProtocol grpc is HTTP/2 to the upstream
        cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return cluster


def istio_outbound_bootstrap(*, service: str, namespace: str, labels: Mapping[str, str], listen_port: int,
                             admin_port: int, processor_port: int, hosts: Mapping[str, int],
                             relay_port: int | None = None, processor_host: str = PROCESSOR_HOST) -> dict[str, Any]:
    """``hosts``: every HTTP service on port 80 the sidecar knows (provider or not) → local port;
    ``processor_host``: the processor Service's name, as the cluster domain makes it."""
    vhosts = [
        {"name": f"{host}:80", "domains": [host, f"{host}:80"],
         "routes": [{"name": "default", "match": {"prefix": "/"}, "route": {
             "cluster": f"outbound|80||{host}", "timeout": "0s",
             "retry_policy": {"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
                              "num_retries": 2, "retry_host_predicate": [{
                                  "name": "envoy.retry_host_predicates.previous_hosts",
                                  "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host."
                                                            "previous_hosts.v3.PreviousHostsPredicate"}}],
                              "host_selection_retry_max_attempts": "5"}}}],
         "include_request_attempt_count": True}
        for host in hosts
    ]
    vhosts.append({"name": "allow_any", "domains": ["*"], "include_request_attempt_count": True,
                   "routes": [{"name": "allow_any", "match": {"prefix": "/"},
                               "route": {"cluster": "PassthroughCluster", "timeout": "0s"}}]})
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "outbound_0.0.0.0_80",
        "route_config": {"name": "80", "virtual_hosts": vhosts, "validate_clusters": False},
        "http_filters": [  # Istio's outbound chain, less its own (non-upstream) extensions
            _typed("envoy.filters.http.grpc_stats",
                   "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"),
            _typed("envoy.filters.http.fault", "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"),
            _typed("envoy.filters.http.cors", "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"),
            _typed("envoy.filters.http.router", "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"),
        ],
        "use_remote_address": False,
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "normalize_path": True,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "access_log": [{"name": "envoy.access_loggers.stdout", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"json_format": {"authority": "%REQ(:AUTHORITY)%", "status": "%RESPONSE_CODE%",
                                           "cluster": "%UPSTREAM_CLUSTER%", "route": "%ROUTE_NAME%"}}}}],
    }
    clusters = [_cluster(f"outbound|50051||{processor_host}", processor_port, http2=True),
                _cluster(f"outbound|50052||{processor_host}", relay_port or processor_port + 1),
                *(_cluster(f"outbound|80||{host}", port) for host, port in hosts.items()),
                _cluster("PassthroughCluster", next(iter(hosts.values())))]
    return {
        "node": istio_node(service, namespace, labels),
        "admin": {"address": _address(admin_port)},
        "static_resources": {
            "listeners": [{
                "name": "0.0.0.0_80",
                "address": _address(listen_port),
                "enable_reuse_port": False,
                "traffic_direction": "OUTBOUND",
                "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}],
            }],
            "clusters": clusters,
        },
    }


# ---- applying EnvoyFilter configPatches -----------------------------------------------------------


def proto_merge(into: dict[str, Any], value: Mapping[str, Any]) -> None:
    """Protobuf MergeFrom on JSON: messages merge, repeated fields append, scalars replace."""
    for key, item in value.items():
        if isinstance(item, Mapping) and isinstance(into.get(key), dict):
            proto_merge(into[key], item)
        elif isinstance(item, list) and isinstance(into.get(key), list):
            into[key].extend(copy.deepcopy(item))
        else:
            into[key] = copy.deepcopy(item)


def _selected(envoy_filter: Mapping[str, Any], bootstrap: Mapping[str, Any]) -> bool:
    wanted = (envoy_filter["spec"].get("workloadSelector") or {}).get("labels") or {}
    labels = bootstrap["node"]["metadata"]["LABELS"]
    return all(labels.get(k) == v for k, v in wanted.items())


def _hcms(bootstrap: dict[str, Any], port: int) -> list[dict[str, Any]]:
    found = []
    for listener in bootstrap["static_resources"]["listeners"]:
        if listener["name"] != f"0.0.0.0_{port}":  # Istio's outbound listener for that port
            continue
        for chain in listener["filter_chains"]:
            found.extend(f for f in chain["filters"] if f["name"] == HCM)
    return found


def apply_envoy_filter(bootstrap: dict[str, Any], envoy_filter: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """The patched bootstrap and how many patches matched something."""
    patched = copy.deepcopy(bootstrap)
    if not _selected(envoy_filter, patched):
        return patched, 0
    applied = 0
    for patch in envoy_filter["spec"]["configPatches"]:
        match, operation, value = patch["match"], patch["patch"]["operation"], patch["patch"]["value"]
        if match.get("context") != "SIDECAR_OUTBOUND":
            raise NotImplementedError(f"context {match.get('context')}")
        kind = patch["applyTo"]
        if kind == "HTTP_FILTER" and operation == "INSERT_BEFORE":
            listener = match["listener"]
            assert listener["filterChain"]["filter"]["name"] == HCM
            sub = listener["filterChain"]["filter"]["subFilter"]["name"]
            for hcm in _hcms(patched, listener["portNumber"]):
                filters = hcm["typed_config"]["http_filters"]
                index = next(i for i, f in enumerate(filters) if f["name"] == sub)
                filters.insert(index, copy.deepcopy(value))
                applied += 1
        elif kind == "HTTP_FILTER" and operation == "MERGE":
            listener = match["listener"]
            sub = listener["filterChain"]["filter"]["subFilter"]["name"]
            for hcm in _hcms(patched, listener["portNumber"]):
                for http_filter in hcm["typed_config"]["http_filters"]:
                    if http_filter["name"] == sub:
                        proto_merge(http_filter, {"typed_config": {
                            k: v for k, v in value["typed_config"].items() if k != "@type"}})
                        applied += 1
        elif kind == "CLUSTER" and operation == "ADD":
            patched["static_resources"]["clusters"].append(copy.deepcopy(value))
            applied += 1
        elif kind == "CLUSTER" and operation == "MERGE":
            wanted = match["cluster"]
            name = f"outbound|{wanted['portNumber']}||{wanted['service']}"
            for cluster in patched["static_resources"]["clusters"]:
                if cluster["name"] == name:
                    proto_merge(cluster, value)  # istiod merges an Any of the same type field by field
                    applied += 1
        elif kind == "HTTP_ROUTE" and operation == "MERGE":
            route = match["routeConfiguration"]
            assert route["vhost"]["route"] == {"action": "ROUTE"}
            for hcm in _hcms(patched, route["portNumber"]):
                for vhost in hcm["typed_config"]["route_config"]["virtual_hosts"]:
                    if vhost["name"] == route["vhost"]["name"]:
                        for entry in vhost["routes"]:
                            if "route" in entry:
                                proto_merge(entry, value)
                                applied += 1
        elif kind == "NETWORK_FILTER" and operation == "MERGE":
            listener = match["listener"]
            assert listener["filterChain"]["filter"]["name"] == HCM == value["name"]
            for hcm in _hcms(patched, listener["portNumber"]):
                proto_merge(hcm["typed_config"], {k: v for k, v in value["typed_config"].items() if k != "@type"})
                applied += 1
        elif kind == "VIRTUAL_HOST" and operation == "MERGE":
            route = match["routeConfiguration"]
            for hcm in _hcms(patched, route["portNumber"]):
                config = hcm["typed_config"]["route_config"]
                if config["name"] != str(route["portNumber"]):
                    continue
                for vhost in config["virtual_hosts"]:
                    if vhost["name"] == route["vhost"]["name"]:
                        proto_merge(vhost, value)
                        applied += 1
        else:
            raise NotImplementedError(f"{kind} {operation}")
    return patched, applied
