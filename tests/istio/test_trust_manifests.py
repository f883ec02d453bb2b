"""Trust boundaries in the mesh (docs/istio-security.md), checked on the rendered install without a
cluster: an application pod acts only as itself (STRICT mTLS, identities checked by principal), never
holds a provider key (keys are added at the egress gateway, which holds none itself), and reaches a
governed provider only through the policy (one plain-HTTP port per provider, routed through the
gateway; REGISTRY_ONLY egress; each processor port open to its intended callers only).

The Istio kinds are checked for the fields their CRDs require (no CRD schema of Istio's is vendored
here); the objects' agreement with each other is checked exactly.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import shutil
import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml

from extproc.cli import main
from extproc.envoy_config.filter import MAX_FALLBACK_REQUEST_BYTES, credential_filter
from extproc.envoy_config.istio import METRICS_PORT
from tests.istio.test_manifests import kustomize

ISTIO = Path(__file__).resolve().parents[2] / "istio"
DOCS = ISTIO.parent / "docs" / "istio-security.md"
Key = tuple[str, str, str]  # kind, namespace, name

PROCESSOR_HOST = "ai-extproc.ai-system.svc.cluster.local"
GATEWAY_HOST = "ai-egress.ai-system.svc.cluster.local"
GATEWAY_PRINCIPAL = "cluster.local/ns/ai-system/sa/ai-egress"
SCRAPER = "cluster.local/ns/monitoring/sa/prometheus-k8s"
CLIENTS = "cluster.local/ns/ai-demo/sa/*"  # the sample AIPolicies' namespace
PLATFORM = "cluster.local/ns/ai-system/sa/*"
PROVIDER_HOSTS = {"openai": "api.openai.com", "claude": "api.anthropic.com"}


def by_key(objects: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    keyed = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objects}
    assert len(keyed) == len(objects), "two objects with the same kind, namespace and name"
    return keyed


@pytest.fixture(scope="module")
def install() -> dict[Key, dict[str, Any]]:
    return by_key(kustomize(ISTIO))


def render(tmp_path: Path, *options: str) -> dict[Key, dict[str, Any]]:
    """`extproc render istio OPTIONS -o DIR`: every object it writes (mesh.yaml aside)."""
    assert main(["render", "istio", *options, "-o", str(tmp_path)]) == 0
    objects = [o for path in sorted(tmp_path.rglob("*.yaml")) if path.name != "mesh.yaml"
               for o in yaml.safe_load_all(path.read_text()) if o]
    return by_key(objects)


def of_kind(objects: dict[Key, dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for (k, _, _), o in objects.items() if k == kind]


def mesh_settings(directory: Path) -> dict[str, Any]:
    """mesh.yaml as YAML: not through the policy loader, so this holds whatever the model's state."""
    return dict(yaml.safe_load((directory / "mesh.yaml").read_text())["mesh"])


def processor_ports(install: dict[Key, dict[str, Any]]) -> dict[str, int]:
    (container,) = install[("Deployment", "ai-system", "ai-extproc")]["spec"]["template"]["spec"]["containers"]
    return {p["name"]: p["containerPort"] for p in container["ports"]}


# ---- the processor: STRICT mTLS, every port open to its own callers only ---------------------------------------


def test_processor_requires_mtls(install: dict[Key, dict[str, Any]]) -> None:
    peer = install[("PeerAuthentication", "ai-system", "ai-extproc")]
    assert peer["apiVersion"] == "security.istio.io/v1"
    assert peer["spec"] == {"selector": {"matchLabels": {"app": "ai-extproc"}}, "mtls": {"mode": "STRICT"}}
    pod = install[("Deployment", "ai-system", "ai-extproc")]["spec"]["template"]
    assert pod["metadata"]["labels"]["app"] == "ai-extproc"
    assert "sidecar.istio.io/inject" not in pod["metadata"]["labels"]  # its sidecar stays (namespace injection)
    assert install[("Namespace", "", "ai-system")]["metadata"]["labels"]["istio-injection"] == "enabled"
    (container,) = pod["spec"]["containers"]
    assert "--peer-identity=xfcc" in container["args"]  # callers are who the sidecar's mTLS peer says


def test_authorization_policy_admits_each_port_from_its_callers_only(install: dict[Key, dict[str, Any]]) -> None:
    policy = install[("AuthorizationPolicy", "ai-system", "ai-extproc")]
    assert policy["apiVersion"] == "security.istio.io/v1"
    assert policy["spec"]["selector"] == {"matchLabels": {"app": "ai-extproc"}}
    assert policy["spec"]["action"] == "ALLOW"  # with rules: anything they do not match is denied
    assert policy["spec"]["rules"] == [
        {"from": [{"source": {"principals": [CLIENTS]}}], "to": [{"operation": {"ports": ["50051", "50052"]}}]},
        {"from": [{"source": {"principals": [GATEWAY_PRINCIPAL]}}], "to": [{"operation": {"ports": ["50053"]}}]},
        {"from": [{"source": {"principals": [SCRAPER]}}],
         "to": [{"operation": {"ports": ["9902"], "paths": ["/metrics"], "methods": ["GET"]}}]},
        {"from": [{"source": {"principals": [PLATFORM]}}], "to": [{"operation": {"ports": ["9902"]}}]},
    ]


# What each container port serves and who may call it: a port added to processor.yaml without a line
# here (and a rule in security.yaml) fails below.
INTENDED = {
    "grpc-extproc": (50051, [{"principals": [CLIENTS]}]),
    "http-relay": (50052, [{"principals": [CLIENTS]}]),
    "grpc-credentials": (50053, [{"principals": [GATEWAY_PRINCIPAL]}]),
    "http-admin": (9902, [{"principals": [SCRAPER], "paths": ["/metrics"], "methods": ["GET"]},
                          {"principals": [PLATFORM]}]),
    "http-metrics": (METRICS_PORT, []),  # outside the sidecar: the NetworkPolicy alone (below)
}
# Left out of the sidecar's inbound capture: no AuthorizationPolicy sees these ports, and the Service
# does not expose them (the PodMonitor scrapes the pods). tests/istio/test_metrics_scrape.py.
UNCAPTURED = {"http-metrics": METRICS_PORT}


