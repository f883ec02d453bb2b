"""The CRD schemas: generated from the policy model, structural as Kubernetes requires, accepting
every sample object and refusing bad ones with the message the API server would give (validated
with a real OpenAPI v3 validator); and the processor's loader agreeing with them."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_schema_validator import OAS30Validator

from extproc.cli import sample_policy_dir
from extproc.policy.crd import policy_document, provider_document, render_crds
from extproc.policy.loader import check_documents

ISTIO = Path(__file__).resolve().parents[2] / "istio"
CRDS = {c["spec"]["names"]["kind"]: c for c in render_crds()}


def schema(kind: str) -> dict[str, Any]:
    return dict(CRDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def errors(kind: str, obj: dict[str, Any]) -> list[tuple[str, str]]:
    found = OAS30Validator(schema(kind)).iter_errors(obj)
    return sorted((".".join(map(str, e.absolute_path)), e.message) for e in found)


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def nodes(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, sub in node.get("properties", {}).items():
            yield from nodes(sub, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                yield from nodes(node[key], f"{path}[{key}]")


@pytest.mark.parametrize("kind", ["AIPolicy", "AIProvider"])
def test_schema_is_structural(kind: str) -> None:
    """What apiextensions.k8s.io/v1 refuses: $ref, missing types, properties next to additionalProperties."""
    text = yaml.safe_dump(schema(kind))
    assert "$ref" not in text and "$defs" not in text and "title:" not in text
    for path, node in nodes(schema(kind)):
        special = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        assert "type" in node or special, f"{kind}{path}: no type"
        assert not ("properties" in node and "additionalProperties" in node), f"{kind}{path}"
        if "anyOf" in node:  # only the int-or-string form is allowed to carry types inside a junctor
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}] and node["x-kubernetes-int-or-string"]
        assert "patternProperties" not in node and "propertyNames" not in node
    version = CRDS[kind]["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]][-3:] == ["State", "Reason", "Age"]


def test_every_sample_object_validates() -> None:
    objects = [*load_all(ISTIO / "providers.yaml"), *load_all(ISTIO / "samples" / "policies.yaml")]
    ours = [o for o in objects if o["kind"] in CRDS]
    assert len(ours) == 5
    for obj in ours:
        assert errors(obj["kind"], obj) == [], obj["metadata"]["name"]


def test_aipolicy_spec_is_the_policy_file_shape() -> None:
    """Each sample policy file, as written, is a valid AIPolicy spec, and the rendered objects carry it."""
    rendered = {o["metadata"]["name"]: o["spec"] for o in load_all(ISTIO / "samples" / "policies.yaml")}
    files = sorted(sample_policy_dir().glob("*-service.yaml"))
    assert len(files) == 3
    for path in files:
        data = yaml.safe_load(path.read_text())
        assert errors("AIPolicy", {"apiVersion": "ai.extproc.io/v1alpha1", "kind": "AIPolicy", "metadata": {},
                                   "spec": data}) == []
        assert rendered[data["service"]] == data


def policy(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"service": "order-service", "ai_proxy": {"models": [
        {"name": "fraud_detector", "provider": "claude", "model": "claude-3", "timeout": "2000ms",
         "variants": [{"name": "a", "weight": 80}, {"name": "b", "weight": 20, "model": "claude-4"}]}]}}
    for path, value in changes.items():
        target = spec
        *parents, last = path.split("__")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is None:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value
    return {"apiVersion": "ai.extproc.io/v1alpha1", "kind": "AIPolicy",
            "metadata": {"name": "order-service", "namespace": "shop"}, "spec": spec}


M = "spec.ai_proxy.models.0"
INVALID_POLICIES = [
    (policy(ai_proxy=None), "spec", "'ai_proxy' is a required property"),
    (policy(ai_proxy__models=[]), "spec.ai_proxy.models", "[] should be non-empty"),
    (policy(service="Order_Service"), "spec.service",
     "'Order_Service' does not match '^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$'"),
    (policy(ai_proxy__models__0__model=None), M, "'model' is a required property"),
    (policy(ai_proxy__models__0__timeout="2 weeks"), f"{M}.timeout",
     r"'2 weeks' does not match '^\\s*\\d+(\\.\\d+)?\\s*(ms|s|m|h)?\\s*$'"),
    (policy(ai_proxy__models__0__variants__0__weight="80"), f"{M}.variants.0.weight", "'80' is not of type 'integer'"),
    (policy(ai_proxy__models__0__variants__1__weight=-1), f"{M}.variants.1.weight", "-1 is less than the minimum of 0"),
    (policy(ai_proxy__models__0__rate_limit=100), f"{M}.rate_limit", "100 is not of type 'string'"),
    (policy(ai_proxy__models__0__variants="control"), f"{M}.variants", "'control' is not of type 'array'"),
]


@pytest.mark.parametrize(("obj", "where", "message"), INVALID_POLICIES,
                         ids=[m for _, _, m in INVALID_POLICIES])
def test_invalid_aipolicies_are_refused_by_schema_and_loader(obj: dict[str, Any], where: str, message: str) -> None:
    assert errors("AIPolicy", obj) == [(where, message)]
    if message == "'80' is not of type 'integer'":
        return  # the loader's pydantic model is lax here (it coerces "80" to 80); admission is stricter
    # The processor's own validation (same model) refuses them too, should one get past admission.
    providers = provider_document({"metadata": {"name": "claude", "namespace": "ai-system"},
                                   "spec": {"api": "anthropic", "base_url": "http://api.anthropic.com/v1"}})
    assert check_documents([providers, policy_document(obj, "istio-system")])


def provider(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"api": "openai", "base_url": "http://api.openai.com/v1",
                            "credential": {"secretRef": {"name": "openai-api-key", "key": "api-key"}}}
    base.update(spec)
    return {"apiVersion": "ai.extproc.io/v1alpha1", "kind": "AIProvider",
            "metadata": {"name": "openai", "namespace": "ai-system"}, "spec": {k: v for k, v in base.items() if v}}


INVALID_PROVIDERS = [
    (provider(api="watsonx"), "spec.api", "'watsonx' is not one of ['openai', 'anthropic', 'azure_openai', "
     "'bedrock', 'gemini', 'vertex', 'openai_compatible']"),
    (provider(region=7), "spec.region", "7 is not of type 'string'"),
    (provider(credential={"secretRef": {"name": "openai-api-key"}}), "spec.credential.secretRef",
     "'key' is a required property"),
    (provider(credential={"secretRef": {"name": "Bad Name", "key": "k"}}), "spec.credential.secretRef.name",
     "'Bad Name' does not match '^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$'"),
]


@pytest.mark.parametrize(("obj", "where", "message"), INVALID_PROVIDERS, ids=[m for _, _, m in INVALID_PROVIDERS])
def test_invalid_aiproviders_are_refused(obj: dict[str, Any], where: str, message: str) -> None:
    assert errors("AIProvider", obj) == [(where, message)]


def test_what_only_the_processor_can_check_passes_admission_and_fails_there() -> None:
    """Cross-field rules (Python validators) are the processor's: it reports them in the status."""
    duplicate = policy()
    duplicate["spec"]["ai_proxy"]["models"].append(copy.deepcopy(duplicate["spec"]["ai_proxy"]["models"][0]))
    assert errors("AIPolicy", duplicate) == []
    providers = provider_document({"metadata": {"name": "claude", "namespace": "ai-system"},
                                   "spec": {"api": "anthropic", "base_url": "http://api.anthropic.com/v1"}})
    (problem,) = check_documents([providers, policy_document(duplicate, "istio-system")])
    assert problem.message == "model name 'fraud_detector' is listed twice"
    url = provider(base_url="ftp://api.openai.com")
    assert errors("AIProvider", url) == []
    (problem,) = check_documents([provider_document(url)])
    assert problem.message == "must be an absolute http(s) URL such as http://api.openai.com/v1"
