"""The ``AIPolicy`` and ``AIProvider`` custom resources, generated from the policy model.

``AIPolicy.spec`` is exactly the per-service policy shape (:class:`ServicePolicy`); ``AIProvider.spec``
is a :class:`Provider` whose name is the object's name and whose credential may also be a Secret
reference. Their OpenAPI v3 schemas are generated here from the same pydantic models the file
loader validates with, then made *structural* as apiextensions.k8s.io/v1 requires (``$ref``
inlined, a ``type`` on every node, no ``additionalProperties`` next to ``properties``), so the API
server rejects at admission what the model's field types reject. What only the model's Python
validators can check (exactly one credential source, unique model names, known providers, ...) is
checked by the processor, which reports it in the object's status.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from extproc.policy.loader import Document
from extproc.policy.model import Name, Provider, ServicePolicy

GROUP = "ai.extproc.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
POLICY_PLURAL = "aipolicies"
PROVIDER_PLURAL = "aiproviders"
# Where the processor finds the Secrets named by AIProvider.spec.credential.secretRef: the
# Deployment mounts each provider Secret at SECRETS_DIR/<secret name>/<key>; the kubelet keeps the
# files current on rotation and the credential store re-reads them every few seconds.
SECRETS_DIR = "/var/run/secrets/ai-providers"

# Before-validators accept more than their inner type; what each accepts on the wire. Durations
# are a number of seconds or a string with a unit; rates are COUNT/UNIT strings.
_DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"
_RATE_PATTERN = r"^\s*\d+\s*/\s*\d*\s*[a-zA-Z]+\s*$"
_BEFORE_VALIDATOR_INPUTS: Mapping[str, JsonSchemaValue] = {
    "_duration": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}],
                  "pattern": _DURATION_PATTERN},
    "parse_rate": {"type": "string", "pattern": _RATE_PATTERN},
}
# Any other before-validator (shorthands such as "a string or a list") cannot be written as one
# structural type: such fields are kept as given at admission and validated by the processor.
_ANY_SHAPE: JsonSchemaValue = {"x-kubernetes-preserve-unknown-fields": True}
_DROPPED_KEYS = frozenset({"title", "default", "propertyNames", "examples"})


class SecretKeyRef(BaseModel):
    """A key of a Secret in the processor's namespace, mounted into the processor pod."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Name = Field(description="Secret name (mounted at /var/run/secrets/ai-providers/<name>).")
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key in the Secret.")


class _Generator(GenerateJsonSchema):
    def function_before_schema(self, schema: core_schema.BeforeValidatorFunctionSchema) -> JsonSchemaValue:
        name = getattr(schema["function"]["function"], "__name__", "")
        return copy.deepcopy(dict(_BEFORE_VALIDATOR_INPUTS.get(name, _ANY_SHAPE)))


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of ``model``'s input (what a policy file may say)."""
    raw = model.model_json_schema(mode="validation", schema_generator=_Generator)
    schema: dict[str, Any] = structural(raw, raw.get("$defs", {}))  # an object schema stays an object
    return schema


def structural(node: Any, defs: Mapping[str, Any]) -> Any:
    """JSON Schema (pydantic's dialect) → OpenAPI v3 as Kubernetes accepts it in a CRD."""
    if isinstance(node, list):
        return [structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return structural(merged, defs)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        options = [o for o in node["anyOf"] if o != {"type": "null"}]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) == 1:
            # Optional[X]: the field may be omitted (or null); its value, when given, is an X.
            return {**structural(options[0], defs), **structural(rest, defs), "nullable": True}
        return {**_ANY_SHAPE, **{k: v for k, v in structural(rest, defs).items() if k == "description"}}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS or key == "$defs":
            continue
        if key == "additionalProperties" and value is False:
            continue  # Kubernetes forbids it next to "properties"; unknown fields are refused by the processor
        if key == "patternProperties":
            # A map keyed by names: Kubernetes has no patternProperties; the processor checks the keys.
            (value_schema,) = value.values()
            out["additionalProperties"] = structural(value_schema, defs)
            continue
        if key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"], out["exclusiveMinimum"] = value, True  # JSON Schema 2020 → OpenAPI 3.0
            continue
        if key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"], out["exclusiveMaximum"] = value, True
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        out[key] = structural(value, defs) if key in ("items", "additionalProperties", "not") else (
            {name: structural(sub, defs) for name, sub in value.items()} if key == "properties" else value)
    if "properties" in out or "additionalProperties" in out:
        out.setdefault("type", "object")
    return out


def policy_spec_schema() -> dict[str, Any]:
    return model_schema(ServicePolicy)


def provider_spec_schema() -> dict[str, Any]:
    """Provider without ``name`` (the object's name) and with ``secretRef`` as a third credential source."""
    schema = model_schema(Provider)
    del schema["properties"]["name"]
    schema["required"] = [r for r in schema.get("required", []) if r != "name"]
    credential = schema["properties"]["credential"]
    credential["properties"]["secretRef"] = model_schema(SecretKeyRef)
    credential["description"] = ("Credential source: for api_key and entra_id exactly one of env, file or secretRef; "
                                 "for google a service-account key in file or secretRef, or nothing (workload "
                                 "identity); for aws nothing but an optional profile (the AWS chain: IRSA, ...).")
    return schema


