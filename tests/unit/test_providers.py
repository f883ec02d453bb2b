"""The provider APIs beyond OpenAI and Anthropic (#15): Azure OpenAI, Bedrock, Gemini, Vertex AI and
OpenAI-compatible servers, from the policy entry to the settled answer.

* the policy: each API's minimal entry loads; every missing or misplaced field is a problem at the entry's
  ``file:line`` naming the field (also through ``extproc check``); Azure routes need a deployment;
* the CRD and Istio objects: ``AIProvider`` ⇄ ``Provider``, ServiceEntry/DestinationRule per host;
* the request: each API's path and credential headers (SigV4 checked with botocore);
* the decision: a call forwarded to each new provider in its format, the hops a chain can use, and a
  provider's own path refused unless a genuine fallback state brought it;
* the response: Bedrock JSON and event streams, Gemini SSE, translated for the caller and settled on the
  provider's own counts.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import botocore.auth
import orjson
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from extproc.base.apis import (
    BEDROCK_FORMAT,
    ENDPOINTS,
    GEMINI_FORMAT,
    Api,
    ApiError,
    ErrorKind,
    classify,
    native_api,
    relayed_endpoint,
    wire_format,
)
from extproc.base.tokens import Signer
from extproc.base.wire import FALLBACK_HEADER, FALLBACK_MARKER, USAGE_HEADER
from extproc.cache.store import ResponseCache
from extproc.core import fallback
from extproc.core.cloud_auth import AwsChain, AwsKeys, CloudAuth, CredentialUnavailable, GoogleToken
from extproc.core.credentials import CredentialStore
from extproc.core.decision import Decider, Exchange
from extproc.core.forwarding import provider_form, streamed, translatable, usable_hops
from extproc.core.messages import Forward, LocalReply
from extproc.core.provider_request import body_model, credential_headers, provider_auth, provider_path
from extproc.core.routing import Target
from extproc.core.runtime import Runtime
from extproc.core.settlement import SettleInfo, Settlement
from extproc.envoy_config.istio import IstioSpec, provider_objects
from extproc.policy.crd import SECRETS_DIR, ObjectError, key_of, provider_document, spec_path
from extproc.policy.loader import PolicyError, Problem, build_policy, load_policy
from extproc.policy.model import CacheSettings, CredentialSource, Provider, QuotaSettings
from extproc.quota.engine import QuotaEngine
from extproc.translate import openai_to_anthropic
from extproc.translate.eventstream import encode
from tests.unit.test_decision import decide, error_of, headers_of, request, settle_json

REPO = Path(__file__).resolve().parents[2]
SIGNING_KEY = b"p" * 32
BEDROCK_MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
BEDROCK_PATH = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"


# =====================================================================================================
# 1. the policy


# One minimal valid entry per API (no base_url where the API has a public default).
MINIMAL: dict[str, str] = {
    "openai": "api: openai\n  base_url: http://api.openai.com/v1",
    "anthropic": "api: anthropic\n  base_url: http://api.anthropic.com/v1",
    "azure_openai": ("api: azure_openai\n  base_url: http://contoso.openai.azure.com\n  api_version: 2024-10-21\n"
                     "  deployments: {gpt-4o: gpt4o-prod}\n  credential: {env: AZURE_KEY}"),
    "azure_openai_v1": ("api: azure_openai\n  base_url: http://contoso.openai.azure.com\n  api_version: v1\n"
                        "  credential: {type: entra_id, file: /var/run/secrets/azure/token}"),
    "bedrock": "api: bedrock\n  region: us-east-1\n  credential: {type: aws}",
    "bedrock_profile": "api: bedrock\n  region: eu-west-3\n  credential: {type: aws, profile: prod}",
    "gemini": "api: gemini\n  credential: {file: /var/run/secrets/gemini/key}",
    "vertex": "api: vertex\n  project: demo-project\n  location: us-central1\n  credential: {type: google}",
    "vertex_key_file": ("api: vertex\n  project: demo-project\n  location: global\n"
                        "  credential: {type: google, file: /var/run/secrets/vertex/key.json}"),
    "openai_compatible": "api: openai_compatible\n  base_url: http://vllm.models.svc.cluster.local:8000/v1",
}
# The entry before the one under test: several lines, so the line a problem names is not trivially 1 or 2.
FIRST_ENTRY = """\
providers:
- name: openai-main
  api: openai
  base_url: http://api.openai.com/v1
  credential: {env: OPENAI_API_KEY}
"""
ENTRY_LINE = FIRST_ENTRY.count("\n") + 1  # the line of "- name: under-test"


def providers_file(tmp_path: Path, entry: str, name: str = "mesh.yaml") -> Path:
    """FIRST_ENTRY, then ``entry`` (its lines after ``api:`` indented by two) as providers[1]."""
    path = tmp_path / name
    path.write_text(FIRST_ENTRY + f"- name: under-test\n  {entry}\n")
    return path


def line_of(path: Path, needle: str, after: int = 0) -> int:
    """The 1-based line of the first line of ``path`` after line ``after`` that contains ``needle``."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if n > after and needle in line)


def problems(paths: list[Path]) -> list[Problem]:
    with pytest.raises(PolicyError) as caught:
        load_policy(paths)
    return list(caught.value.problems)


@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_a_minimal_entry_of_each_api_loads(tmp_path: Path, kind: str) -> None:
    providers_file(tmp_path, MINIMAL[kind])
    policy = load_policy([tmp_path])
    provider = policy.providers["under-test"]
    assert provider.api == kind.removesuffix("_v1").removesuffix("_profile").removesuffix("_key_file")
    assert provider.base_url.startswith("http://")


# (entry, field, where the problem is: None for the entry's own line else the text of its line, what it says)
MISSING: list[tuple[str, str, str | None, str]] = [
    ("api: bedrock\n  credential: {type: aws}", "region", None, "a bedrock provider needs 'region'"),
    ("api: bedrock\n  region: useast1\n  credential: {type: aws}", "region", "region: useast1",
     "a bedrock provider needs 'region'"),
    ("api: vertex\n  location: us-central1\n  credential: {type: google}", "project", None,
     "a vertex provider needs 'project'"),
    ("api: vertex\n  project: demo-project\n  credential: {type: google}", "location", None,
     "a vertex provider needs 'location'"),
    ("api: vertex\n  project: demo-project\n  location: moon\n  credential: {type: google}", "location",
     "location: moon",
     "a vertex provider needs 'location'"),
    ("api: azure_openai\n  base_url: http://c.openai.azure.com\n  deployments: {a: b}\n  credential: {env: K}",
     "api_version", None, "an azure_openai provider needs 'api_version'"),
    ("api: azure_openai\n  base_url: http://c.openai.azure.com\n  api_version: 2024-10\n  credential: {env: K}",
     "api_version", "api_version: 2024-10", "api_version '2024-10' is not an Azure API version"),
    ("api: azure_openai\n  base_url: http://c.openai.azure.com\n  api_version: 2024-10-21\n  credential: {env: K}",
     "deployments", None, "needs 'deployments'"),
    ("api: azure_openai\n  base_url: http://c.openai.azure.com\n  api_version: v1\n  deployments: {a: b}\n"
     "  credential: {env: K}", "deployments", "deployments: {a: b}",
     "'deployments' does not apply with api_version v1"),
    ("api: azure_openai\n  base_url: http://c.openai.azure.com\n  api_version: v1", "credential", None,
     "a azure_openai provider needs a credential source"),
    ("api: bedrock\n  region: us-east-1", "credential", None,
     "a bedrock provider needs a credential source, e.g. credential: {type: aws}"),
    ("api: gemini", "credential", None, "a gemini provider needs a credential source"),
    ("api: vertex\n  project: demo-project\n  location: global", "credential", None,
     "a vertex provider needs a credential source, e.g. credential: {type: google"),
    ("api: openai\n  credential: {env: K}", "base_url", None, "a provider of api openai needs 'base_url'"),
    ("api: openai_compatible", "base_url", None, "needs 'base_url'"),
]
MISPLACED: list[tuple[str, str, str | None, str]] = [
    ("api: openai\n  base_url: http://api.openai.com/v1\n  region: us-east-1", "region", "region: us-east-1",
     "'region' does not apply to a provider of api openai"),
    ("api: gemini\n  project: demo-project\n  credential: {env: G}", "project", "project: demo-project",
     "'project' does not apply to a provider of api gemini"),
    ("api: bedrock\n  region: us-east-1\n  api_version: v1\n  credential: {type: aws}", "api_version",
     "api_version: v1", "'api_version' does not apply to a provider of api bedrock"),
    ("api: openai_compatible\n  base_url: http://h/v1\n  deployments: {a: b}", "deployments", "deployments:",
     "'deployments' does not apply to a provider of api openai_compatible"),
    ("api: vertex\n  project: demo-project\n  location: global\n  region: us-east-1\n  credential: {type: google}",
     "region",
     "region: us-east-1", "'region' does not apply to a provider of api vertex"),
    ("api: gemini\n  credential: {type: aws}", "credential", "credential:",
     "a gemini provider takes a credential of type api_key, not aws"),
    ("api: bedrock\n  region: us-east-1\n  credential: {env: AWS_KEY}", "credential", "credential:",
     "a bedrock provider takes a credential of type aws, not api_key"),
    ("api: azure_openai\n  base_url: http://c.openai.azure.com\n  api_version: v1\n  credential: {type: google}",
     "credential", "credential:", "a azure_openai provider takes a credential of type api_key or entra_id, not google"),
    ("api: openai\n  base_url: http://api.openai.com/v1\n  credential: {env: K, profile: prod}", "credential",
     "credential:", "'profile' applies to type aws only"),
    ("api: openai\n  base_url: http://api.openai.com/v1\n  credential: {env: K, file: /k}", "credential",
     "credential:", "set exactly one of 'env' or 'file'"),
    ("api: azure_openai\n  base_url: http://c.openai.azure.com\n  api_version: v1\n  credential: {type: entra_id}",
     "credential", "credential:", "set exactly one of 'env' or 'file'"),
    ("api: bedrock\n  region: us-east-1\n  credential: {type: aws, env: AWS_ACCESS_KEY_ID}", "credential",
     "credential:", "a aws credential comes from its own chain: set only 'profile'"),
    ("api: bedrock\n  region: us-east-1\n  credential: {type: aws, file: /creds}", "credential", "credential:",
     "comes from its own chain"),
    ("api: vertex\n  project: demo-project\n  location: global\n  credential: {type: google, env: GOOGLE_KEY}",
     "credential",
     "credential:", "set only 'file' (a service-account key), or nothing"),
]