def test_every_port_is_covered_by_exactly_its_rule(install: dict[Key, dict[str, Any]]) -> None:
    ports = processor_ports(install)
    assert {name: number for name, (number, _) in INTENDED.items()} == ports
    rules = install[("AuthorizationPolicy", "ai-system", "ai-extproc")]["spec"]["rules"]
    for rule in rules:  # no rule that admits any source, or any port
        assert len(rule["from"]) == 1 and rule["from"][0]["source"].get("principals")
        assert set(rule["from"][0]["source"]) == {"principals"}
        assert len(rule["to"]) == 1 and rule["to"][0]["operation"].get("ports")
    for name, (number, intended) in INTENDED.items():
        covering = [{**r["from"][0]["source"], **{k: v for k, v in r["to"][0]["operation"].items() if k != "ports"}}
                    for r in rules if str(number) in r["to"][0]["operation"]["ports"]]
        assert covering == intended, name
    policy_ports = {int(p) for r in rules for p in r["to"][0]["operation"]["ports"]}
    assert policy_ports == set(ports.values()) - set(UNCAPTURED.values())
    template = install[("Deployment", "ai-system", "ai-extproc")]["spec"]["template"]
    excluded = template["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeInboundPorts"]
    assert excluded.split(",") == [str(p) for p in UNCAPTURED.values()]
    # The Service exposes exactly the container's ports, by name, with the protocol Istio needs.
    service = install[("Service", "ai-system", "ai-extproc")]
    exposed = {p["name"]: p for p in service["spec"]["ports"]}
    assert {name: p["port"] for name, p in exposed.items()} == {n: p for n, p in ports.items() if n not in UNCAPTURED}
    assert all(p["targetPort"] == name for name, p in exposed.items())
    assert {name: p["appProtocol"] for name, p in exposed.items()} == {
        "grpc-extproc": "grpc", "http-relay": "http", "grpc-credentials": "grpc", "http-admin": "http"}
    # The processor listens on exactly these ports.
    (container,) = install[("Deployment", "ai-system", "ai-extproc")]["spec"]["template"]["spec"]["containers"]
    listens = {a.split("=", 1)[0]: int(a.rsplit(":", 1)[1]) for a in container["args"]
               if a.startswith(("--listen=", "--relay=", "--credentials-listen=", "--admin=", "--metrics="))}
    assert listens == {"--listen": 50051, "--relay": 50052, "--credentials-listen": 50053, "--admin": 9902,
                       "--metrics": METRICS_PORT}


def namespace_peer(namespace: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}


def test_network_policy_admits_the_same_callers(install: dict[Key, dict[str, Any]]) -> None:
    policy = install[("NetworkPolicy", "ai-system", "ai-extproc")]
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app": "ai-extproc"}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    gateway_pods = {**namespace_peer("ai-system"), "podSelector": {"matchLabels": {"istio": "ai-egress"}}}
    assert policy["spec"]["ingress"] == [
        {"from": [namespace_peer("ai-demo")], "ports": [{"port": 50051, "protocol": "TCP"},
                                                        {"port": 50052, "protocol": "TCP"}]},
        {"from": [gateway_pods], "ports": [{"port": 50053, "protocol": "TCP"}]},
        {"from": [namespace_peer("monitoring")], "ports": [{"port": 9902, "protocol": "TCP"}]},
        {"from": [namespace_peer("ai-system")], "ports": [{"port": 9902, "protocol": "TCP"}]},
        # Outside the proxy's policies: the metrics-only port (the PodMonitor's target) and Istio's
        # merged metrics (pilot-agent, for prometheus.io annotation scrapers).
        {"from": [namespace_peer("monitoring")], "ports": [{"port": METRICS_PORT, "protocol": "TCP"},
                                                           {"port": 15020, "protocol": "TCP"}]},
    ]
    admitted = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert admitted == {*processor_ports(install).values(), 15020}
    gateway = install[("Deployment", "ai-system", "ai-egress")]["spec"]["template"]["metadata"]["labels"]
    assert gateway["istio"] == "ai-egress"
    monitor = yaml.safe_load((ISTIO / "observability" / "podmonitor.yaml").read_text())
    assert processor_ports(install)[monitor["spec"]["podMetricsEndpoints"][0]["port"]] == METRICS_PORT


def test_async_worker_may_reach_the_decision_port(install: dict[Key, dict[str, Any]]) -> None:
    """istio/async-jobs adds the worker (platform namespace) to the decision and relay ports' callers."""
    jobs = by_key(kustomize(ISTIO / "async-jobs"))
    worker = jobs[("Deployment", "ai-system", "ai-extproc-worker")]["spec"]["template"]
    account = worker["spec"]["serviceAccountName"]
    policy = jobs[("AuthorizationPolicy", "ai-system", "ai-extproc-worker")]
    assert policy["spec"] == {"selector": {"matchLabels": {"app": "ai-extproc"}}, "action": "ALLOW", "rules": [
        {"from": [{"source": {"principals": [f"cluster.local/ns/ai-system/sa/{account}"]}}],
         "to": [{"operation": {"ports": ["50051", "50052"]}}]}]}
    network = jobs[("NetworkPolicy", "ai-system", "ai-extproc-worker")]["spec"]
    (rule,) = network["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # the worker's own namespace only
    assert peer["podSelector"]["matchLabels"].items() <= worker["metadata"]["labels"].items()
    assert [p["port"] for p in rule["ports"]] == [50051, 50052]


# ---- the egress gateway: the only way to the providers, holding no key ------------------------------------------


def test_egress_gateway_workload_holds_no_key(install: dict[Key, dict[str, Any]]) -> None:
    account = install[("ServiceAccount", "ai-system", "ai-egress")]
    assert account["automountServiceAccountToken"] is False
    deployment = install[("Deployment", "ai-system", "ai-egress")]
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"] == {"inject.istio.io/templates": "gateway"}
    assert template["metadata"]["labels"] == {"app": "ai-egress", "istio": "ai-egress",
                                              "sidecar.istio.io/inject": "true"}
    assert deployment["spec"]["selector"] == {"matchLabels": {"istio": "ai-egress"}}
    pod = template["spec"]
    assert pod["serviceAccountName"] == "ai-egress"
    (container,) = pod["containers"]
    assert (container["name"], container["image"]) == ("istio-proxy", "auto")
    # No key can reach it: no volume, no environment, no Secret of any kind, no API access.
    assert "volumes" not in pod and "env" not in container and "envFrom" not in container
    assert "secret" not in yaml.safe_dump(deployment).lower()
    assert not [o for (kind, _, _), o in install.items() if kind in ("Role", "RoleBinding", "ClusterRoleBinding")
                and any(s.get("name") == "ai-egress" for s in o.get("subjects", []))]
    assert "ai.extproc.io/enabled" not in template["metadata"]["labels"]  # not opted in: no decision filter
    service = install[("Service", "ai-system", "ai-egress")]
    assert service["spec"]["selector"] == {"istio": "ai-egress"}
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "protocol": "TCP"}]


