"""Load policy YAML from files and directories into a validated, compiled :class:`PolicySet`.

Every problem is reported with its file, line and field path; a load either yields a whole
consistent policy set or raises :class:`PolicyError` listing everything wrong, so a caller can
keep serving the last good set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from extproc.policy.compiled import PolicySet, compile_policy_set
from extproc.policy.model import MeshConfig, MeshSettings, Price, Provider, ServicePolicy
from extproc.quota.prices import PriceTable

YAML_SUFFIXES = (".yaml", ".yml")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        field = f" {self.path}:" if self.path else ""
        return f"{where}:{field} {self.message}"


class PolicyError(Exception):
    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True, slots=True)
class Document:
    file: str
    index: int
    node: yaml.Node
    data: Any

    @classmethod
    def from_data(cls, label: str, data: Any) -> Document:
        """A document that did not come from a file (e.g. a Kubernetes object's spec).

        It is dumped and re-read so that problems are located exactly as for files.
        """
        text = yaml.safe_dump(data, sort_keys=False)
        return cls(label, 0, yaml.compose(text, Loader=yaml.SafeLoader), data)

    @property
    def label(self) -> str:
        return self.file if self.index == 0 else f"{self.file}#{self.index + 1}"


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; directories yield their YAML files (sorted, non-recursive, hidden skipped).

    Hidden entries are skipped because Kubernetes ConfigMap volumes keep the real files in
    ``..data``-style directories next to the visible symlinks.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(
                p for p in sorted(path.iterdir())
                if p.suffix in YAML_SUFFIXES and not p.name.startswith(".") and p.is_file()
            )
        else:
            files.append(path)
    return files


def read_documents(files: Iterable[Path]) -> tuple[list[Document], list[Problem]]:
    documents: list[Document] = []
    problems: list[Problem] = []
    for file in files:
        name = str(file)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(name, None, "", f"cannot read: {exc}"))
            continue
        try:
            nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            problems.append(Problem(name, line, "", f"invalid YAML: {getattr(exc, 'problem', exc)}"))
            continue
        for index, node in enumerate(n for n in nodes if n is not None):
            data = yaml.SafeLoader(text).construct_document(node)
            documents.append(Document(name, index, node, data))
    return documents, problems


def load_policy(paths: Iterable[str | Path], extra: Sequence[Document] = ()) -> PolicySet:
    """Load and validate everything under ``paths`` plus ``extra`` documents (e.g. from the Kubernetes
    API); raise :class:`PolicyError` on any problem. With ``extra`` given, no files at all is fine."""
    paths = list(paths)
    files = expand_paths(paths)
    if not files and not extra:
        raise PolicyError([Problem(", ".join(map(str, paths)) or "(none)", None, "", "no policy files found")])
    documents, problems = read_documents(files)
    documents.extend(extra)
    return build_policy(documents, problems)


def check_documents(documents: Sequence[Document]) -> list[Problem]:
    """Every problem of these documents taken together, without raising."""
    try:
        build_policy(documents, [])
    except PolicyError as exc:
        return list(exc.problems)
    return []


def build_policy(documents: Sequence[Document], problems: list[Problem]) -> PolicySet:
    """Validate and cross-check ``documents`` (already read) into one policy set."""
    problems = list(problems)
    services: list[tuple[Document, ServicePolicy]] = []
    providers: list[tuple[Document, int, Provider]] = []
    prices: list[Price] = []
    mesh: tuple[Document, MeshSettings] | None = None
    for doc in documents:
        if not isinstance(doc.data, dict):
            problems.append(Problem(doc.label, doc.node.start_mark.line + 1, "", "expected a mapping"))
            continue
        if "service" in doc.data:
            policy = _validate(ServicePolicy, doc, problems)
            if policy is not None:
                services.append((doc, policy))
        elif "providers" in doc.data or "mesh" in doc.data:
            config = _validate(MeshConfig, doc, problems)
            if config is None:
                continue
            providers.extend((doc, i, p) for i, p in enumerate(config.providers))
            prices.extend(config.prices)
            if "mesh" in doc.data:
                if mesh is not None:
                    problems.append(Problem(doc.label, _line(doc.node, ("mesh",)), "mesh",
                                            f"mesh settings already given in {mesh[0].label}"))
                else:
                    mesh = (doc, config.mesh)
        else:
            keys = ", ".join(map(str, doc.data)) or "nothing"
            problems.append(Problem(doc.label, doc.node.start_mark.line + 1, "",
                                    f"unrecognised document (has {keys}); expected 'service:' with "
                                    "'ai_proxy:', or 'providers:'/'mesh:'"))
    problems.extend(_cross_check(services, providers, mesh))
    if not problems:
        problems.extend(_check_prices(services, providers, prices, mesh))
    if problems:
        raise PolicyError(problems)
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(repr(doc.data).encode())
    return compile_policy_set(
        mesh=mesh[1] if mesh else MeshSettings(),
        providers=[p for _, _, p in providers],
        services=[(doc.label, policy) for doc, policy in services],
        version=digest.hexdigest()[:12],
        prices=prices,
    )


def _validate(model: type[M], doc: Document, problems: list[Problem]) -> M | None:
    try:
        return model.model_validate(doc.data)
    except ValidationError as exc:
        errors = [(tuple(p for p in e["loc"] if not _is_union_tag(p)), e) for e in exc.errors()]
        for loc, error in errors:
            if error["type"] == "too_short" and any(len(o) > len(loc) and o[:len(loc)] == loc for o, _ in errors):
                continue  # a list left short only because its invalid items were dropped: not news
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown field"
            problems.append(Problem(doc.label, _line(doc.node, loc), _dotted(loc), message))
        return None


def _is_union_tag(part: object) -> bool:
    # pydantic puts validator/union member names (e.g. 'function-before[...]') into locations.
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def _cross_check(
    services: list[tuple[Document, ServicePolicy]],
    providers: list[tuple[Document, int, Provider]],
    mesh: tuple[Document, MeshSettings] | None,
) -> Iterator[Problem]:
    known: dict[str, Document] = {}
    for doc, index, provider in providers:
        if provider.name in known:
            yield Problem(doc.label, _line(doc.node, ("providers", index, "name")), f"providers[{index}].name",
                          f"provider {provider.name!r} already defined in {known[provider.name].label}")
        known.setdefault(provider.name, doc)
    owners: dict[tuple[str | None, str], Document] = {}
    for doc, policy in services:
        key = (policy.namespace, policy.service)
        if key in owners:
            yield Problem(doc.label, _line(doc.node, ("service",)), "service",
                          f"service {policy.service!r} already has a policy in {owners[key].label}")
        owners.setdefault(key, doc)
        yield from _check_providers(doc, ("ai_proxy",), policy.ai_proxy.models, known)
        names = ", ".join(sorted(known)) or "none defined"
        for name in policy.ai_proxy.provider_limits:
            if name not in known:
                loc = ("ai_proxy", "provider_limits", name)
                yield Problem(doc.label, _line(doc.node, loc), _dotted(loc),
                              f"unknown provider {name!r} (known: {names})")
    if mesh is not None and mesh[1].default_policy is not None:
        yield from _check_providers(mesh[0], ("mesh", "default_policy"), mesh[1].default_policy.models, known)


def _check_prices(
    services: list[tuple[Document, ServicePolicy]],
    providers: list[tuple[Document, int, Provider]],
    prices: list[Price],
    mesh: tuple[Document, MeshSettings] | None,
) -> Iterator[Problem]:
    """A cost limit needs a price for every model it may be charged for, or it cannot be enforced."""
    table = PriceTable(prices, {p.name: p for _, _, p in providers})
    default_cost = bool(mesh and mesh[1].default_limits and mesh[1].default_limits.cost)
    for doc, policy in services:
        proxy = policy.ai_proxy
        service_cost = bool(proxy.limits.cost) if proxy.limits is not None else default_cost
        for i, model in enumerate(proxy.models):
            targets = [(model.provider, model.model)] + [
                (v.provider or model.provider, v.model or model.model) for v in model.variants] + [
                (f.provider, f.model) for f in model.fallback]
            for provider, upstream in targets:
                narrowed = proxy.provider_limits.get(provider)
                if not (service_cost or (model.limits and model.limits.cost) or (narrowed and narrowed.cost)):
                    continue
                if table.lookup(provider, upstream) is None:
                    loc = ("ai_proxy", "models", i, "model")
                    yield Problem(doc.label, _line(doc.node, loc), _dotted(loc),
                                  f"a cost limit applies but there is no price for {provider}/{upstream}; "
                                  "add it under 'prices:' in the mesh document")


def _check_providers(doc: Document, prefix: tuple[Any, ...], models: Iterable[Any], known: dict[str, Document]
                     ) -> Iterator[Problem]:
    names = ", ".join(sorted(known)) or "none defined"
    for i, model in enumerate(models):
        refs = [((*prefix, "models", i, "provider"), model.provider)]
        refs += [((*prefix, "models", i, "variants", j, "provider"), v.provider)
                 for j, v in enumerate(model.variants) if v.provider]
        refs += [((*prefix, "models", i, "fallback", j, "provider"), f.provider) for j, f in enumerate(model.fallback)]
        for loc, name in refs:
            if name not in known:
                yield Problem(doc.label, _line(doc.node, loc), _dotted(loc),
                              f"unknown provider {name!r} (known: {names})")


def _dotted(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line(node: yaml.Node, loc: Sequence[Any]) -> int | None:
    """Line (1-based) of the deepest YAML node along ``loc`` that exists."""
    current = node
    for part in loc:
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                if key.value == part:
                    current = value
                    break
            else:
                break
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int) and part < len(current.value):
            current = current.value[part]
        else:
            break
    return current.start_mark.line + 1