@pytest.mark.parametrize(("entry", "field", "at", "message"), MISSING + MISPLACED,
                         ids=[f"{e.splitlines()[0][5:]}-{f}-{i}" for i, (e, f, _, _) in enumerate(MISSING + MISPLACED)])
def test_a_provider_problem_names_file_line_and_field(tmp_path: Path, entry: str, field: str, at: str | None,
                                                      message: str) -> None:
    path = providers_file(tmp_path, entry)
    line = ENTRY_LINE if at is None else line_of(path, at, after=ENTRY_LINE)
    assert line > ENTRY_LINE or at is None
    (problem,) = problems([tmp_path])
    assert (problem.file, problem.line, problem.path) == (str(path), line, f"providers[1].{field}")
    assert message in problem.message
    named = {"credential": ("credential", "'env'", "'profile'", "'file'")}.get(field, (field,))
    assert any(word in problem.message for word in named), problem.message
    assert str(problem).startswith(f"{path}:{line}: providers[1].{field}: ")


def test_the_entry_line_is_the_entrys_own_in_a_file_of_many(tmp_path: Path) -> None:
    """Three broken entries after good ones: each problem at its own entry's line, none at the list's."""
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent("""\
        # the platform's providers
        providers:
        - name: openai
          api: openai
          base_url: http://api.openai.com/v1
        - name: bedrock-eu
          api: bedrock
          credential: {type: aws}
        - name: gemini
          api: gemini
          credential: {env: GEMINI_KEY}
        - name: vertex
          api: vertex
          project: demo-project
          credential: {type: google}
        - name: azure
          api: azure_openai
          base_url: http://contoso.openai.azure.com
          api_version: 2024-10-21
          deployments: {gpt-4o: prod}
        """))
    found = {(p.line, p.path) for p in problems([path])}
    assert found == {(line_of(path, "name: bedrock-eu"), "providers[1].region"),
                     (line_of(path, "name: vertex"), "providers[3].location"),
                     (line_of(path, "name: azure"), "providers[4].credential")}
    assert line_of(path, "name: bedrock-eu") == 6


AZURE_MESH = """\
providers:
- name: azure
  api: azure_openai
  base_url: http://contoso.openai.azure.com
  api_version: 2024-10-21
  deployments: {gpt-4o: gpt4o-prod, o3-mini: o3-mini-eu}
  credential: {env: AZURE_KEY}
- name: azure-v1
  api: azure_openai
  base_url: http://contoso.openai.azure.com
  api_version: v1
  credential: {env: AZURE_KEY}
"""