def test_gateway_server_is_mtls_for_the_provider_hosts(install: dict[Key, dict[str, Any]]) -> None:
    gateway = install[("Gateway", "ai-system", "ai-egress")]
    assert gateway["apiVersion"] == "networking.istio.io/v1"
    assert gateway["spec"]["selector"] == {"istio": "ai-egress"}
    (server,) = gateway["spec"]["servers"]
    # HTTP inside Istio mTLS: the gateway knows each caller's identity (a plain HTTP server would not).
    assert server["port"] == {"number": 80, "name": "https-providers", "protocol": "HTTPS"}
    assert server["tls"] == {"mode": "ISTIO_MUTUAL"}
    assert server["hosts"] == [f"ai-system/{host}" for host in PROVIDER_HOSTS.values()]
    rule = install[("DestinationRule", "ai-system", "ai-egress")]
    assert rule["spec"]["host"] == GATEWAY_HOST and rule["spec"]["exportTo"] == ["*"]
    assert rule["spec"]["trafficPolicy"] == {"tls": {"mode": "ISTIO_MUTUAL"}}
    assert rule["spec"]["subsets"] == [
        {"name": name, "trafficPolicy": {"portLevelSettings": [
            {"port": {"number": 80}, "tls": {"mode": "ISTIO_MUTUAL", "sni": host}}]}}
        for name, host in PROVIDER_HOSTS.items()]


def test_virtual_services_send_the_mesh_through_the_gateway(install: dict[Key, dict[str, Any]]) -> None:
    for name, host in PROVIDER_HOSTS.items():
        service = install[("VirtualService", "ai-system", name)]
        assert service["spec"]["hosts"] == [host] and service["spec"]["exportTo"] == ["*"]
        assert service["spec"]["gateways"] == ["mesh", "ai-system/ai-egress"]
        assert service["spec"]["http"] == [
            {"name": "to-egress-gateway", "match": [{"gateways": ["mesh"], "port": 80}],
             "route": [{"destination": {"host": GATEWAY_HOST, "subset": name, "port": {"number": 80}}}]},
            {"name": "to-provider", "match": [{"gateways": ["ai-system/ai-egress"], "port": 80}],
             "headers": {"request": {"remove": ["x-ai-grant"]}},
             "route": [{"destination": {"host": host, "port": {"number": 80}}}]},
        ]
        # TLS to the provider is originated at the gateway only (its namespace), on the plain-HTTP port.
        origination = install[("DestinationRule", "ai-system", name)]
        assert origination["spec"] == {"host": host, "exportTo": ["."], "trafficPolicy": {"portLevelSettings": [
            {"port": {"number": 80}, "tls": {"mode": "SIMPLE", "sni": host}}]}}


def test_governed_providers_have_no_tls_side_door(install: dict[Key, dict[str, Any]], tmp_path: Path) -> None:
    """Every ServiceEntry of a governed provider has the plain-HTTP port only, in both modes."""
    for objects in (install, render(tmp_path, "--credentials", "sidecar")):
        providers = {o["metadata"]["name"]: o["spec"]["base_url"] for o in of_kind(objects, "AIProvider")}
        entries = of_kind(objects, "ServiceEntry")
        assert {h for e in entries for h in e["spec"]["hosts"]} == set(PROVIDER_HOSTS.values())
        for entry in entries:
            name = entry["metadata"]["name"]
            assert providers[name] == f"http://{PROVIDER_HOSTS[name]}/v1"
            assert entry["spec"]["ports"] == [{"number": 80, "name": f"http-{name}", "protocol": "HTTP",
                                               "targetPort": 443}]
            assert entry["spec"]["location"] == "MESH_EXTERNAL"


def test_gateway_envoyfilter_is_the_credential_filter(install: dict[Key, dict[str, Any]]) -> None:
    """The one source of truth (filter.py), pointed at the processor Service's credential port."""
    service = install[("Service", "ai-system", "ai-extproc")]
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc-credentials")
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    envoy_filter = install[("EnvoyFilter", "ai-system", "ai-egress-credentials")]
    gateway_pod = install[("Deployment", "ai-system", "ai-egress")]["spec"]["template"]["metadata"]["labels"]
    assert envoy_filter["spec"]["workloadSelector"]["labels"].items() <= gateway_pod.items()
    patches = envoy_filter["spec"]["configPatches"]
    assert {p["match"]["context"] for p in patches} == {"GATEWAY"}
    (inserted,) = [p for p in patches if p["applyTo"] == "HTTP_FILTER"]
    assert inserted["patch"]["operation"] == "INSERT_BEFORE"
    assert inserted["match"]["listener"]["filterChain"]["filter"]["subFilter"] == {"name": "envoy.filters.http.router"}
    assert inserted["patch"]["value"] == credential_filter(cluster_name=f"outbound|{port}||{host}", authority=host)
    (keepalive,) = [p for p in patches if p["applyTo"] == "CLUSTER"]
    assert keepalive["match"]["cluster"] == {"service": host, "portNumber": port}
    # The filter buffers each body whole: the gateway's listeners hold the largest a decision lets
    # through (twice the policy's limit, for a rewritten body), not Envoy's default 1 MiB.
    (listener,) = [p for p in patches if p["applyTo"] == "LISTENER"]
    limit = listener["patch"]["value"]["per_connection_buffer_limit_bytes"]
    assert limit >= 2 * mesh_settings(ISTIO)["max_body_bytes"] and limit >= MAX_FALLBACK_REQUEST_BYTES
    # The sidecars' EnvoyFilter is only for opted-in sidecars, never the gateway.
    assert {p["match"]["context"] for p in install[("EnvoyFilter", "istio-system", "ai-extproc")]["spec"][
        "configPatches"]} == {"SIDECAR_OUTBOUND"}


