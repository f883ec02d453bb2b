"""Prometheus scrapes what the install declares: every PodMonitor names a container port its pods declare,
that port bypasses the sidecar (Prometheus holds no mesh certificate) and the NetworkPolicy admits the
scraper's namespace to it; the alerts' job matcher matches the job the operator gives the PodMonitor's
targets; and the processor's --metrics port serves /metrics and nothing else."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.launch import free_port, start_processor
from extproc.cli import sample_policy_dir
from extproc.envoy_config.istio import METRICS_ACCOUNT, METRICS_PORT
from tests.istio.test_manifests import ISTIO, kustomize

Obj = dict[str, Any]
OVERLAYS = (ISTIO, ISTIO / "observability", ISTIO / "async-jobs", ISTIO / "samples")
SCRAPER_NAMESPACE = METRICS_ACCOUNT[0]  # where Prometheus runs (kube-prometheus-stack)
EXCLUDE_INBOUND = "traffic.sidecar.istio.io/excludeInboundPorts"


@pytest.fixture(scope="module")
def objects() -> list[Obj]:
    return [o for overlay in OVERLAYS for o in kustomize(overlay)]


def namespace_of(obj: Obj) -> str:
    return str(obj["metadata"].get("namespace", "default"))


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions); an empty one selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if not {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[op]:
            return False
    return True


def pod_templates(objects: list[Obj]) -> Iterator[tuple[str, str, Obj]]:
    """(namespace, owner name, pod template) of every workload."""
    for o in objects:
        spec = o.get("spec", {})
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield namespace_of(o), o["metadata"]["name"], spec["template"]
        elif o["kind"] == "CronJob":
            yield namespace_of(o), o["metadata"]["name"], spec["jobTemplate"]["spec"]["template"]
        elif o["kind"] == "Pod":
            yield namespace_of(o), o["metadata"]["name"], o


def container_ports(template: Obj) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
            if "name" in p}


def monitored(monitor: Obj, namespace: str, labels: Mapping[str, str]) -> bool:
    """Whether a PodMonitor/ServiceMonitor selects an object with these labels in this namespace."""
    where = monitor["spec"].get("namespaceSelector", {})
    in_scope = where.get("any") or namespace in where.get("matchNames", [namespace_of(monitor)])
    return bool(in_scope) and selects(monitor["spec"].get("selector"), labels)


def admits(policy: Obj, port: int, names: Mapping[str, int], namespace: str) -> bool:
    """Whether one NetworkPolicy admits TCP ``port`` from every pod of ``namespace``."""
    def port_matches(p: Mapping[str, Any]) -> bool:
        number = names.get(p["port"]) if isinstance(p.get("port"), str) else p.get("port")
        return p.get("protocol", "TCP") == "TCP" and number in (port, None)

    def peer_matches(peer: Mapping[str, Any]) -> bool:
        return ("namespaceSelector" in peer and selects(peer["namespaceSelector"],
                                                         {"kubernetes.io/metadata.name": namespace})
                and not peer.get("podSelector", {}))

    return any((not rule.get("ports") or any(port_matches(p) for p in rule["ports"]))
               and (not rule.get("from") or any(peer_matches(peer) for peer in rule["from"]))
               for rule in policy["spec"].get("ingress", []))


def scrape_problems(objects: list[Obj]) -> list[str]:
    """Everything that would keep Prometheus from scraping what the monitors and annotations name."""
    problems: list[str] = []
    pods = list(pod_templates(objects))
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"
                and "Ingress" in o["spec"].get("policyTypes", ["Ingress"])]
    for ns, owner, template in pods:  # annotation-based scraping (Istio's merge, or Prometheus itself)
        annotated = template["metadata"].get("annotations", {}).get("prometheus.io/port")
        if annotated is not None and int(annotated) not in container_ports(template).values():
            problems.append(f"{ns}/{owner}: prometheus.io/port {annotated} is no declared containerPort")
    for monitor in (o for o in objects if o["kind"] == "PodMonitor"):
        name = f"PodMonitor {namespace_of(monitor)}/{monitor['metadata']['name']}"
        if "jobLabel" in monitor["spec"]:
            problems.append(f"{name}: jobLabel changes the job label the alerts match")
        matched = [(ns, owner, t) for ns, owner, t in pods if monitored(monitor, ns, t["metadata"].get("labels", {}))]
        if not matched:
            problems.append(f"{name}: selects no pod template")
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            if "targetPort" in endpoint or "port" not in endpoint:
                problems.append(f"{name}: an endpoint without a port name (targetPort: {endpoint.get('targetPort')})")
                continue
            port = endpoint["port"]
            for ns, owner, template in matched:
                declared = container_ports(template)
                if port not in declared:
                    problems.append(f"{name}: {ns}/{owner} declares no container port {port}")
                    continue
                number = declared[port]
                annotations = template["metadata"].get("annotations", {})
                if annotations.get("prometheus.io/port", str(number)) != str(number):
                    problems.append(f"{name}: {ns}/{owner} announces prometheus.io/port "
                                    f"{annotations['prometheus.io/port']}, not {port} ({number})")
                # Scraped without mTLS: the sidecar must not capture it (STRICT mTLS would refuse it).
                excluded = {p.strip() for p in annotations.get(EXCLUDE_INBOUND, "").split(",")}
                if str(number) not in excluded:
                    problems.append(f"{name}: {ns}/{owner} port {number} is not in {EXCLUDE_INBOUND}")
                labels = template["metadata"].get("labels", {})
                selecting = [p for p in policies if namespace_of(p) == ns and selects(p["spec"]["podSelector"], labels)]
                if selecting and not any(admits(p, number, declared, SCRAPER_NAMESPACE) for p in selecting):
                    problems.append(f"{name}: no NetworkPolicy admits {SCRAPER_NAMESPACE} to {ns}/{owner} "
                                    f"port {number}")
    services = [o for o in objects if o["kind"] == "Service"]
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        name = f"ServiceMonitor {namespace_of(monitor)}/{monitor['metadata']['name']}"
        matched_services = [s for s in services if monitored(monitor, namespace_of(s), s["metadata"].get("labels", {}))]
        if not matched_services:
            problems.append(f"{name}: selects no Service")
        for endpoint in monitor["spec"]["endpoints"]:
            for service in matched_services:
                if endpoint.get("port") not in {p.get("name") for p in service["spec"]["ports"]}:
                    problems.append(f"{name}: Service {service['metadata']['name']} has no port {endpoint.get('port')}")
    return problems


def test_every_monitor_scrapes_a_declared_admitted_port(objects: list[Obj]) -> None:
    monitors = [o for o in objects if o["kind"] == "PodMonitor"]
    assert [(namespace_of(m), m["metadata"]["name"]) for m in monitors] == [("ai-system", "ai-extproc")]
    assert scrape_problems(objects) == []
    # Not vacuous: the processor is the monitored pod, and a NetworkPolicy guards it.
    ((ns, owner, template),) = [(ns, owner, t) for ns, owner, t in pod_templates(objects)
                                if monitored(monitors[0], ns, t["metadata"].get("labels", {}))]
    assert (ns, owner) == ("ai-system", "ai-extproc")
    assert container_ports(template)["http-metrics"] == METRICS_PORT
    (container,) = template["spec"]["containers"]
    assert f"--metrics=0.0.0.0:{METRICS_PORT}" in container["args"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
    assert any(o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "ai-extproc"
               and selects(o["spec"]["podSelector"], template["metadata"]["labels"]) for o in objects)


def _set_endpoint(objects: list[Obj], endpoint: Obj) -> None:
    (monitor,) = [o for o in objects if o["kind"] == "PodMonitor"]
    monitor["spec"]["podMetricsEndpoints"][0] = {"path": "/metrics", **endpoint}


def _processor(objects: list[Obj]) -> Obj:
    (deployment,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "ai-extproc"]
    return deployment["spec"]["template"]


def _drop_scraper_rule(objects: list[Obj]) -> None:
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "ai-extproc"]
    for rule in policy["spec"]["ingress"]:
        rule["ports"] = [p for p in rule["ports"] if p["port"] != METRICS_PORT]


BREAKAGES = {
    "the old targetPort": (lambda o: _set_endpoint(o, {"targetPort": 15020}), "without a port name"),
    "an undeclared port name": (lambda o: _set_endpoint(o, {"port": "http-nope"}), "no container port http-nope"),
    "a selector matching nothing": (
        lambda o: [m["spec"].update(selector={"matchLabels": {"app": "nope"}}) for m in o if m["kind"] == "PodMonitor"],
        "selects no pod template"),
    "the sidecar capturing the port": (
        lambda o: _processor(o)["metadata"]["annotations"].pop(EXCLUDE_INBOUND), EXCLUDE_INBOUND),
    "the NetworkPolicy closing the port": (_drop_scraper_rule, "no NetworkPolicy admits monitoring"),
    "an annotation naming another port": (
        lambda o: _processor(o)["metadata"]["annotations"].update({"prometheus.io/port": "9904"}),
        "prometheus.io/port 9904 is no declared containerPort"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_the_check_reports_a_broken_scrape(objects: list[Obj], breakage: str) -> None:
    """The same check on a broken copy of the install: proves it can fail."""
    broken = copy.deepcopy(objects)
    change, expected = BREAKAGES[breakage]
    change(broken)
    problems = scrape_problems(broken)
    assert any(expected in p for p in problems), problems


def test_alerts_match_the_podmonitor_job(objects: list[Obj]) -> None:
    """The operator labels a PodMonitor's targets job="<namespace>/<name>"; PromQL's =~ is anchored."""
    (rules,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    exprs = {r["alert"]: r["expr"] for group in rules["spec"]["groups"] for r in group["rules"] if "alert" in r}
    matchers = {alert: m for alert, expr in exprs.items() for m in re.findall(r'\bjob=~"([^"]*)"', expr)}
    assert {"AIExtprocDown", "AIExtprocReplicaDown"} <= matchers.keys()
    assert not [e for e in exprs.values() if re.search(r'\bjob(=|!=|!~)"', e)]  # only =~ matchers, all checked
    jobs = [f"{namespace_of(m)}/{m['metadata']['name']}" for m in objects if m["kind"] == "PodMonitor"]
    assert jobs == ["ai-system/ai-extproc"]
    for alert, pattern in matchers.items():
        assert re.fullmatch(pattern, jobs[0]), (alert, pattern)
    assert not re.fullmatch(matchers["AIExtprocDown"], "ai-system/other")  # the matcher does filter


@pytest.mark.e2e
def test_metrics_port_serves_metrics_only(tmp_path: Path) -> None:
    grpc_port, admin_port, metrics_port = free_port(), free_port(), free_port()
    processor = start_processor([sample_policy_dir()], grpc_port, log_dir=tmp_path, extra_args=[
        "--admin", f"127.0.0.1:{admin_port}", "--metrics", f"127.0.0.1:{metrics_port}"])
    try:
        with httpx.Client(timeout=5) as client:
            scraped = client.get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert scraped.status_code == 200, processor.log_text()
            assert scraped.headers["content-type"].startswith("text/plain")
            assert "# TYPE ai_extproc_calls_swept_total counter" in scraped.text
            assert re.search(r"^ai_extproc_calls_swept_total \d", scraped.text, re.MULTILINE)
            admin = client.get(f"http://127.0.0.1:{admin_port}/metrics")
            assert admin.status_code == 200
            # One registry behind both ports: the same metric families.
            assert {ln for ln in scraped.text.splitlines() if ln.startswith("# TYPE")} == {
                ln for ln in admin.text.splitlines() if ln.startswith("# TYPE")}
            for path in ("/config", "/quota", "/cache", "/healthz", "/readyz", "/"):
                assert client.get(f"http://127.0.0.1:{metrics_port}{path}").status_code == 404, path
            for path in ("/config", "/quota"):
                assert client.get(f"http://127.0.0.1:{admin_port}{path}").status_code == 200, path
    finally:
        processor.stop()
