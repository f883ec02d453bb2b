"""The checked-in Istio install: generated files are fresh, `kubectl kustomize` builds it, and the
objects hang together (the EnvoyFilter names the Service that exists, the pod mounts what the
AIProviders reference, RBAC grants no more than the processor uses)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.cli import main
from extproc.cli.mesh import RENDER_ISTIO_FILES
from extproc.policy.crd import SECRETS_DIR
from extproc.server.app import SERVICE_NAME
from tests.conftest import missing

ISTIO = Path(__file__).resolve().parents[2] / "istio"


def test_generated_files_are_fresh(tmp_path: Path) -> None:
    assert main(["render", "crds", "-o", str(tmp_path / "crds.yaml")]) == 0
    assert main(["render", "istio", "-o", str(tmp_path)]) == 0
    for name in ("crds.yaml", *RENDER_ISTIO_FILES):
        assert (tmp_path / name).read_text() == (ISTIO / name).read_text(), f"istio/{name} is stale: make render-istio"


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        missing("kubectl not found (`make test` installs Debian's kubernetes-client)")
    assert kubectl is not None
    run = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return [d for d in yaml.safe_load_all(run.stdout) if d]


@pytest.fixture(scope="module")
def install() -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in kustomize(ISTIO)}


@pytest.fixture(scope="module")
def samples() -> list[dict[str, Any]]:
    return kustomize(ISTIO / "samples")


def test_install_builds_with_everything(install: dict[tuple[str, str], dict[str, Any]]) -> None:
    kinds = sorted({kind for kind, _ in install})
    assert kinds == ["AIProvider", "AuthorizationPolicy", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
                     "CustomResourceDefinition", "Deployment", "DestinationRule", "EnvoyFilter", "Gateway",
                     "HorizontalPodAutoscaler", "Namespace", "NetworkPolicy", "PeerAuthentication",
                     "PodDisruptionBudget", "Role", "RoleBinding", "Service", "ServiceAccount", "ServiceEntry",
                     "Sidecar", "VirtualService"]  # the trust objects: tests/istio/test_trust_manifests.py


def test_processor_deployment_is_hardened_and_probed(install: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = install[("Deployment", "ai-extproc")]
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert set(container["resources"]) == {"requests", "limits"}
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": SERVICE_NAME}
    assert container["livenessProbe"]["grpc"] == {"port": 50051}
    assert container["args"][0] == "serve-kubernetes"
    assert pod["terminationGracePeriodSeconds"] > 10  # longer than --grace=10
    assert install[("PodDisruptionBudget", "ai-extproc")]["spec"]["minAvailable"] == 1
    assert install[("HorizontalPodAutoscaler", "ai-extproc")]["spec"]["minReplicas"] == 2


def test_envoyfilter_reaches_the_rendered_service(install: dict[tuple[str, str], dict[str, Any]]) -> None:
    service = install[("Service", "ai-extproc")]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    port, relay = ports["grpc-extproc"], ports["http-relay"]
    assert port["name"].startswith("grpc-") and port["appProtocol"] == "grpc"
    assert relay["name"].startswith("http-") and relay["appProtocol"] == "http"
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    patches = install[("EnvoyFilter", "ai-extproc")]["spec"]["configPatches"]
    grpc = [p["patch"]["value"]["typed_config"]["grpc_service"]["envoy_grpc"] for p in patches
            if p["applyTo"] == "HTTP_FILTER" and "grpc_service" in p["patch"]["value"]["typed_config"]]
    assert grpc and all(g == {"cluster_name": f"outbound|{port['port']}||{host}", "authority": host} for g in grpc)
    # The fallback relay the provider routes retry to is the Service's relay port, which the pod serves.
    relays = {p["patch"]["value"]["cluster_type"]["typed_config"]["clusters"][1] for p in patches
              if p["applyTo"] == "CLUSTER" and p["patch"]["operation"] == "ADD"}
    assert relays == {f"outbound|{relay['port']}||{host}"}
    # The processor's own cluster gets HTTP/2 pings (a frozen replica is left within seconds).
    (keepalive,) = [p for p in patches if p["applyTo"] == "CLUSTER" and p["patch"]["operation"] == "MERGE"]
    assert keepalive["match"]["cluster"] == {"service": host, "portNumber": port["port"]}
    (container,) = install[("Deployment", "ai-extproc")]["spec"]["template"]["spec"]["containers"]
    assert f"--relay=0.0.0.0:{relay['port']}" in container["args"]
    assert relay["targetPort"] in {p["name"] for p in container["ports"]}
    assert {p["match"]["context"] for p in patches} == {"SIDECAR_OUTBOUND"}


def test_pod_mounts_what_the_providers_and_settings_need(install: dict[tuple[str, str], dict[str, Any]]) -> None:
    pod = install[("Deployment", "ai-extproc")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for (kind, _), obj in install.items():
        if kind == "AIProvider" and "credential" in obj["spec"]:
            secret = obj["spec"]["credential"]["secretRef"]["name"]
            assert volumes[mounts[f"{SECRETS_DIR}/{secret}"]]["secret"]["secretName"] == secret
    assert "--policy=/etc/ai-mesh" in container["args"]
    config_map = volumes[mounts["/etc/ai-mesh"]]["configMap"]["name"]
    assert "mesh.yaml" in install[("ConfigMap", config_map)]["data"]
    assert mounts["/tmp"] == "tmp"  # the only writable path under a read-only root filesystem


def test_rbac_grants_only_what_the_processor_uses(install: dict[tuple[str, str], dict[str, Any]]) -> None:
    rules = [(kind, rule) for (kind, _), obj in install.items() if kind in ("ClusterRole", "Role")
             for rule in obj["rules"]]
    granted = {(kind, resource, verb) for kind, rule in rules for resource in rule["resources"]
               for verb in rule["verbs"]}
    assert granted == {
        ("ClusterRole", "aipolicies", "get"), ("ClusterRole", "aipolicies", "list"),
        ("ClusterRole", "aipolicies", "watch"), ("ClusterRole", "aipolicies/status", "patch"),
        ("Role", "aiproviders", "get"), ("Role", "aiproviders", "list"), ("Role", "aiproviders", "watch"),
        ("Role", "aiproviders/status", "patch"),
    }
    assert install[("Role", "ai-extproc-providers")]["metadata"]["namespace"] == "ai-system"


def test_sample_workloads_opt_in_and_have_policies(install: dict[tuple[str, str], dict[str, Any]],
                                                  samples: list[dict[str, Any]]) -> None:
    selector = install[("EnvoyFilter", "ai-extproc")]["spec"]["workloadSelector"]["labels"]
    policies = {o["spec"]["service"] for o in samples if o["kind"] == "AIPolicy"}
    deployments = [o for o in samples if o["kind"] == "Deployment"]
    assert len(deployments) == 3
    for deployment in deployments:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        assert labels["app"] in policies
        assert deployment["metadata"]["namespace"] == "ai-demo"
    (namespace,) = [o for o in samples if o["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"


def test_render_istio_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "mesh.yaml"
    policy.write_text("providers:\n- {name: vllm, api: openai, base_url: 'http://vllm.models.svc.cluster.local:8000/v1'}\n")
    assert main(["render", "istio", "--policy", str(policy), "--no-selector", "--filter-namespace", "shop"]) == 0
    objects = [o for o in yaml.safe_load_all(capsys.readouterr().out) if o]
    (envoy_filter,) = [o for o in objects if o["kind"] == "EnvoyFilter" and o["metadata"]["name"] == "ai-extproc"]
    assert envoy_filter["metadata"]["namespace"] == "shop" and "workloadSelector" not in envoy_filter["spec"]
    ports = {p["match"].get("listener", p["match"].get("routeConfiguration"))["portNumber"]
             for p in envoy_filter["spec"]["configPatches"] if p["applyTo"] != "CLUSTER"}
    assert ports == {8000}  # an in-mesh model server: its own port, and no ServiceEntry
    vhosts = [p["match"]["routeConfiguration"]["vhost"]["name"] for p in envoy_filter["spec"]["configPatches"]
              if p["applyTo"] == "VIRTUAL_HOST"]
    assert vhosts == ["vllm.models.svc.cluster.local:8000"]
    # + fail-open; the processor's access policies (and the async worker's); no egress gateway: no
    # external host; no client Sidecar: no AIPolicy names a client namespace (nothing may call 50051).
    assert sorted(o["kind"] for o in objects) == ["AIProvider", "AuthorizationPolicy", "AuthorizationPolicy",
                                                  "EnvoyFilter", "EnvoyFilter", "NetworkPolicy", "NetworkPolicy",
                                                  "PeerAuthentication"]
    (authz,) = [o for o in objects if o["kind"] == "AuthorizationPolicy" and o["metadata"]["name"] == "ai-extproc"]
    assert {port for rule in authz["spec"]["rules"] for port in rule["to"][0]["operation"]["ports"]} == {"9902"}
    policy.write_text("providers:\n- {name: openai, api: openai, base_url: 'https://api.openai.com/v1'}\n")
    assert main(["render", "istio", "--policy", str(policy)]) == 1
    assert "base_url must be http://" in capsys.readouterr().err


def test_the_image_ships_every_data_file() -> None:
    """The Dockerfile installs the package (not the tree): data files must be in package-data."""
    import tomllib

    root = ISTIO.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["extproc"]
    package = root / "extproc"
    data = [p.relative_to(package) for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert data
    for path in data:
        assert any(path.match(g.replace("**/", "")) or path.match(g) for g in globs), f"{path} is not in package-data"


def test_async_jobs_install_wires_processor_and_worker(install: dict[tuple[str, str], dict[str, Any]]) -> None:
    """istio/async-jobs: the worker replays jobs through an opted-in sidecar with the processors' key,
    and the ConfigMap it ships is the one the processor reads its NATS URL from."""
    jobs = {(o["kind"], o["metadata"]["name"]): o for o in kustomize(ISTIO / "async-jobs")}
    worker = jobs[("Deployment", "ai-extproc-worker")]["spec"]["template"]
    assert worker["metadata"]["labels"]["ai.extproc.io/enabled"] == "true"
    envoy_filter = install[("EnvoyFilter", "ai-extproc")]
    assert all(worker["metadata"]["labels"].get(k) == v
               for k, v in envoy_filter["spec"]["workloadSelector"]["labels"].items())
    (container,) = worker["spec"]["containers"]
    assert container["args"][0] == "worker"
    processor = install[("Deployment", "ai-extproc")]["spec"]["template"]["spec"]
    (extproc,) = processor["containers"]
    env = {e["name"]: e for e in extproc["env"]}
    key_file = env["EXTPROC_SIGNING_KEY_FILE"]["value"]
    assert {e["name"]: e["value"] for e in container["env"]}["EXTPROC_SIGNING_KEY_FILE"] == key_file
    assert {v["secret"]["secretName"] for v in worker["spec"]["volumes"] if "secret" in v} == {
        v["secret"]["secretName"] for v in processor["volumes"] if v["name"] == "signing-key"}
    ref = env["EXTPROC_JOBS_NATS"]["valueFrom"]["configMapKeyRef"]
    config = jobs[("ConfigMap", ref["name"])]
    assert config["metadata"]["namespace"] == "ai-system" and ref["key"] in config["data"]
    nats_arg = next(a for a in container["args"] if a.startswith("--nats="))
    assert nats_arg == f"--nats={config['data'][ref['key']]}"  # both sides talk to the same NATS