def test_sidecar_provider_routes_lead_to_the_gateway(install: dict[Key, dict[str, Any]]) -> None:
    """The EnvoyFilter replaces each provider route's cluster with its failover aggregate, so the
    aggregate must name the gateway's cluster for that host (the VirtualService's destination), never
    the provider's own cluster (which would bypass the gateway and its credential check)."""
    patches = install[("EnvoyFilter", "istio-system", "ai-extproc")]["spec"]["configPatches"]
    aggregates = {p["patch"]["value"]["name"]: p["patch"]["value"]["cluster_type"]["typed_config"]["clusters"]
                  for p in patches if p["applyTo"] == "CLUSTER" and p["patch"]["operation"] == "ADD"}
    routes = {p["match"]["routeConfiguration"]["vhost"]["name"]: p["patch"]["value"]["route"]["cluster"]
              for p in patches if p["applyTo"] == "HTTP_ROUTE"}
    subsets = {s["name"]: s for s in install[("DestinationRule", "ai-system", "ai-egress")]["spec"]["subsets"]}
    for name, host in PROVIDER_HOSTS.items():
        first, relay = aggregates[routes[f"{host}:80"]]
        destination = install[("VirtualService", "ai-system", name)]["spec"]["http"][0]["route"][0]["destination"]
        assert first == f"outbound|{destination['port']['number']}|{destination['subset']}|{destination['host']}"
        assert subsets[destination["subset"]]["trafficPolicy"]["portLevelSettings"][0]["tls"]["sni"] == host
        assert relay == f"outbound|50052||{PROCESSOR_HOST}"
    assert not [c for clusters in aggregates.values() for c in clusters if c.startswith("outbound|80||api.")]


