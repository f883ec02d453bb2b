"""The Istio install of every provider API (#15), rendered from the same definitions as the processor's.

A platform's providers file with Azure OpenAI, Bedrock, Gemini, Vertex AI and two OpenAI-compatible
servers (one in the mesh on its own port, one outside it in plain HTTP) is rendered with
``extproc render istio``: every AIProvider validates against the CRD and reads back as the provider it
came from; each host outside the mesh gets a ServiceEntry on the port the sidecar governs and a
DestinationRule originating TLS to 443 with its own SNI (none for plain HTTP, nothing for the in-mesh
server); and an Istio-shaped sidecar patched with the EnvoyFilter is accepted by Envoy.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.launch import LaunchError, find_envoy
from extproc.cli.main import main
from extproc.policy.crd import provider_document
from extproc.policy.loader import check_documents, load_policy
from tests.istio.sidecar import apply_envoy_filter, istio_outbound_bootstrap
from tests.istio.test_crds import errors

PROVIDERS = """
mesh:
  unknown_service: deny
providers:
- name: azure
  api: azure_openai
  base_url: http://contoso-ai.openai.azure.com
  api_version: 2024-10-21
  deployments: {gpt-4o-mini: gpt-4o-mini-prod}
  credential: {env: AZURE_OPENAI_API_KEY}
- name: azure-entra
  api: azure_openai
  base_url: http://fabrikam-ai.openai.azure.com
  api_version: v1
  credential: {type: entra_id, file: /var/run/secrets/azure/token}
- name: bedrock
  api: bedrock
  region: eu-west-1
  credential: {type: aws}
- name: gemini
  api: gemini
  credential: {env: GEMINI_API_KEY}
- name: vertex
  api: vertex
  project: my-project
  location: europe-west4
  credential: {type: google, file: /var/run/secrets/google/key.json}
- name: vllm
  api: openai_compatible
  base_url: http://vllm.models.svc.cluster.local:8000/v1
- name: lab-server
  api: openai_compatible
  base_url: http://10.20.30.40:8080/v1
  upstream_tls: false
"""
SERVICE = """
service: app
ai_proxy:
  models:
  - {name: a, provider: azure, model: gpt-4o-mini, fallback: ['bedrock/anthropic.claude-3-haiku-20240307-v1:0']}
  - {name: b, provider: azure-entra, model: gpt-4o-mini-prod}
  - {name: c, provider: gemini, model: gemini-2.5-flash, fallback: [vertex/gemini-2.5-flash]}
  - {name: d, provider: vllm, model: llama, fallback: [lab-server/llama]}
"""
EXTERNAL_TLS = {"azure": "contoso-ai.openai.azure.com", "azure-entra": "fabrikam-ai.openai.azure.com",
                "bedrock": "bedrock-runtime.eu-west-1.amazonaws.com", "gemini": "generativelanguage.googleapis.com",
                "vertex": "europe-west4-aiplatform.googleapis.com"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[tuple[str, str], dict[str, Any]]]:
    policies = tmp_path_factory.mktemp("provider-policies")
    (policies / "mesh.yaml").write_text(PROVIDERS)
    (policies / "app.yaml").write_text(SERVICE)
    load_policy([policies])  # the processor accepts what is rendered from
    out = tmp_path_factory.mktemp("provider-install")
    assert main(["render", "istio", "--policy", str(policies), "--credentials", "sidecar", "-o", str(out)]) == 0
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in out.rglob("*.yaml"):
        for obj in yaml.safe_load_all(path.read_text()):
            if isinstance(obj, dict) and "kind" in obj:  # kustomization.yaml and mesh.yaml are not objects
                objects[(obj["kind"], obj["metadata"]["name"])] = obj
    return out, objects


def test_every_provider_validates_and_reads_back(
        rendered: tuple[Path, dict[tuple[str, str], dict[str, Any]]]) -> None:
    _, objects = rendered
    names = [name for kind, name in objects if kind == "AIProvider"]
    assert sorted(names) == sorted(["azure", "azure-entra", "bedrock", "gemini", "vertex", "vllm", "lab-server"])
    documents = []
    for name in names:
        obj = objects[("AIProvider", name)]
        assert errors("AIProvider", obj) == [], name
        documents.append(provider_document(obj, secrets_dir="/secrets"))
    problems = check_documents(documents)
    assert problems == [], problems
    spec = objects[("AIProvider", "bedrock")]["spec"]
    assert spec["credential"] == {"type": "aws"} and spec["region"] == "eu-west-1"  # IRSA: no Secret
    assert objects[("AIProvider", "azure-entra")]["spec"]["credential"] == {
        "type": "entra_id", "secretRef": {"name": "azure-entra-entra-token", "key": "api-key"}}
    assert objects[("AIProvider", "vertex")]["spec"]["credential"]["type"] == "google"


def test_each_external_host_gets_tls_origination_to_443_with_its_sni(
        rendered: tuple[Path, dict[tuple[str, str], dict[str, Any]]]) -> None:
    _, objects = rendered
    for name, host in EXTERNAL_TLS.items():
        entry = objects[("ServiceEntry", name)]["spec"]
        assert entry["hosts"] == [host] and entry["location"] == "MESH_EXTERNAL"
        assert entry["ports"] == [{"number": 80, "name": f"http-{name}", "protocol": "HTTP", "targetPort": 443}]
        rule = objects[("DestinationRule", name)]["spec"]
        assert rule["host"] == host
        assert rule["trafficPolicy"]["portLevelSettings"] == [
            {"port": {"number": 80}, "tls": {"mode": "SIMPLE", "sni": host}}]


def test_plain_http_and_in_mesh_servers_get_no_tls(
        rendered: tuple[Path, dict[tuple[str, str], dict[str, Any]]]) -> None:
    _, objects = rendered
    lab = objects[("ServiceEntry", "lab-server")]["spec"]
    assert lab["ports"] == [{"number": 8080, "name": "http-lab-server", "protocol": "HTTP", "targetPort": 8080}]
    assert ("DestinationRule", "lab-server") not in objects
    assert ("ServiceEntry", "vllm") not in objects and ("DestinationRule", "vllm") not in objects


def test_a_sidecar_with_every_provider_host_is_accepted_by_envoy(
        rendered: tuple[Path, dict[tuple[str, str], dict[str, Any]]], tmp_path: Path) -> None:
    """Seven provider hosts: the local-reply mappers match each host (one regex of all of them exceeded
    RE2's program size limit, and Envoy refused the whole configuration)."""
    try:
        envoy = find_envoy()
    except LaunchError as exc:
        from tests.conftest import missing

        missing(str(exc))
        raise
    out, _ = rendered
    config = istio_outbound_bootstrap(service="app", namespace="ai-demo", labels={"ai.extproc.io/enabled": "true"},
                                      listen_port=10000, admin_port=10001, processor_port=10002, relay_port=10003,
                                      hosts={host: 10004 for host in EXTERNAL_TLS.values()})
    applied = 0
    filters = [d for d in yaml.safe_load_all((out / "envoyfilter.yaml").read_text()) if d]
    for envoy_filter in sorted(filters, key=lambda f: f["spec"].get("priority", 0)):
        config, count = apply_envoy_filter(config, envoy_filter)
        applied += count
    assert applied > len(EXTERNAL_TLS)  # a route patch per provider host, at least
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run = subprocess.run([envoy, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