def test_an_azure_route_needs_a_deployment_for_its_model(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(AZURE_MESH)
    service = tmp_path / "order.yaml"
    service.write_text(textwrap.dedent("""\
        service: order-service
        ai_proxy:
          models:
          - {name: ok, provider: azure, model: gpt-4o, fallback: [azure-v1/anything-goes]}
          - name: chat
            provider: azure
            model: gpt-4o-mini
            fallback:
            - {provider: azure, model: o3-mini}
            - {provider: azure, model: gpt-4.1}
          - name: split
            provider: azure
            model: gpt-4o
            variants:
            - {name: a, weight: 1}
            - {name: b, weight: 1, model: gpt-5}
        """))
    found = {(p.file, p.line, p.path): p.message for p in problems([tmp_path])}
    assert set(found) == {
        (str(service), line_of(service, "model: gpt-4o-mini"), "ai_proxy.models[1].model"),
        (str(service), line_of(service, "gpt-4.1"), "ai_proxy.models[1].fallback[1].model"),
        (str(service), line_of(service, "model: gpt-5"), "ai_proxy.models[2].variants[1].model"),
    }
    message = found[(str(service), line_of(service, "model: gpt-4o-mini"), "ai_proxy.models[1].model")]
    assert message == ("provider 'azure' has no deployment for model 'gpt-4o-mini' (its deployments: gpt-4o, "
                       "o3-mini)")


def test_an_azure_v1_route_needs_no_deployment(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(AZURE_MESH)
    (tmp_path / "order.yaml").write_text(
        "service: order-service\nai_proxy:\n  models:\n  - {name: chat, provider: azure-v1, model: gpt-4.1}\n")
    policy = load_policy([tmp_path])
    assert policy.providers["azure-v1"].deployments is None


@pytest.mark.parametrize(("entry", "base_url", "authority"), [
    ("api: bedrock\n  region: eu-central-1\n  credential: {type: aws}",
     "http://bedrock-runtime.eu-central-1.amazonaws.com", "bedrock-runtime.eu-central-1.amazonaws.com"),
    ("api: bedrock\n  region: us-gov-west-1\n  credential: {type: aws}",
     "http://bedrock-runtime.us-gov-west-1.amazonaws.com", "bedrock-runtime.us-gov-west-1.amazonaws.com"),
    ("api: gemini\n  credential: {env: G}", "http://generativelanguage.googleapis.com",
     "generativelanguage.googleapis.com"),
    ("api: vertex\n  project: demo-project\n  location: us-central1\n  credential: {type: google}",
     "http://us-central1-aiplatform.googleapis.com", "us-central1-aiplatform.googleapis.com"),
    ("api: vertex\n  project: demo-project\n  location: global\n  credential: {type: google}",
     "http://aiplatform.googleapis.com", "aiplatform.googleapis.com"),
    # An explicit base_url (a VPC endpoint, a proxy) wins over the default.
    ("api: bedrock\n  region: us-east-1\n  base_url: http://bedrock.vpce.internal:8080/\n  credential: {type: aws}",
     "http://bedrock.vpce.internal:8080", "bedrock.vpce.internal:8080"),
])
def test_public_endpoints_are_the_default_base_url(tmp_path: Path, entry: str, base_url: str,
                                                    authority: str) -> None:
    providers_file(tmp_path, entry)
    provider = load_policy([tmp_path]).providers["under-test"]
    assert (provider.base_url, provider.authority, provider.base_path) == (base_url, authority, "")


def run_check(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc", "check", str(directory)], capture_output=True,
                          text=True, cwd=REPO, timeout=120, check=False)


def test_extproc_check_prints_the_same_problem(tmp_path: Path) -> None:
    path = providers_file(tmp_path, "api: bedrock\n  credential: {type: aws}")
    (problem,) = problems([tmp_path])
    result = run_check(tmp_path)
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert str(problem) in lines
    assert f"{path}:{ENTRY_LINE}: providers[1].region: a bedrock provider needs 'region'" in result.stderr
    assert "1 problem(s) found" in result.stderr
    assert "ok:" not in result.stdout
    path.write_text(FIRST_ENTRY + "- name: under-test\n  " + MINIMAL["bedrock"] + "\n")
    fixed = run_check(tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.startswith("ok: ")


# =====================================================================================================
# 2. the AIProvider CRD and the Istio objects


def ai_provider(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "ai.extproc.io/v1alpha1", "kind": "AIProvider",
            "metadata": {"name": name, "namespace": "ai-system"}, "spec": spec}


def loaded(obj: dict[str, Any], secrets_dir: str = SECRETS_DIR) -> Provider:
    """The provider the processor serves for an AIProvider object."""
    policy = build_policy([provider_document(obj, secrets_dir)], [])
    return policy.providers[obj["metadata"]["name"]]


def test_an_entra_id_secret_ref_becomes_a_file_credential_of_that_type() -> None:
    obj = ai_provider("azure", {"api": "azure_openai", "base_url": "http://contoso.openai.azure.com",
                                "api_version": "v1", "credential": {
                                    "type": "entra_id", "secretRef": {"name": "azure-entra", "key": "token"}}})
    document = provider_document(obj)
    assert document.data["providers"][0]["credential"] == {"type": "entra_id",
                                                           "file": f"{SECRETS_DIR}/azure-entra/token"}
    provider = loaded(obj, "/mnt/secrets")
    assert provider.credential == CredentialSource(type="entra_id", file="/mnt/secrets/azure-entra/token")


def test_an_aws_credential_passes_through() -> None:
    for credential in ({"type": "aws"}, {"type": "aws", "profile": "bedrock-prod"}):
        obj = ai_provider("bedrock", {"api": "bedrock", "region": "us-east-1", "credential": credential})
        assert provider_document(obj).data["providers"][0]["credential"] == credential
        provider = loaded(obj)
        assert provider.credential == CredentialSource.model_validate(credential)
        assert provider.base_url == "http://bedrock-runtime.us-east-1.amazonaws.com"


def test_a_secret_ref_next_to_another_source_is_refused() -> None:
    obj = ai_provider("gemini", {"api": "gemini", "credential": {"env": "G", "secretRef": {"name": "g", "key": "k"}}})
    with pytest.raises(ObjectError, match="exactly one of 'env', 'file' or 'secretRef'"):
        provider_document(obj)


def test_an_ai_provider_problem_maps_to_its_spec_field() -> None:
    obj = ai_provider("bedrock", {"api": "bedrock", "credential": {"type": "aws"}})
    with pytest.raises(PolicyError) as caught:
        build_policy([provider_document(obj)], [])
    (problem,) = caught.value.problems
    assert (problem.file, problem.path) == ("AIProvider ai-system/bedrock", "providers[0].region")
    assert spec_path(key_of("AIProvider", obj), problem.path) == "spec.region"


ROUND_TRIP = (
    Provider(name="bedrock", api="bedrock", region="eu-west-1", credential=CredentialSource(type="aws")),
    Provider(name="bedrock-prod", api="bedrock", region="us-east-1", upstream_port=8443,
             credential=CredentialSource(type="aws", profile="prod")),
    Provider(name="azure", api="azure_openai", base_url="http://contoso.openai.azure.com", api_version="2024-10-21",
             deployments={"gpt-4o": "gpt4o-prod"}, credential=CredentialSource(type="entra_id", file="/t/token")),
    Provider(name="azure-key", api="azure_openai", base_url="http://fabrikam.openai.azure.com", api_version="v1",
             credential=CredentialSource(env="AZURE_KEY")),
    Provider(name="vertex", api="vertex", project="demo-project", location="europe-west4",
             credential=CredentialSource(type="google", file="/k/sa.json")),
    Provider(name="vertex-adc", api="vertex", project="demo-project", location="global",
             credential=CredentialSource(type="google")),
    Provider(name="gemini", api="gemini", credential=CredentialSource(env="GEMINI_KEY")),
)


def objects_of(providers: tuple[Provider, ...], **spec: Any) -> dict[tuple[str, str], dict[str, Any]]:
    objects = provider_objects(IstioSpec(providers=providers, **spec))
    keyed = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(keyed) == len(objects)
    return keyed


@pytest.mark.parametrize("provider", ROUND_TRIP, ids=[p.name for p in ROUND_TRIP])
def test_an_ai_provider_spec_round_trips_to_an_equal_provider(provider: Provider) -> None:
    obj = objects_of((provider,))[("AIProvider", provider.name)]
    back = loaded(obj)
    assert back.model_dump(exclude={"credential"}) == provider.model_dump(exclude={"credential"})
    assert back.credential is not None and provider.credential is not None
    assert (back.credential.type, back.credential.profile) == (provider.credential.type, provider.credential.profile)
    source = provider.credential
    if source.type in ("aws",) or (source.type == "google" and source.file is None):
        assert back.credential == source  # a cloud chain needs no Secret
        assert "secretRef" not in obj["spec"]["credential"]
    else:  # a key, token or key file: from a Secret the processor mounts
        ref = obj["spec"]["credential"]["secretRef"]
        assert back.credential.file == f"{SECRETS_DIR}/{ref['name']}/{ref['key']}"
        assert back.credential.env is None


@pytest.mark.parametrize("provider", ROUND_TRIP, ids=[p.name for p in ROUND_TRIP])
def test_an_external_provider_gets_tls_to_443_with_its_sni(provider: Provider) -> None:
    objects = objects_of((provider,))
    host = provider.authority
    entry = objects[("ServiceEntry", provider.name)]["spec"]
    assert entry["hosts"] == [host] and entry["location"] == "MESH_EXTERNAL"
    assert entry["ports"] == [{"number": 80, "name": f"http-{provider.name}", "protocol": "HTTP",
                               "targetPort": provider.upstream_port or 443}]
    rule = objects[("DestinationRule", provider.name)]["spec"]
    assert rule["host"] == host
    assert rule["trafficPolicy"]["portLevelSettings"] == [{"port": {"number": 80},
                                                           "tls": {"mode": "SIMPLE", "sni": host}}]


def test_the_sni_is_the_regional_host() -> None:
    objects = objects_of(ROUND_TRIP)
    sni = {name: o["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"]["sni"]
           for (kind, name), o in objects.items() if kind == "DestinationRule"}
    assert sni["bedrock"] == "bedrock-runtime.eu-west-1.amazonaws.com"
    assert sni["vertex"] == "europe-west4-aiplatform.googleapis.com"
    assert sni["vertex-adc"] == "aiplatform.googleapis.com"
    assert sni["gemini"] == "generativelanguage.googleapis.com"


@pytest.mark.parametrize(("base_url", "upstream_port", "number", "target"), [
    ("http://models.example.internal:8000/v1", None, 8000, 8000),
    ("http://models.example.internal/v1", None, 80, 80),
    ("http://models.example.internal:8000/v1", 9000, 8000, 9000),
])
def test_a_plain_http_upstream_has_no_tls(base_url: str, upstream_port: int | None, number: int,
                                          target: int) -> None:
    provider = Provider(name="private", api="openai_compatible", base_url=base_url, upstream_tls=False,
                        upstream_port=upstream_port)
    objects = objects_of((provider,), credentials="sidecar")
    assert {kind for kind, _ in objects} == {"AIProvider", "ServiceEntry"}  # no DestinationRule: no TLS
    entry = objects[("ServiceEntry", "private")]["spec"]
    assert entry["hosts"] == ["models.example.internal"]
    assert entry["ports"] == [{"number": number, "name": "http-private", "protocol": "HTTP", "targetPort": target}]
    assert loaded(objects[("AIProvider", "private")]) == provider


def test_an_in_mesh_server_gets_no_service_entry() -> None:
    provider = Provider(name="vllm", api="openai_compatible", base_url="http://vllm.models.svc.cluster.local:8000/v1")
    assert set(objects_of((provider,))) == {("AIProvider", "vllm")}


# =====================================================================================================
# 3. paths


AZURE = Provider(name="azure", api="azure_openai", base_url="http://contoso.openai.azure.com",
                 api_version="2024-10-21", deployments={"gpt-4o": "gpt4o-prod", "odd": "my dep/v2?x=1#y"},
                 credential=CredentialSource(env="AZURE_KEY"))
AZURE_V1 = Provider(name="azure-v1", api="azure_openai", base_url="http://contoso.openai.azure.com/",
                    api_version="v1", credential=CredentialSource(type="entra_id", env="AZURE_TOKEN"))
BEDROCK = Provider(name="bedrock", api="bedrock", region="us-east-1", credential=CredentialSource(type="aws"))
GEMINI = Provider(name="gemini", api="gemini", credential=CredentialSource(env="GEMINI_KEY"))
VERTEX = Provider(name="vertex", api="vertex", project="demo-project", location="us-central1",
                  credential=CredentialSource(type="google", file="/k/sa.json"))
COMPAT = Provider(name="compat", api="openai_compatible", base_url="http://vllm.models.svc.cluster.local:8000/serving/v1")


def path_of(provider: Provider, operation: str = "chat_completions", suffix: str = "/chat/completions", *,
            model: str = "gpt-4o", stream: bool = False, query: str = "") -> str:
    return provider_path(provider, operation, suffix, model=model, stream=stream, query=query)


def test_azure_deployment_paths_carry_the_api_version() -> None:
    assert path_of(AZURE, query="?ignored=1") == \
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    assert path_of(AZURE, "embeddings", "/embeddings") == \
        "/openai/deployments/gpt4o-prod/embeddings?api-version=2024-10-21"
    assert path_of(AZURE, "completions", "/completions") == \
        "/openai/deployments/gpt4o-prod/completions?api-version=2024-10-21"
    # An odd deployment name is one quoted path segment: it cannot add a segment, a query or a fragment.
    assert path_of(AZURE, model="odd") == \
        "/openai/deployments/my%20dep%2Fv2%3Fx%3D1%23y/chat/completions?api-version=2024-10-21"
    behind = AZURE.model_copy(update={"base_url": "http://gateway.example.com/azure"})
    assert path_of(behind).startswith("/azure/openai/deployments/gpt4o-prod/")


def test_azure_v1_and_responses_paths() -> None:
    assert path_of(AZURE_V1, model="gpt-4.1") == "/openai/v1/chat/completions"
    assert path_of(AZURE_V1, "responses", "/responses", model="gpt-4.1") == "/openai/v1/responses"
    assert path_of(AZURE, "responses", "/responses") == "/openai/responses?api-version=2024-10-21"
    preview = AZURE.model_copy(update={"api_version": "2025-03-01-preview"})
    assert path_of(preview, "responses", "/responses") == "/openai/responses?api-version=2025-03-01-preview"


def test_the_body_model_of_azure_deployment_paths_is_the_deployment() -> None:
    assert body_model(AZURE, "gpt-4o") == "gpt4o-prod"
    assert body_model(AZURE_V1, "gpt-4.1") == "gpt-4.1"
    assert body_model(BEDROCK, BEDROCK_MODEL) == BEDROCK_MODEL


def test_bedrock_paths_quote_the_model_id() -> None:
    assert path_of(BEDROCK, "converse", "", model=BEDROCK_MODEL, query="?x=1") == BEDROCK_PATH
    assert path_of(BEDROCK, "converse", "", model=BEDROCK_MODEL, stream=True) == BEDROCK_PATH + "-stream"
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-haiku"
    assert path_of(BEDROCK, "converse", "", model=arn) == (
        "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-3-haiku"
        "/converse")


def test_google_paths() -> None:
    assert path_of(GEMINI, "generate_content", "", model="gemini-2.5-flash", query="?key=leak") == \
        "/v1beta/models/gemini-2.5-flash:generateContent"
    assert path_of(GEMINI, "generate_content", "", model="gemini-2.5-flash", stream=True) == \
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert path_of(VERTEX, "generate_content", "", model="gemini-2.5-pro") == \
        "/v1/projects/demo-project/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent"
    assert path_of(VERTEX, "generate_content", "", model="gemini-2.5-pro", stream=True) == (
        "/v1/projects/demo-project/locations/us-central1/publishers/google/models/gemini-2.5-pro"
        ":streamGenerateContent?alt=sse")
    assert path_of(GEMINI, "generate_content", "", model="tuned/x y") == "/v1beta/models/tuned%2Fx%20y:generateContent"


def test_an_openai_compatible_server_keeps_its_base_path_and_the_callers_query() -> None:
    assert path_of(COMPAT, query="?api-version=1&x=y") == "/serving/v1/chat/completions?api-version=1&x=y"
    assert path_of(COMPAT, "embeddings", "/embeddings") == "/serving/v1/embeddings"


@pytest.mark.parametrize(("path", "operation", "wire"), [
    (BEDROCK_PATH, "converse", BEDROCK_FORMAT),
    (BEDROCK_PATH + "-stream", "converse_stream", BEDROCK_FORMAT),
    ("/v1beta/models/gemini-2.5-flash:generateContent", "generate_content", GEMINI_FORMAT),
    ("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", "stream_generate_content", GEMINI_FORMAT),
    ("/v1/projects/p/locations/global/publishers/google/models/g:generateContent", "generate_content", GEMINI_FORMAT),
    ("/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21", "chat_completions", None),
    ("/openai/v1/responses", "responses", None),
])
def test_each_provider_path_is_read_back_as_its_endpoint(path: str, operation: str, wire: str | None) -> None:
    """What a fallback attempt re-sent to the failed hop's path is governed as; never an AI endpoint by itself."""
    endpoint = relayed_endpoint(path)
    assert endpoint is not None and (endpoint.operation, endpoint.wire) == (operation, wire)
    assert endpoint.relayed_only == (wire is not None)
    assert classify(path) is None


def test_wire_formats_of_the_provider_apis() -> None:
    assert {api: wire_format(api) for api in ("azure_openai", "openai_compatible", "bedrock", "gemini", "vertex")} \
        == {"azure_openai": "openai", "openai_compatible": "openai", "bedrock": "bedrock", "gemini": "gemini",
            "vertex": "gemini"}
    assert native_api("azure_openai") == Api.OPENAI and native_api("bedrock") is None and native_api("vertex") is None


# =====================================================================================================
# 4. credentials


AWS_KEYS = AwsKeys("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
AWS_SESSION = AwsKeys("ASIAEXAMPLE", "secret/session", "FwoGZXIvYXdzEXAMPLETOKEN")


class FakeAws(AwsChain):
    """An AWS chain that answers from memory (or fails as told)."""

    def __init__(self, keys: AwsKeys | None = None, error: str | None = None) -> None:
        super().__init__()
        self._keys, self._error = keys, error

    async def keys(self) -> AwsKeys:
        if self._error is not None or self._keys is None:
            raise CredentialUnavailable(self._error or "no keys")
        return self._keys


class FakeGoogle(GoogleToken):
    def __init__(self, token: str | None = None, error: str | None = None) -> None:
        super().__init__()
        self._token, self._error = token, error

    async def token(self) -> str:
        if self._error is not None or self._token is None:
            raise CredentialUnavailable(self._error or "no token")
        return self._token


class FakeCloud(CloudAuth):
    """CloudAuth whose AWS and Google sources are fakes; remembers which profile or key file was asked for."""

    def __init__(self, aws: FakeAws | None = None, google: FakeGoogle | None = None) -> None:
        super().__init__()
        self._fake_aws = aws or FakeAws(AWS_KEYS)
        self._fake_google = google or FakeGoogle("ya29.token")
        self.asked: list[tuple[str, str | None]] = []

    def aws(self, profile: str | None = None) -> AwsChain:
        self.asked.append(("aws", profile))
        return self._fake_aws

    def google(self, key_file: str | None = None) -> GoogleToken:
        self.asked.append(("google", key_file))
        return self._fake_google


KEYS = {"AZURE_KEY": "az-key", "AZURE_TOKEN": "eyJ.entra.token", "GEMINI_KEY": "g-key", "ANTHROPIC_KEY": "sk-ant",
        "OPENAI_KEY": "sk-openai"}


def auth(provider: Provider, *, cloud: CloudAuth | None = None, env: dict[str, str] | None = None,
         path: str = "/p", body: bytes = b"{}", headers: dict[str, str] | None = None
         ) -> list[tuple[str, str]] | ApiError:
    store = CredentialStore(environ=KEYS if env is None else env)
    return asyncio.run(provider_auth(provider, store, cloud or FakeCloud(), path=path, body=body,
                                     request_headers=headers or {}))


def test_azure_takes_an_api_key_or_an_entra_id_bearer(tmp_path: Path) -> None:
    assert auth(AZURE) == [("api-key", "az-key")]
    assert auth(AZURE_V1) == [("authorization", "Bearer eyJ.entra.token")]
    token = tmp_path / "token"
    token.write_text("eyJ.from.file\n")
    from_file = AZURE_V1.model_copy(update={"credential": CredentialSource(type="entra_id", file=str(token))})
    assert auth(from_file) == [("authorization", "Bearer eyJ.from.file")]


def test_gemini_takes_its_key_header_and_vertex_a_google_bearer() -> None:
    assert auth(GEMINI) == [("x-goog-api-key", "g-key")]
    cloud = FakeCloud(google=FakeGoogle("ya29.vertex"))
    assert auth(VERTEX, cloud=cloud) == [("authorization", "Bearer ya29.vertex")]
    adc = VERTEX.model_copy(update={"credential": CredentialSource(type="google")})
    assert auth(adc, cloud=cloud) == [("authorization", "Bearer ya29.vertex")]
    assert cloud.asked == [("google", "/k/sa.json"), ("google", None)]  # the key file, then ADC


def test_openai_shaped_providers_take_a_bearer_and_a_keyless_server_nothing() -> None:
    openai = Provider(name="openai", api="openai", base_url="http://api.openai.com/v1",
                      credential=CredentialSource(env="OPENAI_KEY"))
    assert auth(openai) == [("authorization", "Bearer sk-openai")]
    assert auth(COMPAT) == []
    keyed = COMPAT.model_copy(update={"credential": CredentialSource(env="OPENAI_KEY")})
    assert auth(keyed) == [("authorization", "Bearer sk-openai")]


def test_anthropic_adds_its_version_only_when_the_caller_sent_none() -> None:
    claude = Provider(name="claude", api="anthropic", base_url="http://api.anthropic.com/v1",
                      credential=CredentialSource(env="ANTHROPIC_KEY"), anthropic_version="2024-10-22")
    assert auth(claude) == [("x-api-key", "sk-ant"), ("anthropic-version", "2024-10-22")]
    assert auth(claude, headers={"anthropic-version": "2023-06-01"}) == [("x-api-key", "sk-ant")]
    # The version is Anthropic's alone.
    assert auth(GEMINI) == [("x-goog-api-key", "g-key")]


def botocore_authorization(keys: AwsKeys, url: str, body: bytes, stamp: str, region: str,
                           monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """botocore's SigV4Auth.add_auth over the same request, its clock set to ``stamp``."""
    moment = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ")
    with monkeypatch.context() as patch:
        patch.setattr(botocore.auth, "get_current_datetime", lambda: moment)
        request = AWSRequest(method="POST", url=url, data=body)
        SigV4Auth(Credentials(keys.access_key, keys.secret_key, keys.token), "bedrock", region).add_auth(request)
    return {name.lower(): str(value) for name, value in request.headers.items()}


@pytest.mark.parametrize("keys", [AWS_KEYS, AWS_SESSION], ids=["long-term", "session"])
def test_bedrock_is_signed_as_botocore_signs(keys: AwsKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    body = b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}'
    provider = BEDROCK.model_copy(update={"credential": CredentialSource(type="aws", profile="prod")})
    cloud = FakeCloud(aws=FakeAws(keys))
    before = datetime.now(UTC).replace(microsecond=0)
    headers = auth(provider, cloud=cloud, path=BEDROCK_PATH, body=body)
    assert isinstance(headers, list)
    assert cloud.asked == [("aws", "prod")]
    ours = dict(headers)
    assert set(ours) == {"authorization", "x-amz-date"} | ({"x-amz-security-token"} if keys.token else set())
    stamp = ours["x-amz-date"]
    signed_at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert before <= signed_at <= datetime.now(UTC)
    url = "http://bedrock-runtime.us-east-1.amazonaws.com" + BEDROCK_PATH
    theirs = botocore_authorization(keys, url, body, stamp, "us-east-1", monkeypatch)
    assert ours["authorization"] == theirs["authorization"]
    assert ours["authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={keys.access_key}/{stamp[:8]}/us-east-1/bedrock/aws4_request, ")
    if keys.token:
        assert ours["x-amz-security-token"] == keys.token == theirs["x-amz-security-token"]
    # The signature covers the body and the path: either changed, it no longer verifies.
    other = botocore_authorization(keys, url, body.replace(b"hi", b"ho"), stamp, "us-east-1", monkeypatch)
    assert other["authorization"] != ours["authorization"]
    stream = botocore_authorization(keys, url + "-stream", body, stamp, "us-east-1", monkeypatch)
    assert stream["authorization"] != ours["authorization"]


def assert_unavailable(result: list[tuple[str, str]] | ApiError, provider: str) -> None:
    assert isinstance(result, ApiError), result
    assert (result.kind, result.kind.status, result.code) == (ErrorKind.UNAVAILABLE, 503, "credential_unavailable")
    assert f"provider {provider!r}" in result.message
    rendered = orjson.loads(result.render(Api.OPENAI))["error"]
    assert (rendered["code"], rendered["type"]) == ("credential_unavailable", "server_error")
    assert orjson.loads(result.render(Api.ANTHROPIC))["error"]["type"] == "overloaded_error"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "extproc.core.provider_request" and r.levelno == logging.WARNING]


@pytest.mark.parametrize(("provider", "reason"), [
    (AZURE, "the variable AZURE_KEY is missing or empty"),
    (AZURE_V1, "the variable AZURE_TOKEN is missing or empty"),
    (GEMINI, "the variable GEMINI_KEY is missing or empty"),
    (GEMINI.model_copy(update={"credential": CredentialSource(file="/nonexistent/gemini-key")}),
     "the file /nonexistent/gemini-key is missing or empty"),
])
def test_a_missing_key_is_a_503_naming_the_provider_and_logged(provider: Provider, reason: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="extproc.core.provider_request"):
        result = auth(provider, env={})
    assert_unavailable(result, provider.name)
    assert warnings_of(caplog) == [f"the credential of provider {provider.name!r} cannot be had: {reason}"]


@pytest.mark.parametrize(("provider", "cloud"), [
    (BEDROCK, FakeCloud(aws=FakeAws(error="no AWS credentials found in the environment"))),
    (VERTEX, FakeCloud(google=FakeGoogle(error="the Google token endpoint refused to issue a token"))),
], ids=["bedrock", "vertex"])
def test_a_cloud_credential_that_cannot_be_had_is_the_same_503(provider: Provider, cloud: FakeCloud,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="extproc.core.provider_request"):
        result = auth(provider, cloud=cloud)
    assert_unavailable(result, provider.name)
    (logged,) = warnings_of(caplog)
    assert logged.startswith(f"the credential of provider {provider.name!r} cannot be had: ")
    assert ("no AWS credentials found" if provider.api == "bedrock" else "refused to issue a token") in logged


def test_credential_headers_put_the_extra_headers_after_the_credential() -> None:
    store = CredentialStore(environ=KEYS)
    result = asyncio.run(credential_headers(GEMINI, store, FakeCloud(), path="/p", body=b"", extra=[("x-a", "1")]))
    assert result == [("x-goog-api-key", "g-key"), ("x-a", "1")]
    assert asyncio.run(credential_headers(COMPAT, store, FakeCloud(), path="/p", body=b"",
                                          extra=[("x-a", "1")])) == [("x-a", "1")]


# =====================================================================================================
# 5. forwarding through the decision


DECIDER_POLICY = f"""\
mesh:
  unknown_paths: deny
providers:
- {{name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {{env: OPENAI_KEY}}}}
- {{name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {{env: ANTHROPIC_KEY}}}}
- {{name: bedrock, api: bedrock, region: eu-west-1, credential: {{type: aws}}}}
- {{name: gemini, api: gemini, credential: {{env: GEMINI_KEY}}}}
- {{name: vertex, api: vertex, project: demo-project, location: europe-west4, credential: {{type: google}}}}
- name: azure
  api: azure_openai
  base_url: http://contoso.openai.azure.com
  api_version: 2024-10-21
  deployments: {{gpt-4o: gpt4o-prod}}
  credential: {{env: AZURE_KEY}}
- {{name: compat, api: openai_compatible, base_url: http://vllm.models.svc.cluster.local:8000/v1}}
---
service: order-service
ai_proxy:
  models:
  - {{name: br, provider: bedrock, model: "{BEDROCK_MODEL}"}}
  - {{name: gm, provider: gemini, model: gemini-2.5-flash}}
  - {{name: vx, provider: vertex, model: gemini-2.5-pro}}
  - {{name: az, provider: azure, model: gpt-4o}}
  - {{name: cp, provider: compat, model: llama-3.1-8b}}
  - name: chain
    provider: bedrock
    model: "{BEDROCK_MODEL}"
    fallback: [gemini/gemini-2.5-flash, azure/gpt-4o, compat/llama-3.1-8b]
"""
CHAT = {"model": "br", "max_tokens": 50, "messages": [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": "hi"}]}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[AwsKeys]:
    """The AWS chain's environment keys, and nothing else it could find."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_CONTAINER_AUTHORIZATION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_SESSION.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SESSION.secret_key)
    monkeypatch.setenv("AWS_SESSION_TOKEN", AWS_SESSION.token or "")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    yield AWS_SESSION


def make_decider(tmp_path: Path, cloud: CloudAuth | None = None) -> Decider:
    (tmp_path / "policy.yaml").write_text(DECIDER_POLICY)
    policy = load_policy([tmp_path])
    return Decider(Runtime(lambda: policy, CredentialStore(environ=KEYS), QuotaEngine(QuotaSettings()),
                           ResponseCache(CacheSettings()), signer=Signer(SIGNING_KEY), cloud=cloud))


def sent(decision: Forward | LocalReply) -> dict[str, Any]:
    assert isinstance(decision, Forward) and decision.body is not None, decision
    assert headers_of(decision)["content-length"] == str(len(decision.body))
    body: dict[str, Any] = orjson.loads(decision.body)
    return body


def test_an_openai_call_to_a_bedrock_model_is_a_signed_converse_call(tmp_path: Path, aws_env: AwsKeys,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    decider = make_decider(tmp_path)  # the real CloudAuth: the AWS chain finds the environment's keys
    decision = decide(decider, CHAT, headers={"authorization": "Bearer app-key", "x-api-key": "app-key",
                                              "x-amz-security-token": "forged"})
    headers = headers_of(decision)
    assert headers[":path"] == BEDROCK_PATH
    assert headers[":authority"] == "bedrock-runtime.eu-west-1.amazonaws.com"
    assert headers[USAGE_HEADER] == "translate"
    assert headers["x-amz-security-token"] == aws_env.token
    body = sent(decision)
    assert "model" not in body and "stream" not in body
    assert body["messages"] == [{"role": "user", "content": [{"text": "hi"}]}]
    assert body["system"] == [{"text": "be brief"}]
    assert body["inferenceConfig"]["maxTokens"] == 50
    # Signed by the AWS chain's keys over exactly the body and path sent.
    assert isinstance(decision, Forward) and decision.body is not None
    theirs = botocore_authorization(aws_env, "http://bedrock-runtime.eu-west-1.amazonaws.com" + BEDROCK_PATH,
                                    decision.body, headers["x-amz-date"], "eu-west-1", monkeypatch)
    assert headers["authorization"] == theirs["authorization"]
    assert headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={aws_env.access_key}/")
    # The caller's own credentials never reach AWS: ours replace authorization and the token, the rest go.
    assert "x-api-key" in decision.remove_headers and "api-key" in decision.remove_headers
    assert "authorization" not in decision.remove_headers and "x-amz-security-token" not in decision.remove_headers
    settle = settle_json(decider, decision)
    assert (settle["api"], settle["ca"], settle["p"], settle["m"]) == ("bedrock", "openai", "bedrock", BEDROCK_MODEL)


def test_a_streamed_call_to_bedrock_uses_converse_stream(tmp_path: Path, aws_env: AwsKeys) -> None:
    decision = decide(make_decider(tmp_path), {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    headers = headers_of(decision)
    assert headers[":path"] == BEDROCK_PATH + "-stream"
    body = sent(decision)
    assert "stream" not in body and "stream_options" not in body
    assert headers[USAGE_HEADER] == "translate"


def test_an_anthropic_caller_reaches_gemini(tmp_path: Path) -> None:
    decider = make_decider(tmp_path)
    call = {"model": "gm", "max_tokens": 30, "system": "be brief", "messages": [{"role": "user", "content": "hi"}]}
    decision = decide(decider, call, path="/v1/messages",
                      headers={"x-api-key": "app", "anthropic-version": "2023-06-01"})
    headers = headers_of(decision)
    assert headers[":path"] == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert headers[":authority"] == "generativelanguage.googleapis.com"
    assert headers["x-goog-api-key"] == "g-key" and headers[USAGE_HEADER] == "translate"
    assert isinstance(decision, Forward)
    assert {"x-api-key", "authorization"} <= set(decision.remove_headers)
    assert "anthropic-version" not in decision.remove_headers  # the Anthropic caller's error format needs it
    body = sent(decision)
    assert body["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]
    assert body["systemInstruction"]["parts"] == [{"text": "be brief"}]
    assert body["generationConfig"]["maxOutputTokens"] == 30 and "model" not in body
    settle = settle_json(decider, decision)
    assert (settle["api"], settle["ca"]) == ("gemini", "anthropic")
    streamed_call = decide(decider, {**call, "stream": True}, path="/v1/messages")
    assert headers_of(streamed_call)[":path"] == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"


def test_an_openai_caller_reaches_vertex_with_a_google_token(tmp_path: Path) -> None:
    cloud = FakeCloud(google=FakeGoogle("ya29.vertex"))
    decision = decide(make_decider(tmp_path, cloud), {**CHAT, "model": "vx"})
    headers = headers_of(decision)
    assert headers[":authority"] == "europe-west4-aiplatform.googleapis.com"
    assert headers[":path"] == ("/v1/projects/demo-project/locations/europe-west4/publishers/google/models/"
                                "gemini-2.5-pro:generateContent")
    assert headers["authorization"] == "Bearer ya29.vertex"
    assert cloud.asked == [("google", None)]
    assert sent(decision)["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]


def test_a_responses_caller_reaches_an_openai_compatible_server_as_chat(tmp_path: Path) -> None:
    decider = make_decider(tmp_path)
    decision = decide(decider, {"model": "cp", "input": "hi", "instructions": "be brief", "max_output_tokens": 20},
                      path="/v1/responses?trace=1", headers={"authorization": "Bearer app"})
    headers = headers_of(decision)
    assert headers[":authority"] == "vllm.models.svc.cluster.local:8000"
    assert headers[":path"] == "/v1/chat/completions?trace=1"
    assert headers[USAGE_HEADER] == "translate"
    assert "authorization" not in headers  # a keyless in-mesh server
    assert isinstance(decision, Forward) and "authorization" in decision.remove_headers
    body = sent(decision)
    assert body["model"] == "llama-3.1-8b"
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert body["messages"][-1]["role"] == "user" and "input" not in body
    settle = settle_json(decider, decision)
    assert (settle["api"], settle["ca"]) == ("openai", "openai_responses")


def test_an_openai_caller_reaches_azure_with_its_api_key(tmp_path: Path) -> None:
    decision = decide(make_decider(tmp_path), {**CHAT, "model": "az"}, path="/v1/chat/completions?foo=bar",
                      headers={"authorization": "Bearer app", "api-key": "app"})
    headers = headers_of(decision)
    assert headers[":authority"] == "contoso.openai.azure.com"
    assert headers[":path"] == "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    assert headers["api-key"] == "az-key"
    assert USAGE_HEADER not in headers  # the same API: nothing to translate
    assert isinstance(decision, Forward)
    assert "authorization" in decision.remove_headers and "api-key" not in decision.remove_headers


def test_a_missing_key_refuses_the_call_in_the_callers_format(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    (tmp_path / "policy.yaml").write_text(DECIDER_POLICY)
    policy = load_policy([tmp_path])
    decider = Decider(Runtime(lambda: policy, CredentialStore(environ={}), QuotaEngine(QuotaSettings()),
                              ResponseCache(CacheSettings()), signer=Signer(SIGNING_KEY),
                              cloud=FakeCloud(aws=FakeAws(error="no AWS credentials found"))))
    with caplog.at_level(logging.WARNING, logger="extproc.core.provider_request"):
        status, body = error_of(decide(decider, CHAT))
        anthropic_status, anthropic_body = error_of(decide(decider, {"model": "gm", "max_tokens": 5, "messages": [
            {"role": "user", "content": "hi"}]}, path="/v1/messages"))
    assert status == 503 and body["error"]["code"] == "credential_unavailable"  # type: ignore[index]
    assert "'bedrock'" in body["error"]["message"]  # type: ignore[index]
    assert anthropic_status == 503 and anthropic_body["type"] == "error"
    assert "'gemini'" in anthropic_body["error"]["message"]  # type: ignore[index]
    assert any("no AWS credentials found" in m for m in warnings_of(caplog))
    assert any("GEMINI_KEY is missing" in m for m in warnings_of(caplog))


def test_a_chain_of_the_new_providers_is_usable_to_its_end(tmp_path: Path, aws_env: AwsKeys) -> None:
    decider = make_decider(tmp_path)
    decision = decide(decider, {**CHAT, "model": "chain"})
    assert isinstance(decision, Forward)
    assert headers_of(decision)[FALLBACK_HEADER] == FALLBACK_MARKER
    state = fallback.HopState.decode(decision.metadata["fallback_state"], decider.runtime.signer)
    assert state is not None and state.limit == 4 and state.caller_api == "openai"


def target(provider: Provider, model: str = "m") -> Target:
    return Target(provider, model, None)


OPENAI = Provider(name="openai", api="openai", base_url="http://api.openai.com/v1")
CLAUDE = Provider(name="claude", api="anthropic", base_url="http://api.anthropic.com/v1")


@pytest.mark.parametrize(("path", "data", "chain", "usable"), [
    ("/v1/chat/completions", {}, [BEDROCK, GEMINI, VERTEX, AZURE, COMPAT, CLAUDE], 6),
    ("/v1/messages", {}, [GEMINI, BEDROCK, AZURE_V1, OPENAI], 4),
    # The Responses API: Azure serves it itself; the others get chat, through the canonical form.
    ("/v1/responses", {}, [AZURE_V1, BEDROCK, COMPAT], 3),
    ("/v1/responses", {}, [BEDROCK, AZURE, GEMINI], 3),
    # A built-in tool runs at OpenAI-shaped Responses providers only: the chain stops at the first other one.
    ("/v1/responses", {"tools": [{"type": "web_search"}]}, [AZURE, OPENAI, BEDROCK, AZURE_V1], 2),
    ("/v1/responses", {"previous_response_id": "resp_1"}, [AZURE, OPENAI], 1),
    # Operations only the caller's API has: never sent to Bedrock or Google.
    ("/v1/embeddings", {}, [AZURE, COMPAT, BEDROCK, OPENAI], 2),
    ("/v1/embeddings", {}, [GEMINI, OPENAI], 1),
    ("/v1/messages/count_tokens", {}, [CLAUDE, VERTEX], 1),
])
def test_usable_hops_of_chains_mixing_the_new_providers(path: str, data: dict[str, object], chain: list[Provider],
                                                        usable: int) -> None:
    endpoint = ENDPOINTS[path]
    assert usable_hops(endpoint, [target(p) for p in chain], data) == usable


def test_a_relayed_bedrock_body_reaches_the_next_hop() -> None:
    """A fallback attempt re-sent to the Bedrock path carries a Converse body: Gemini and Azure take it."""
    endpoint = relayed_endpoint(BEDROCK_PATH + "-stream")
    assert endpoint is not None
    assert streamed({}, endpoint) and not streamed({}, ENDPOINTS["/v1/chat/completions"])
    assert provider_form(endpoint, "gemini") == ("generate_content", GEMINI_FORMAT)
    assert provider_form(endpoint, "azure_openai") == ("chat_completions", "openai")
    assert provider_form(endpoint, "anthropic") == ("messages", "anthropic")
    assert translatable(BEDROCK_FORMAT, GEMINI_FORMAT) and not translatable(BEDROCK_FORMAT, "openai_responses")
    assert usable_hops(endpoint, [target(BEDROCK), target(GEMINI), target(AZURE)], {}) == 3


@pytest.mark.parametrize("path", [BEDROCK_PATH, BEDROCK_PATH + "-stream",
                                  "/v1beta/models/gemini-2.5-flash:generateContent"])
def test_a_provider_path_without_a_fallback_header_is_not_an_ai_endpoint(tmp_path: Path, path: str) -> None:
    decider = make_decider(tmp_path)
    result = decider.on_headers(request(path), end_of_stream=False)
    assert not isinstance(result, Exchange)  # never governed as an AI call: no routing, no credential
    status, body = error_of(result)  # type: ignore[arg-type]
    assert (status, body["error"]["code"]) == (403, "path_not_allowed")  # type: ignore[index]
    assert "is not an AI endpoint governed here" in body["error"]["message"]  # type: ignore[index]


def fallback_refusals(decider: Decider) -> float:
    value = decider.runtime.metrics.registry.get_sample_value("ai_extproc_tokens_refused_total",
                                                              {"kind": "fallback"})
    return value or 0.0


@pytest.mark.parametrize("path", [BEDROCK_PATH, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"])
def test_a_provider_path_with_a_forged_fallback_header_is_refused(tmp_path: Path, path: str,
                                                                  aws_env: AwsKeys) -> None:
    decider = make_decider(tmp_path)
    converse = {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}
    # A forged state, and a genuine hop-0 state that never went through the relay (not "relayed").
    first = decide(decider, {**CHAT, "model": "chain"})
    assert isinstance(first, Forward)
    for token in ("forged", first.metadata["fallback_state"]):
        before = fallback_refusals(decider)
        result = decider.on_headers(request(path, headers={FALLBACK_HEADER: token}), end_of_stream=False)
        assert isinstance(result, Exchange) and result.endpoint.relayed_only
        decision = asyncio.run(result.on_body(orjson.dumps(converse)))
        assert isinstance(decision, LocalReply), decision  # never forwarded
        status, body = error_of(decision)
        # A provider's own path has no caller format of its own: refused in Anthropic's envelope.
        assert status == 403 and body["type"] == "error"
        assert body["error"]["type"] == "permission_error"  # type: ignore[index]
        assert "governed only as a fallback attempt" in body["error"]["message"]  # type: ignore[index]
        assert fallback_refusals(decider) == before + 1


# =====================================================================================================
# 6. the response side


def runtime_for(tmp_path: Path) -> Runtime:
    (tmp_path / "policy.yaml").write_text(DECIDER_POLICY)
    policy = load_policy([tmp_path])
    return Runtime(lambda: policy, CredentialStore(environ=KEYS), QuotaEngine(QuotaSettings()),
                   ResponseCache(CacheSettings()), signer=Signer(SIGNING_KEY), cloud=FakeCloud())


def settle_info(api: str, caller: str, *, model: str = BEDROCK_MODEL, requested: str = "br",
                include_usage: bool = False, nonce: str = "nonce-1") -> SettleInfo:
    provider = {"bedrock": "bedrock", "gemini": "gemini", "anthropic": "claude", "openai": "openai"}[api]
    return SettleInfo(None, api, 7, provider, model, operation="chat_completions", route=requested,
                      service="order-service", namespace="shop", caller_api=caller, include_usage=include_usage,
                      requested=requested, nonce=nonce)


def run_settlement(settlement: Settlement, status: int, content_type: str, chunks: list[bytes]) -> bytes:
    settlement.on_headers(status, content_type)
    out = b"".join(settlement.feed(chunk) for chunk in chunks) + settlement.flush()
    asyncio.run(settlement.settle(True))
    return out


def sse_data(stream: bytes) -> list[str]:
    text = stream.decode()
    assert text.endswith("\n\n")
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


def bedrock_event(name: str, payload: dict[str, Any]) -> bytes:
    return encode({":event-type": name, ":content-type": "application/json", ":message-type": "event"},
                  orjson.dumps({**payload, "p": "abcdefghij"}))


BEDROCK_ANSWER = {"output": {"message": {"role": "assistant", "content": [{"text": "Hello there"}]}},
                  "stopReason": "end_turn", "usage": {"inputTokens": 12, "outputTokens": 3, "totalTokens": 15},
                  "metrics": {"latencyMs": 120}}
BEDROCK_STREAM = [
    bedrock_event("messageStart", {"role": "assistant"}),
    bedrock_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hel"}}),
    bedrock_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "lo ✓"}}),
    bedrock_event("contentBlockStop", {"contentBlockIndex": 0}),
    bedrock_event("messageStop", {"stopReason": "end_turn"}),
    bedrock_event("metadata", {"usage": {"inputTokens": 21, "outputTokens": 7, "totalTokens": 28},
                               "metrics": {"latencyMs": 300}}),
]


def test_the_translation_steps_of_each_pair() -> None:
    assert (settle_info("bedrock", "openai").decoding, settle_info("bedrock", "openai").encoding) == (True, True)
    assert (settle_info("gemini", "anthropic").decoding, settle_info("gemini", "anthropic").encoding) == (True, False)
    assert (settle_info("anthropic", "openai").decoding, settle_info("anthropic", "openai").encoding) == (False, True)
    assert not settle_info("bedrock", "bedrock").translating


def test_a_bedrock_json_answer_reaches_an_openai_caller(tmp_path: Path) -> None:
    settlement = Settlement(settle_info("bedrock", "openai"), runtime_for(tmp_path), strip=False)
    body = orjson.dumps(BEDROCK_ANSWER)
    out = run_settlement(settlement, 200, "application/json", [body[:10], body[10:]])
    answer = orjson.loads(out)
    assert answer["object"] == "chat.completion" and answer["model"] == "br"
    assert answer["choices"][0]["message"]["content"] == "Hello there"
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (12, 3)
    assert settlement.response_headers() == ([], ["content-length"])  # still JSON, of another length
    usage = settlement.settled
    assert usage is not None and usage.reported
    assert (usage.input_tokens, usage.output_tokens) == (12, 3)
    assert not settlement.failed


@pytest.mark.parametrize("cut", [1, 7, 1000], ids=["bytewise", "small-chunks", "whole"])
def test_a_bedrock_event_stream_reaches_an_openai_caller_as_sse(tmp_path: Path, cut: int) -> None:
    settlement = Settlement(settle_info("bedrock", "openai", include_usage=True), runtime_for(tmp_path), strip=False)
    data = b"".join(BEDROCK_STREAM)
    out = run_settlement(settlement, 200, "application/vnd.amazon.eventstream",
                         [data[i:i + cut] for i in range(0, len(data), cut)])
    assert settlement.response_headers() == ([("content-type", "text/event-stream")], ["content-length"])
    events = sse_data(out)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello ✓"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["prompt_tokens"] == 21 and chunks[-1]["usage"]["completion_tokens"] == 7
    usage = settlement.settled
    assert usage is not None and usage.reported and (usage.input_tokens, usage.output_tokens) == (21, 7)
    assert not settlement.failed


def test_a_bedrock_stream_without_the_usage_chunk_asked_still_settles_on_its_counts(tmp_path: Path) -> None:
    settlement = Settlement(settle_info("bedrock", "openai"), runtime_for(tmp_path), strip=False)
    out = run_settlement(settlement, 200, "application/vnd.amazon.eventstream", BEDROCK_STREAM)
    assert all(orjson.loads(e).get("usage") is None for e in sse_data(out)[:-1])
    assert settlement.settled is not None
    assert (settlement.settled.input_tokens, settlement.settled.output_tokens) == (21, 7)


def gemini_chunk(parts: list[dict[str, Any]], *, finish: str | None = None, **fields: Any) -> bytes:
    candidate: dict[str, Any] = {"index": 0, "content": {"role": "model", "parts": parts}}
    if finish is not None:
        candidate["finishReason"] = finish
    return b"data: " + orjson.dumps({"candidates": [candidate], "modelVersion": "gemini-2.5-flash", **fields}) + \
        b"\r\n\r\n"


def test_a_gemini_sse_answer_reaches_an_anthropic_caller(tmp_path: Path) -> None:
    settlement = Settlement(settle_info("gemini", "anthropic", model="gemini-2.5-flash", requested="gm"),
                            runtime_for(tmp_path), strip=False)
    stream = [gemini_chunk([{"text": "Hi "}], usageMetadata={"promptTokenCount": 9, "totalTokenCount": 9}),
              gemini_chunk([{"text": "there"}], finish="STOP",
                           usageMetadata={"promptTokenCount": 9, "candidatesTokenCount": 4, "totalTokenCount": 13})]
    out = run_settlement(settlement, 200, "text/event-stream", stream)
    assert settlement.response_headers() == ([], ["content-length"])  # SSE already
    lines = out.decode().splitlines()
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    events = [orjson.loads(e) for e in sse_data(out)]
    assert events[0]["message"]["model"] == "gm"
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    assert text == "Hi there"
    final = next(e for e in events if e["type"] == "message_delta")
    assert final["delta"]["stop_reason"] == "end_turn" and final["usage"]["output_tokens"] == 4
    usage = settlement.settled
    assert usage is not None and usage.reported and (usage.input_tokens, usage.output_tokens) == (9, 4)


def test_a_gemini_json_answer_reaches_an_anthropic_caller(tmp_path: Path) -> None:
    settlement = Settlement(settle_info("gemini", "anthropic", model="gemini-2.5-flash", requested="gm"),
                            runtime_for(tmp_path), strip=False)
    answer = {"candidates": [{"index": 0, "content": {"role": "model", "parts": [{"text": "Hi"}]},
                              "finishReason": "STOP"}],
              "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1, "totalTokenCount": 6}}
    out = orjson.loads(run_settlement(settlement, 200, "application/json", [orjson.dumps(answer)]))
    assert out["type"] == "message" and out["content"] == [{"type": "text", "text": "Hi"}]
    assert out["usage"]["input_tokens"] == 5 and out["usage"]["output_tokens"] == 1
    assert settlement.settled is not None and (settlement.settled.input_tokens, settlement.settled.output_tokens) \
        == (5, 1)


@pytest.mark.parametrize(("api", "caller", "content_type", "body"), [
    ("bedrock", "openai", "application/json", b'{"output": {"message": 5}}'),
    ("bedrock", "openai", "application/json", b"not json"),
    ("gemini", "anthropic", "application/json", b"[1]"),
    ("bedrock", "openai", "application/vnd.amazon.eventstream", BEDROCK_STREAM[0] + b"\x00" * 16),
    ("gemini", "anthropic", "text/event-stream", b"data: not json\r\n\r\n"),
])
def test_an_untranslatable_answer_fails_the_settlement(tmp_path: Path, api: str, caller: str, content_type: str,
                                                       body: bytes) -> None:
    settlement = Settlement(settle_info(api, caller), runtime_for(tmp_path), strip=False)
    out = run_settlement(settlement, 200, content_type, [body])
    assert settlement.failed
    assert out  # the caller is told something, never a silent empty answer
    usage = settlement.settled
    assert usage is not None and not usage.reported


def test_an_untranslatable_stream_ends_with_an_error_event_in_the_callers_format(tmp_path: Path) -> None:
    settlement = Settlement(settle_info("bedrock", "openai"), runtime_for(tmp_path), strip=False)
    out = run_settlement(settlement, 200, "application/vnd.amazon.eventstream", [BEDROCK_STREAM[0] + b"\x00" * 16])
    last = orjson.loads(sse_data(out)[-1])
    assert last["error"]["type"] == "server_error"


@pytest.mark.parametrize(("api", "body"), [("bedrock", b'{"output": {"message": 5}}'), ("bedrock", b"not json"),
                                           ("gemini", b"[1]")])
def test_an_untranslatable_json_answer_reaches_an_openai_caller_as_an_error(tmp_path: Path, api: str,
                                                                            body: bytes) -> None:
    settlement = Settlement(settle_info(api, "openai"), runtime_for(tmp_path), strip=False)
    out = orjson.loads(run_settlement(settlement, 200, "application/json", [body]))
    assert settlement.failed
    # The encoder's own ending, not an encoding of the decoder's Anthropic error object (which read as an
    # empty, successful chat.completion before the fix).
    assert out == orjson.loads(openai_to_anthropic.untranslatable_body())
    assert out["error"]["code"] == "provider_response_untranslatable"


def test_an_untranslatable_json_answer_reaches_a_responses_caller_as_an_error(tmp_path: Path) -> None:
    settlement = Settlement(settle_info("bedrock", "openai_responses"), runtime_for(tmp_path), strip=False)
    out = orjson.loads(run_settlement(settlement, 200, "application/json", [b"not json"]))
    assert settlement.failed
    assert out.get("status") != "completed"  # before the fix: a "completed" response with an empty output
    assert (out.get("error") or {}).get("code") == "provider_response_untranslatable"


def test_a_provider_error_is_passed_on_not_failed(tmp_path: Path) -> None:
    settlement = Settlement(settle_info("bedrock", "openai"), runtime_for(tmp_path), strip=False)
    out = orjson.loads(run_settlement(settlement, 400, "application/json",
                                      [b'{"message": "Malformed input request: extraneous key"}']))
    assert "error" in out and "Malformed input request" in out["error"]["message"]
    assert not settlement.failed
    assert settlement.settled is not None and settlement.settled.input_tokens == 0


def test_the_decisions_settlement_reads_the_bedrock_answer(tmp_path: Path, aws_env: AwsKeys) -> None:
    """End to end in the processor: the settlement sealed by the decision, opened by the usage stream."""
    decider = make_decider(tmp_path)
    decision = decide(decider, {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert isinstance(decision, Forward)
    info = SettleInfo.unseal(decision.metadata["settle"], decider.runtime.signer)
    assert info is not None and info.decoding and info.encoding and info.include_usage
    settlement = Settlement(info, decider.runtime, strip=False)
    out = run_settlement(settlement, 200, "application/vnd.amazon.eventstream", BEDROCK_STREAM)
    assert settlement.response_headers()[0] == [("content-type", "text/event-stream")]
    chunks = [orjson.loads(e) for e in sse_data(out)[:-1]]
    assert chunks[0]["model"] == "br"
    assert chunks[-1]["usage"]["total_tokens"] == 28
    assert settlement.settled is not None and settlement.settled.output_tokens == 7


def test_the_egress_gateway_signs_bedrock_over_the_body_the_grant_covers(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Gateway mode: the decision hands out a grant, and the gateway's credential port signs the very
    body and path the grant names (the signature verifies with botocore); another body is refused."""
    from extproc.core.grants import Grant, body_digest, redeem
    from extproc.core.inflight import MemoryInFlight
    from extproc.policy.compiled import compile_policy_set
    from extproc.policy.model import MeshSettings

    signer = Signer(b"gateway-test-key-0123456789abcdef")
    policy = compile_policy_set(mesh=MeshSettings(), providers=[BEDROCK], services=[], version="t", prices=[])
    body = b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}'
    grant = Grant(BEDROCK.name, BEDROCK.authority, "shop", "order-service", "order-sa", "n-1", body_digest(body),
                  "POST", BEDROCK_PATH).encode(signer, 60)
    store, cloud = MemoryInFlight(), FakeCloud(aws=FakeAws(AWS_KEYS))

    def presented(sent: bytes) -> list[tuple[str, str]] | ApiError:
        return asyncio.run(redeem(grant, method="POST", path=BEDROCK_PATH, authority=BEDROCK.authority, body=sent,
                                  peer=None, signer=signer, inflight=store, credentials=CredentialStore(),
                                  policy=policy, cloud=cloud))

    refused = presented(body.replace(b"hi", b"ho"))
    assert isinstance(refused, ApiError) and refused.code == "grant_wrong_body"
    headers = presented(body)
    assert isinstance(headers, list), headers
    ours = dict(headers)
    url = "http://bedrock-runtime.us-east-1.amazonaws.com" + BEDROCK_PATH
    theirs = botocore_authorization(AWS_KEYS, url, body, ours["x-amz-date"], "us-east-1", monkeypatch)
    assert ours["authorization"] == theirs["authorization"]
    again = presented(body)
    assert isinstance(again, ApiError) and again.code == "grant_replayed"


def test_a_bedrock_event_stream_is_recorded_as_streamed(tmp_path: Path) -> None:
    """The call record (usage event, access log) and the TTFT metric count Bedrock's binary event stream
    as a stream, like SSE."""
    runtime = runtime_for(tmp_path)
    records: list[Any] = []
    runtime.record = records.append  # type: ignore[method-assign]
    settlement = Settlement(settle_info("bedrock", "openai"), runtime, strip=False)
    run_settlement(settlement, 200, "application/vnd.amazon.eventstream", [b"".join(BEDROCK_STREAM)])
    assert len(records) == 1 and records[0].streamed is True