def test_client_namespaces_are_registry_only(install: dict[Key, dict[str, Any]]) -> None:
    (sidecar,) = of_kind(install, "Sidecar")
    assert sidecar["apiVersion"] == "networking.istio.io/v1"
    assert sidecar["metadata"]["namespace"] == "ai-demo" and sidecar["metadata"]["name"] == "default"
    assert "workloadSelector" not in sidecar["spec"]  # the whole namespace
    assert sidecar["spec"] == {"egress": [{"hosts": ["./*", "istio-system/*", "ai-system/*"]}],
                               "outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}}
    # Every ServiceEntry, VirtualService and Service the opted-in workloads need stays visible.
    needed = [o for (kind, _, _), o in install.items()
              if kind in ("ServiceEntry", "VirtualService") or (kind, o["metadata"]["name"]) in (
                  ("Service", "ai-extproc"), ("Service", "ai-egress"), ("DestinationRule", "ai-egress"))]
    assert needed and all(f"{o['metadata']['namespace']}/*" in sidecar["spec"]["egress"][0]["hosts"] for o in needed)
    policies = kustomize(ISTIO / "samples")
    assert {o["metadata"]["namespace"] for o in policies if o["kind"] == "AIPolicy"} == {"ai-demo"}


# ---- render options ---------------------------------------------------------------------------------------------


def principals(objects: dict[Key, dict[str, Any]]) -> list[str]:
    return [p for policy in of_kind(objects, "AuthorizationPolicy") for rule in policy["spec"]["rules"]
            for source in rule["from"] for p in source["source"]["principals"]]


def test_trust_domain_changes_every_principal(tmp_path: Path) -> None:
    default = principals(render(tmp_path / "default"))
    assert len(default) == 5 and all(p.startswith("cluster.local/ns/") for p in default)
    other = principals(render(tmp_path / "other", "--trust-domain", "example.org"))
    assert other == [p.replace("cluster.local/", "example.org/", 1) for p in default]
    given = principals(render(tmp_path / "given", "--trust-domain", "example.org",
                              "--metrics-principal", "example.org/ns/observability/sa/vmagent"))
    assert "example.org/ns/observability/sa/vmagent" in given and len(given) == 5
    assert main(["render", "istio", "--metrics-principal", "prometheus", "-o", str(tmp_path / "bad")]) == 1


def test_client_namespaces_option(tmp_path: Path) -> None:
    objects = render(tmp_path, "--client-namespace", "shop", "--client-namespace", "billing",
                     "--client-namespace", "ai-system")
    rules = objects[("AuthorizationPolicy", "ai-system", "ai-extproc")]["spec"]["rules"]
    assert rules[0]["from"][0]["source"]["principals"] == [
        "cluster.local/ns/shop/sa/*", "cluster.local/ns/billing/sa/*", "cluster.local/ns/ai-system/sa/*"]
    ingress = objects[("NetworkPolicy", "ai-system", "ai-extproc")]["spec"]["ingress"][0]
    assert ingress["from"] == [namespace_peer("shop"), namespace_peer("billing"), namespace_peer("ai-system")]
    # REGISTRY_ONLY is for application namespaces: never the platform's, where the processor reaches
    # the API server, NATS or Redis.
    assert sorted(o["metadata"]["namespace"] for o in of_kind(objects, "Sidecar")) == ["billing", "shop"]


def test_sidecar_mode_renders_no_gateway(tmp_path: Path) -> None:
    """Developer mode: the decision hands the key to the caller's sidecar (single-tenant clusters only)."""
    install = tmp_path / "istio"
    shutil.copytree(ISTIO, install)
    assert main(["render", "istio", "--credentials", "sidecar", "-o", str(install)]) == 0
    assert mesh_settings(install)["credential_injection"] == "sidecar"
    assert mesh_settings(ISTIO)["credential_injection"] == "gateway"
    assert [o for o in yaml.safe_load_all((install / "egress-gateway.yaml").read_text()) if o] == []
    objects = by_key(kustomize(install))  # still builds
    assert not of_kind(objects, "Gateway") and not of_kind(objects, "VirtualService")
    assert not [key for key in objects if key[2].startswith("ai-egress")]
    assert "ai-egress" not in yaml.safe_dump_all(list(objects.values()))
    # The sidecars originate TLS themselves and their routes go to the providers' own clusters.
    for name in PROVIDER_HOSTS:
        assert objects[("DestinationRule", "ai-system", name)]["spec"]["exportTo"] == ["*"]
    patches = objects[("EnvoyFilter", "istio-system", "ai-extproc")]["spec"]["configPatches"]
    firsts = {p["patch"]["value"]["cluster_type"]["typed_config"]["clusters"][0]
              for p in patches if p["applyTo"] == "CLUSTER" and p["patch"]["operation"] == "ADD"}
    assert firsts == {f"outbound|80||{host}" for host in PROVIDER_HOSTS.values()}
    # No gateway, so the credential port has no caller at all.
    rules = objects[("AuthorizationPolicy", "ai-system", "ai-extproc")]["spec"]["rules"]
    assert "50053" not in {p for r in rules for p in r["to"][0]["operation"]["ports"]}
    ingress = objects[("NetworkPolicy", "ai-system", "ai-extproc")]["spec"]["ingress"]
    assert 50053 not in {p["port"] for r in ingress for p in r["ports"]}
    assert of_kind(objects, "Sidecar")  # REGISTRY_ONLY either way


# ---- the kinds' own rules -----------------------------------------------------------------------------------------

API_VERSIONS = {
    "Gateway": "networking.istio.io/v1", "VirtualService": "networking.istio.io/v1",
    "DestinationRule": "networking.istio.io/v1", "ServiceEntry": "networking.istio.io/v1",
    "Sidecar": "networking.istio.io/v1", "EnvoyFilter": "networking.istio.io/v1alpha3",
    "AuthorizationPolicy": "security.istio.io/v1", "PeerAuthentication": "security.istio.io/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
}


def required_fields(obj: dict[str, Any]) -> None:
    """What the kinds' CRDs (and the API server, for NetworkPolicy) require of the fields we use."""
    spec, kind = obj["spec"], obj["kind"]
    if kind == "Gateway":
        for server in spec["servers"]:
            assert server["hosts"] and {"number", "protocol", "name"} <= set(server["port"])
            assert server.get("tls", {}).get("mode", "SIMPLE") in ("SIMPLE", "MUTUAL", "ISTIO_MUTUAL")
    elif kind == "VirtualService":
        assert spec["hosts"]
        for route in spec["http"]:
            assert all(r["destination"]["host"] for r in route["route"])
            assert all(set(m) <= {"gateways", "port"} for m in route["match"])
    elif kind == "DestinationRule":
        assert spec["host"]
        assert all(s["name"] for s in spec.get("subsets", []))
    elif kind == "ServiceEntry":
        assert spec["hosts"] and "*" not in spec["hosts"]
        for port in spec["ports"]:
            assert {"number", "protocol", "name"} <= set(port) and 0 < port["targetPort"] <= 65535
    elif kind == "Sidecar":
        assert all(e["hosts"] for e in spec["egress"])
        assert spec["outboundTrafficPolicy"]["mode"] in ("REGISTRY_ONLY", "ALLOW_ANY")
    elif kind == "EnvoyFilter":
        for patch in spec["configPatches"]:
            assert patch["applyTo"] and patch["patch"]["operation"] and patch["match"]["context"]
        assert all("*" not in v for v in spec.get("workloadSelector", {}).get("labels", {}).values())
    elif kind == "AuthorizationPolicy":
        assert spec["action"] in ("ALLOW", "DENY", "AUDIT", "CUSTOM")
        for rule in spec["rules"]:
            for to in rule["to"]:
                assert all(isinstance(p, str) and p.isdigit() for p in to["operation"]["ports"])
    elif kind == "PeerAuthentication":
        assert spec["mtls"]["mode"] in ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
    elif kind == "NetworkPolicy":
        assert "podSelector" in spec
        for rule in spec["ingress"]:
            assert rule["from"] and all(isinstance(p["port"], int) for p in rule["ports"])


@pytest.mark.parametrize("credentials", ["gateway", "sidecar"])
def test_new_objects_have_their_kinds_required_fields(tmp_path: Path, credentials: str) -> None:
    objects = render(tmp_path, "--credentials", credentials)
    checked = 0
    for (kind, namespace, _), obj in objects.items():
        if kind not in API_VERSIONS:
            continue
        assert obj["apiVersion"] == API_VERSIONS[kind], kind
        assert namespace and obj["metadata"]["labels"] == {"app.kubernetes.io/part-of": "ai-mesh-extproc"}
        required_fields(obj)
        checked += 1
    # 2 EnvoyFilters, 2 ServiceEntries + DestinationRules, 3 processor objects, 1 Sidecar, 2 for the
    # async worker; and the gateway: Gateway, its DestinationRule, 2 VirtualServices, its EnvoyFilter.
    assert checked == (17 if credentials == "gateway" else 12)


# ---- the document ------------------------------------------------------------------------------------------------


def test_security_document_names_every_port_and_object(install: dict[Key, dict[str, Any]]) -> None:
    text = DOCS.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert {int(line.split("|")[1]) for line in table} >= set(processor_ports(install).values())
    for kind in ("PeerAuthentication", "AuthorizationPolicy", "NetworkPolicy", "Sidecar", "Gateway",
                 "VirtualService", "DestinationRule", "ServiceEntry", "EnvoyFilter", "REGISTRY_ONLY",
                 "--credentials sidecar", "outboundTrafficPolicy", "--trust-domain", "--client-namespace"):
        assert kind in text, kind


# ---- the gateway path, run: real Envoys shaped like the sidecar and the egress gateway -----------------------------
#
# The checked-in objects drive real Envoys: a sidecar (the EnvoyFilters applied as istiod would, its
# gateway subsets' clusters built from the rendered DestinationRule, Istio mTLS with SPIFFE
# certificates), the egress gateway (its mTLS server from the rendered Gateway, its routes from the
# VirtualServices' gateway half, its EnvoyFilter applied) and the processor in serve-kubernetes mode
# with mesh.yaml as rendered (credential_injection: gateway). The sidecars' own provider clusters
# lead nowhere: only the way through the gateway can answer.

OPENAI_KEY, ANTHROPIC_KEY = "sk-gateway-openai", "sk-ant-gateway"
OPT_IN = {"ai.extproc.io/enabled": "true"}


@dataclass
class Certs:
    ca: Path
    files: dict[str, tuple[Path, Path]]  # identity → (certificate chain, key)


def make_certs(directory: Path, identities: dict[str, list[str]]) -> Certs:
    """A mesh CA and one certificate per SPIFFE identity (with extra DNS names), as istiod would issue."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(hours=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    ca_path, _ = write("ca", ca, ca_key)
    files = {}
    for index, (spiffe, dns) in enumerate(identities.items()):
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe), *map(x509.DNSName, dns)]
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName(names), critical=True)
                .sign(ca_key, hashes.SHA256()))
        files[spiffe] = write(f"identity-{index}", cert, key)
    return Certs(ca_path, files)


def tls_context(certs: Certs, identity: str, *, upstream: bool, sni: str = "",
                peer: str = "") -> dict[str, Any]:
    chain, key = certs.files[identity]
    validation: dict[str, Any] = {"trusted_ca": {"filename": str(certs.ca)}}
    if peer:
        validation["match_typed_subject_alt_names"] = [{"san_type": "URI", "matcher": {"exact": peer}}]
    common = {"tls_certificates": [{"certificate_chain": {"filename": str(chain)},
                                    "private_key": {"filename": str(key)}}],
              "validation_context": validation}
    base = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
    config: dict[str, Any] = ({"@type": base + "UpstreamTlsContext", "sni": sni, "common_tls_context": common}
                              if upstream else
                              {"@type": base + "DownstreamTlsContext", "require_client_certificate": True,
                               "common_tls_context": {**common, "alpn_protocols": ["h2", "http/1.1"]}})
    return {"name": "envoy.transport_sockets.tls", "typed_config": config}


def spiffe(principal: str) -> str:
    return f"spiffe://{principal}"


def static_cluster(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "5s", **extra, "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def gateway_bootstrap(install: dict[Key, dict[str, Any]], certs: Certs, *, listen: int, admin: int,
                      credentials: int, mocks: dict[str, int]) -> dict[str, Any]:
    """What istiod builds for the ai-egress pod from the rendered Gateway and VirtualServices."""
    (server,) = install[("Gateway", "ai-system", "ai-egress")]["spec"]["servers"]
    assert server["tls"]["mode"] == "ISTIO_MUTUAL"
    names = [h.split("/", 1)[1] for h in server["hosts"]]  # the server's hosts are its SNI match
    vhosts, clusters = [], []
    for service in of_kind(install, "VirtualService"):
        (route,) = [r for r in service["spec"]["http"] if r["match"][0]["gateways"] == ["ai-system/ai-egress"]]
        destination = route["route"][0]["destination"]
        cluster = f"outbound|{destination['port']['number']}||{destination['host']}"
        (host,) = service["spec"]["hosts"]
        vhosts.append({"name": f"{host}:{server['port']['number']}", "domains": [host, f"{host}:*"],
                       "routes": [{"name": route["name"], "match": {"prefix": "/"},
                                   "request_headers_to_remove": route["headers"]["request"]["remove"],
                                   "route": {"cluster": cluster, "timeout": "0s"}}]})
        # The provider, over plain HTTP here (TLS origination to :443 in the mesh).
        clusters.append(static_cluster(cluster, mocks[host]))
    http2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}
    clusters.append(static_cluster(f"outbound|50053||{PROCESSOR_HOST}", credentials,
                                   typed_extension_protocol_options=http2))
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "outbound_0.0.0.0_80",
        "route_config": {"name": "https.80.https-providers.ai-egress.ai-system", "virtual_hosts": vhosts,
                         "validate_clusters": False},
        "http_filters": [
            # The test's tap (not Istio's): the grant as it arrived, for the access log; the credential
            # filter removes the header itself.
            {"name": "test.grant_tap", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
                "request_rules": [{"header": "x-ai-grant", "remove": False, "on_header_present": {
                    "metadata_namespace": "test", "key": "grant", "type": "STRING"}}]}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
        "forward_client_cert_details": "SANITIZE_SET",
        "access_log": [{"name": "envoy.access_loggers.stdout", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"json_format": {"authority": "%REQ(:AUTHORITY)%", "status": "%RESPONSE_CODE%",
                                           "peer": "%DOWNSTREAM_PEER_URI_SAN%",
                                           "grant": "%DYNAMIC_METADATA(test:grant)%"}}}}],
    }
    return {
        "node": {"id": "router~10.244.0.30~ai-egress-5f7d9c8b6-q8r2t.ai-system~ai-system.svc.cluster.local",
                 "cluster": "ai-egress.ai-system",
                 "metadata": {"NAMESPACE": "ai-system", "SERVICE_ACCOUNT": "ai-egress",
                              "LABELS": install[("Deployment", "ai-system", "ai-egress")]["spec"]["template"][
                                  "metadata"]["labels"]}},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "0.0.0.0_80",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                # Istio adds it to match the server's hosts as SNI.
                "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
                "filter_chains": [{
                    "filter_chain_match": {"server_names": names},
                    "transport_socket": tls_context(certs, spiffe(GATEWAY_PRINCIPAL), upstream=False),
                    "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
                }],
            }],
            "clusters": clusters,
        },
    }


def apply_gateway_filter(bootstrap: dict[str, Any], envoy_filter: dict[str, Any]) -> int:
    """The gateway EnvoyFilter's patches, applied as istiod does (the kinds it uses; others raise)."""
    from tests.istio.sidecar import proto_merge

    labels = bootstrap["node"]["metadata"]["LABELS"]
    assert envoy_filter["spec"]["workloadSelector"]["labels"].items() <= labels.items()
    hcms = [f["typed_config"] for listener in bootstrap["static_resources"]["listeners"]
            for chain in listener["filter_chains"] for f in chain["filters"]]
    applied = 0
    for patch in envoy_filter["spec"]["configPatches"]:
        kind, operation, value = patch["applyTo"], patch["patch"]["operation"], patch["patch"]["value"]
        assert patch["match"]["context"] == "GATEWAY"
        if kind == "LISTENER" and operation == "MERGE":
            for listener in bootstrap["static_resources"]["listeners"]:
                proto_merge(listener, value)
                applied += 1
        elif kind == "HTTP_FILTER" and operation == "INSERT_BEFORE":
            sub = patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]
            for hcm in hcms:
                filters = hcm["http_filters"]
                filters.insert(next(i for i, f in enumerate(filters) if f["name"] == sub), copy.deepcopy(value))
                applied += 1
        elif kind == "NETWORK_FILTER" and operation == "MERGE":
            for hcm in hcms:
                proto_merge(hcm, {k: v for k, v in value["typed_config"].items() if k != "@type"})
                applied += 1
        elif kind == "CLUSTER" and operation == "MERGE":
            wanted = patch["match"]["cluster"]
            for cluster in bootstrap["static_resources"]["clusters"]:
                if cluster["name"] == f"outbound|{wanted['portNumber']}||{wanted['service']}":
                    proto_merge(cluster, value)
                    applied += 1
        else:
            raise NotImplementedError(f"{kind} {operation}")
    return applied