def status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "state": {"type": "string", "enum": ["Accepted", "Rejected"]},
            "reason": {"type": "string", "description": "Why the object was rejected (field: problem)."},
            "observedGeneration": {"type": "integer", "description": "The generation this status is about."},
            "servingGeneration": {"type": "integer",
                                  "description": "The generation the processor serves (the last accepted one)."},
        },
    }


def _crd(kind: str, plural: str, short: str, spec: dict[str, Any], columns: list[dict[str, Any]],
         description: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "shortNames": [short], "categories": ["ai-mesh"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    *columns,
                    {"name": "State", "type": "string", "jsonPath": ".status.state"},
                    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": description,
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec,
                        "status": status_schema(),
                    },
                }},
            }],
        },
    }


def render_crds() -> list[dict[str, Any]]:
    return [
        _crd("AIPolicy", POLICY_PLURAL, "aipol", policy_spec_schema(), [
            {"name": "Service", "type": "string", "jsonPath": ".spec.service"},
            {"name": "Models", "type": "string", "jsonPath": ".spec.ai_proxy.models[*].name"},
        ], "One service's AI policy: spec is the per-service policy file shape, as written. In the mesh "
           "root namespace it applies to that service in every namespace (or spec.namespace); elsewhere only "
           "in its own namespace, where it takes precedence."),
        _crd("AIProvider", PROVIDER_PLURAL, "aiprov", provider_spec_schema(), [
            {"name": "API", "type": "string", "jsonPath": ".spec.api"},
            {"name": "Base URL", "type": "string", "jsonPath": ".spec.base_url"},
        ], "An AI provider reachable from the mesh; its name is the provider name policies use. Read by the "
           "processor from its own namespace only."),
    ]


# ---- objects → policy documents ---------------------------------------------------------------


class ObjectError(ValueError):
    """The object cannot be turned into a policy document at all (reported in its status)."""


@dataclass(frozen=True, slots=True)
class ObjectKey:
    kind: str
    namespace: str
    name: str

    @property
    def label(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def key_of(kind: str, obj: Mapping[str, Any]) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return ObjectKey(kind, str(meta.get("namespace", "")), str(meta.get("name", "")))


def policy_document(obj: Mapping[str, Any], root_namespace: str) -> Document:
    """An AIPolicy as a service-policy document.

    Outside the root namespace a policy can only govern its own namespace: a team cannot write policy
    for another team's services.
    """
    key = key_of("AIPolicy", obj)
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise ObjectError("spec: must be an object")
    data = dict(spec)
    if key.namespace != root_namespace:
        given = data.get("namespace")
        if given is not None and given != key.namespace:
            raise ObjectError(f"spec.namespace: must be omitted or {key.namespace!r} (the object's namespace); "
                              f"only policies in {root_namespace!r} may name another namespace")
        data = {"service": data.get("service"), "namespace": key.namespace,
                **{k: v for k, v in data.items() if k not in ("service", "namespace")}}
    return Document.from_data(key.label, data)


def provider_document(obj: Mapping[str, Any], secrets_dir: str = SECRETS_DIR) -> Document:
    """An AIProvider as a mesh document with one provider; ``secretRef`` becomes the mounted file."""
    key = key_of("AIProvider", obj)
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise ObjectError("spec: must be an object")
    provider = {"name": key.name, **{k: v for k, v in spec.items() if k != "name"}}
    credential = spec.get("credential")
    if isinstance(credential, dict) and "secretRef" in credential:
        if set(credential) - {"secretRef", "type"}:
            raise ObjectError("spec.credential: set exactly one of 'env', 'file' or 'secretRef'")
        ref = credential["secretRef"]
        try:
            secret = SecretKeyRef.model_validate(ref)
        except ValueError as exc:
            raise ObjectError(f"spec.credential.secretRef: {_first_error(exc)}") from exc
        kind = {"type": credential["type"]} if "type" in credential else {}
        provider["credential"] = {**kind, "file": f"{secrets_dir}/{secret.name}/{secret.key}"}
    return Document.from_data(key.label, {"providers": [provider]})


def _first_error(exc: ValueError) -> str:
    errors: Callable[[], list[Any]] | None = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    first = errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return f"{loc}: {first['msg']}" if loc else str(first["msg"])


def spec_path(key: ObjectKey, path: str) -> str:
    """A loader field path as the object's field path, for its status."""
    if key.kind == "AIProvider":
        path = path.removeprefix("providers[0]").lstrip(".")
        if path == "name":
            return "metadata.name"
    if path == "namespace" and key.kind == "AIPolicy":
        return "spec.namespace"
    return f"spec.{path}" if path else "spec"
