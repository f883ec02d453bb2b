"""A cluster whose DNS domain is not cluster.local: `extproc render istio --cluster-domain` names every
Service host after it, the sidecar finds the processor's cluster under that name, and the processor
tells in-mesh model servers by it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from devtools.launch import LaunchError, find_envoy
from extproc.cli import main
from extproc.core.grants import in_mesh, through_gateway
from extproc.policy.model import Provider
from tests.istio.sidecar import apply_envoy_filter, istio_outbound_bootstrap

DOMAIN = "example.internal"
PROCESSOR = f"ai-extproc.ai-system.svc.{DOMAIN}"


def render(directory: Path, *options: str) -> Path:
    assert main(["render", "istio", *options, "-o", str(directory)]) == 0
    return directory


def text_of(directory: Path) -> str:
    return "\n".join(path.read_text() for path in sorted(directory.rglob("*.yaml")))


def test_every_service_host_follows_the_cluster_domain(tmp_path: Path) -> None:
    rendered = text_of(render(tmp_path, "--cluster-domain", DOMAIN))
    assert "svc.cluster.local" not in rendered
    for name in (f"outbound|50051||{PROCESSOR}", f"authority: {PROCESSOR}", f"outbound|50052||{PROCESSOR}",
                 f"outbound|50053||{PROCESSOR}", f"ai-egress.ai-system.svc.{DOMAIN}"):
        assert name in rendered, name
    # The trust domain is another setting: principals keep theirs.
    assert "cluster.local/ns/ai-demo/sa/*" in rendered
    mesh = yaml.safe_load((tmp_path / "mesh.yaml").read_text().split("\n", 1)[1])
    assert mesh["mesh"]["cluster_domain"] == DOMAIN
    default = yaml.safe_load((render(tmp_path / "default") / "mesh.yaml").read_text().split("\n", 1)[1])
    assert "cluster_domain" not in default["mesh"]  # the processor's default is cluster.local


def sidecar(directory: Path) -> tuple[dict[str, object], int]:
    config = istio_outbound_bootstrap(service="user-service", namespace="ai-demo",
                                      labels={"ai.extproc.io/enabled": "true"}, listen_port=10000, admin_port=10001,
                                      processor_port=10002, relay_port=10003, processor_host=PROCESSOR,
                                      hosts={"api.openai.com": 10004, "api.anthropic.com": 10004})
    applied = 0
    filters = [d for d in yaml.safe_load_all((directory / "envoyfilter.yaml").read_text()) if d]
    for envoy_filter in sorted(filters, key=lambda f: f["spec"].get("priority", 0)):
        config, count = apply_envoy_filter(config, envoy_filter)
        applied += count
    return config, applied


def referenced_clusters(config: object) -> set[str]:
    """Every cluster the configuration names: gRPC services (ext_proc), routes, aggregate members."""
    found: set[str] = set()
    if isinstance(config, dict):
        for key, value in config.items():
            if key in ("cluster_name", "cluster") and isinstance(value, str):
                if "%" not in value:  # not an access-log format
                    found.add(value)
            elif key == "clusters" and isinstance(value, list) and all(isinstance(v, str) for v in value):
                found.update(value)
            else:
                found |= referenced_clusters(value)
    elif isinstance(config, list):
        for item in config:
            found |= referenced_clusters(item)
    return found


def test_the_sidecar_of_such_a_cluster_finds_the_processor(tmp_path: Path) -> None:
    """What Istio builds in a cluster with that domain (clusters named after the FQDN), patched: every
    cluster our filters and routes name exists, and Envoy accepts it. The cluster.local rendering
    names processor clusters that do not exist there (Envoy would fail every call at run time)."""
    try:
        envoy = find_envoy()
    except LaunchError as exc:
        from tests.conftest import missing

        missing(str(exc))
        raise
    good, good_count = sidecar(render(tmp_path / "domain", "--cluster-domain", DOMAIN, "--credentials", "sidecar"))
    bad, bad_count = sidecar(render(tmp_path / "default", "--credentials", "sidecar"))
    assert good_count == bad_count + 1  # the keepalive MERGE found the processor's cluster only by its name

    def missing_clusters(config: dict[str, object]) -> set[str]:
        defined = {c["name"] for c in config["static_resources"]["clusters"]}  # type: ignore[index]
        return referenced_clusters(config["static_resources"]) - defined  # type: ignore[index]

    assert missing_clusters(good) == set()
    assert missing_clusters(bad) == {f"outbound|{port}||ai-extproc.ai-system.svc.cluster.local" for port in (50051,
                                                                                                           50052)}
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(good, sort_keys=False))
    run = subprocess.run([envoy, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


@pytest.mark.parametrize(("host", "domain", "inside"), [
    ("vllm.models.svc.example.internal", DOMAIN, True),
    ("vllm.models.svc.example.internal", "cluster.local", False),  # another cluster's domain: outside
    ("vllm.models.svc.cluster.local", "cluster.local", True),
    ("vllm.models.svc", DOMAIN, True),
    ("VLLM.Models.SVC.Example.Internal.", DOMAIN, True),
    ("api.openai.com", DOMAIN, False),
    ("svc.example.internal.attacker.com", DOMAIN, False),
])
def test_in_mesh(host: str, domain: str, inside: bool) -> None:
    assert in_mesh(host, domain) is inside


def test_the_decision_reaches_an_in_mesh_server_directly() -> None:
    server = Provider(name="vllm", api="openai", base_url=f"http://vllm.models.svc.{DOMAIN}:8000/v1")
    assert through_gateway(server, DOMAIN) is False
    assert through_gateway(server) is True  # with the default domain it would look external


def test_an_in_mesh_server_is_named_as_istio_names_it() -> None:
    """Istio names a Service's virtual host and cluster by its fully qualified name, whatever the
    base_url says (``http://vllm.models.svc:8000``): the patches must match that name."""
    from extproc.envoy_config.istio import IstioSpec, provider_host, route_target

    server = Provider(name="vllm", api="openai", base_url="http://vllm.models.svc:8000/v1")
    host = provider_host(server, DOMAIN)
    assert not host.external
    assert host.vhost == f"vllm.models.svc.{DOMAIN}:8000"
    spec = IstioSpec(providers=(server,), cluster_domain=DOMAIN, processor_host=PROCESSOR)
    assert route_target(spec, host) == f"outbound|8000||vllm.models.svc.{DOMAIN}"
    full = provider_host(Provider(name="vllm", api="openai", base_url=f"http://vllm.models.svc.{DOMAIN}:8000/v1"),
                         DOMAIN)
    assert full.vhost == host.vhost