def sidecar_bootstrap(install: dict[Key, dict[str, Any]], certs: Certs, service: str, *, ports: dict[str, int],
                      gateway: int, dead: int) -> dict[str, Any]:
    from tests.istio.sidecar import apply_envoy_filter, istio_outbound_bootstrap

    # The providers' own clusters lead nowhere: in the mesh they are plain HTTP to :443, not routed to.
    config = istio_outbound_bootstrap(service=service, namespace="ai-demo", labels=OPT_IN,
                                      listen_port=ports["listen"], admin_port=ports["admin"],
                                      processor_port=ports["processor"], relay_port=ports["relay"],
                                      hosts={host: dead for host in PROVIDER_HOSTS.values()})
    filters = sorted((o for (kind, ns, _), o in install.items() if kind == "EnvoyFilter" and ns == "istio-system"),
                     key=lambda f: f["spec"].get("priority", 0))
    for envoy_filter in filters:
        config, _ = apply_envoy_filter(config, envoy_filter)
    # The gateway's subsets, as istiod builds them from the rendered DestinationRule: Istio mTLS with
    # the workload's certificate, the subset's SNI.
    rule = install[("DestinationRule", "ai-system", "ai-egress")]["spec"]
    for subset in rule["subsets"]:
        (port,) = subset["trafficPolicy"]["portLevelSettings"]
        assert port["tls"]["mode"] == "ISTIO_MUTUAL"
        config["static_resources"]["clusters"].append(static_cluster(
            f"outbound|{port['port']['number']}|{subset['name']}|{rule['host']}", gateway,
            transport_socket=tls_context(certs, spiffe(f"cluster.local/ns/ai-demo/sa/{service}"), upstream=True,
                                         sni=port["tls"]["sni"], peer=spiffe(GATEWAY_PRINCIPAL))))
    return config


def write_secret(root: Path, name: str, value: str) -> None:
    """As the kubelet mounts a Secret: <mount>/<key>, a symlink into a ..data directory."""
    directory = root / name
    (directory / "..data").mkdir(parents=True)
    (directory / "..data" / "api-key").write_text(value + "\n")
    (directory / "api-key").symlink_to("..data/api-key")


@dataclass
class GatewayMesh:
    proxies: dict[str, str]
    gateway: int
    gateway_log: Path
    certs: Certs
    mocks: dict[str, int]


@pytest.fixture(scope="module")
def gateway_mesh(install: dict[Key, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[GatewayMesh]:
    from devtools.launch import LaunchError, find_envoy

    try:
        envoy = find_envoy()
    except LaunchError as exc:
        from tests.conftest import missing

        missing(str(exc))
        raise
    with running_gateway_mesh(install, tmp_path_factory.mktemp("gateway"), envoy) as mesh:
        yield mesh


@contextlib.contextmanager
def running_gateway_mesh(install: dict[Key, dict[str, Any]], tmp: Path, envoy: str) -> Iterator[GatewayMesh]:
    """The gateway-mode install on real Envoys (``envoy``: the binary for the gateway and the sidecars):
    two sample workloads' sidecars, the egress gateway, the processor and the mock providers."""
    from devtools.launch import LaunchError, Managed, free_port, start_mock_provider, wait_for_port
    from tests.istio.fake_kube import FakeKube, Served

    services = ("user-service", "order-service")
    certs = make_certs(tmp, {
        spiffe(GATEWAY_PRINCIPAL): list(PROVIDER_HOSTS.values()),
        **{spiffe(f"cluster.local/ns/ai-demo/sa/{s}"): [] for s in (*services, "intruder")},
    })
    kube = FakeKube()
    for (kind, namespace, name), obj in install.items():
        if kind == "AIProvider":
            kube.put("aiproviders", namespace, name, obj["spec"])
    for obj in kustomize(ISTIO / "samples"):
        if obj["kind"] == "AIPolicy":
            kube.put("aipolicies", obj["metadata"]["namespace"], obj["metadata"]["name"], obj["spec"])
    served = Served(kube)
    secrets = tmp / "secrets"
    write_secret(secrets, "openai-api-key", OPENAI_KEY)
    write_secret(secrets, "claude-api-key", ANTHROPIC_KEY)
    parts: list[Managed] = []
    try:
        mocks = {PROVIDER_HOSTS["openai"]: free_port(), PROVIDER_HOSTS["claude"]: free_port()}
        parts.append(start_mock_provider(mocks[PROVIDER_HOSTS["openai"]], ["--openai-key", OPENAI_KEY], "openai",
                                         tmp))
        parts.append(start_mock_provider(mocks[PROVIDER_HOSTS["claude"]], ["--anthropic-key", ANTHROPIC_KEY],
                                         "anthropic", tmp))
        ports = {"processor": free_port(), "relay": free_port(), "credentials": free_port()}
        processor = Managed("processor", [
            sys.executable, "-m", "extproc", "serve-kubernetes", "--listen", f"127.0.0.1:{ports['processor']}",
            "--relay", f"127.0.0.1:{ports['relay']}", "--credentials-listen", f"127.0.0.1:{ports['credentials']}",
            "--kube-api", served.url, "--policy", str(ISTIO / "mesh.yaml"), "--secrets-dir", str(secrets),
            "--root-namespace", "istio-system", "--provider-namespace", "ai-system", "--grace", "1",
        ], log_dir=tmp).start()
        parts.append(processor)
        try:
            wait_for_port(ports["processor"], 20, processor.process)
        except LaunchError as exc:
            raise LaunchError(f"{exc}\n{processor.log_text()}") from exc
        gateway_port, gateway_admin, dead = free_port(), free_port(), free_port()
        config = gateway_bootstrap(install, certs, listen=gateway_port, admin=gateway_admin,
                                   credentials=ports["credentials"], mocks=mocks)
        assert apply_gateway_filter(config, install[("EnvoyFilter", "ai-system", "ai-egress-credentials")]) == 4
        configs = {"gateway": (config, gateway_port, gateway_admin)}
        for service in services:
            listen, admin = free_port(), free_port()
            configs[service] = (sidecar_bootstrap(install, certs, service, ports={
                "listen": listen, "admin": admin, "processor": ports["processor"], "relay": ports["relay"]},
                gateway=gateway_port, dead=dead), listen, admin)
        proxies = {}
        for name, (bootstrap, listen, admin) in configs.items():
            path = tmp / f"envoy-{name}.yaml"
            path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
            proxy = Managed(f"envoy-{name}", [envoy, "-c", str(path), "--log-level", "warn", "--concurrency", "1",
                                              "--base-id", str(admin)], log_dir=tmp).start()
            parts.append(proxy)
            try:
                wait_for_port(listen, 20, proxy.process)
            except LaunchError as exc:
                raise LaunchError(f"{exc}\n{proxy.log_text()}") from exc
            proxies[name] = f"http://127.0.0.1:{listen}"
        yield GatewayMesh(proxies, gateway_port, tmp / "envoy-gateway.log", certs, mocks)
    finally:
        for part in reversed(parts):
            part.stop(timeout=5)
        served.close()


def mock_requests(mesh: GatewayMesh, host: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"http://127.0.0.1:{mesh.mocks[host]}/_mock/requests").json())


def gateway_log(mesh: GatewayMesh) -> list[dict[str, Any]]:
    lines = mesh.gateway_log.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def call_gateway(mesh: GatewayMesh, identity: str | None, body: bytes, headers: dict[str, str],
                 host: str = "api.openai.com") -> tuple[int, bytes]:
    """A request straight to the gateway (no sidecar, no decision), with some workload's certificate."""
    context = ssl.create_default_context(cafile=str(mesh.certs.ca))
    context.check_hostname = False
    if identity is not None:
        chain, key = mesh.certs.files[identity]
        context.load_cert_chain(chain, key)
    with socket.create_connection(("127.0.0.1", mesh.gateway), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        head = "".join(f"{k}: {v}\r\n" for k, v in {"host": host, "content-type": "application/json",
                                                      "content-length": str(len(body)), "connection": "close",
                                                      **headers}.items())
        tls.sendall(f"POST /v1/chat/completions HTTP/1.1\r\n{head}\r\n".encode() + body)
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
    status = int(response.split(b" ", 2)[1])
    return status, response.split(b"\r\n\r\n", 1)[1]


@pytest.mark.e2e
def test_the_key_is_added_at_the_gateway_only(gateway_mesh: GatewayMesh) -> None:
    client = openai.OpenAI(base_url="http://api.openai.com/v1", api_key="app-holds-no-real-key", max_retries=0,
                           http_client=openai.DefaultHttpxClient(proxy=gateway_mesh.proxies["user-service"]))
    raw = client.chat.completions.with_raw_response.create(model="auth_assistant",
                                                           messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().model == "gpt-4" and raw.headers["x-ai-provider"] == "openai"
    seen = mock_requests(gateway_mesh, "api.openai.com")[-1]
    assert seen["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "x-ai-grant" not in seen["headers"]  # the grant never leaves the mesh
    (entry,) = [e for e in gateway_log(gateway_mesh) if e["status"] == 200][-1:]
    assert entry["peer"] == spiffe("cluster.local/ns/ai-demo/sa/user-service")  # the caller's own identity
    assert entry["grant"] not in ("", "-", None)  # what the sidecar carried: a grant, not a key


@pytest.mark.e2e
def test_fallback_crosses_providers_through_the_gateway(gateway_mesh: GatewayMesh) -> None:
    client = anthropic.Anthropic(base_url="http://api.anthropic.com", api_key="app-holds-no-real-key", max_retries=0,
                                 http_client=anthropic.DefaultHttpxClient(proxy=gateway_mesh.proxies["order-service"]))
    raw = client.messages.with_raw_response.create(
        model="fraud_detector", max_tokens=16, messages=[{"role": "user", "content": "check order 7"}])
    assert raw.parse().model == "claude-3"
    assert mock_requests(gateway_mesh, "api.anthropic.com")[-1]["headers"]["x-api-key"] == ANTHROPIC_KEY
    raw = client.messages.with_raw_response.create(
        model="fraud_detector", max_tokens=16, messages=[{"role": "user", "content": "check order 8"}],
        extra_headers={"x-mock-only": "anthropic", "x-mock-status": "529"})
    assert raw.headers["x-ai-fallback-hops"] == "claude/claude-3=upstream_error, openai/gpt-4o"
    sent = mock_requests(gateway_mesh, "api.openai.com")[-1]
    assert sent["body"]["model"] == "gpt-4o" and sent["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"


@pytest.mark.e2e
def test_the_gateway_refuses_whatever_the_policy_did_not_decide(gateway_mesh: GatewayMesh) -> None:
    before = len(mock_requests(gateway_mesh, "api.openai.com"))
    body = json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}).encode()
    user, intruder = (spiffe(f"cluster.local/ns/ai-demo/sa/{s}") for s in ("user-service", "intruder"))
    # No grant, a forged one: refused at the gateway, in the caller's format.
    for headers in ({}, {"x-ai-grant": "v1.e30.AAAA"}):
        status, answer = call_gateway(gateway_mesh, user, body, headers)
        assert status == 403 and json.loads(answer)["error"]["code"].startswith("grant_")
    # A genuine grant, used once by the sidecar it was issued to, presented by another workload.
    client = openai.OpenAI(base_url="http://api.openai.com/v1", api_key="unused", max_retries=0,
                           http_client=openai.DefaultHttpxClient(proxy=gateway_mesh.proxies["user-service"]))
    client.chat.completions.create(model="auth_assistant", messages=[{"role": "user", "content": "hi"}])
    grant = [e for e in gateway_log(gateway_mesh) if e["status"] == 200][-1]["grant"]
    status, answer = call_gateway(gateway_mesh, intruder, body, {"x-ai-grant": grant})
    assert status == 403 and json.loads(answer)["error"]["code"] == "grant_wrong_caller"
    assert len(mock_requests(gateway_mesh, "api.openai.com")) == before + 1  # only the governed call
    # The whole body reaches the credential check (its hash is), past Envoy's default 1 MiB buffer.
    big = json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x" * 2_000_000}]}).encode()
    status, answer = call_gateway(gateway_mesh, user, big, {"x-ai-grant": "v1.e30.AAAA"})
    assert status == 403 and json.loads(answer)["error"]["code"] == "grant_invalid"
    # Without a mesh certificate there is no connection at all.
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        call_gateway(gateway_mesh, None, body, {})
