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
from extproc.policy.model import BUILTIN_PROVIDERS, MeshConfig, MeshSettings, Price, Provider, ServicePolicy
from extproc.policy.prices import PriceTable

YAML_SUFFIXES = (".yaml", ".yml")
M = TypeVar("M", bound=BaseModel)

# Bounds on what one policy file may make us do. A Kubernetes ConfigMap holds at most 1 MiB; a policy
# set of many services has a few thousand values; nobody nests a policy 64 levels deep.
MAX_FILE_CHARS = 1024 * 1024
MAX_VALUES = 100_000  # per document, counting each alias as often as it is used ("billion laughs")
MAX_DEPTH = 64
_CORE_TAG = "tag:yaml.org,2002:"
_TIMESTAMP_TAG = _CORE_TAG + "timestamp"


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
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:  # safe_dump writes one document whatever the data, even None ("null")
            raise ValueError(f"{label}: nothing to compose")
        return cls(label, 0, node, data)

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
    """Parse ``files`` into documents; whatever cannot be read becomes a :class:`Problem`, never an exception."""
    documents: list[Document] = []
    problems: list[Problem] = []
    for file in files:
        text = _read_text(file)
        nodes = _compose(str(file), text) if isinstance(text, str) else text
        if isinstance(nodes, Problem):
            problems.append(nodes)
            continue
        for index, node in enumerate(nodes):
            document = _construct(str(file), index, node)
            (problems if isinstance(document, Problem) else documents).append(document)  # type: ignore[arg-type]
    return documents, problems


class PolicyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, narrowed to what a policy file needs and hardened against what it must not do.

    * Dates stay strings: ``2024-13-45`` is no longer an invalid date (PyYAML's SafeLoader makes
      ``datetime.date`` objects of date-shaped scalars); no policy field is a date.
    * A constructor failing on bad input (``!!float abc``, ``!!bool maybe``, ``!!int 0x``) raises a
      :class:`yaml.constructor.ConstructorError` carrying the node's mark, like PyYAML's own errors.
    * Nesting is bounded (:data:`MAX_DEPTH`): PyYAML's composer recurses once per level, and its scanner
      slows quadratically with open brackets.
    """

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        # Checked as early as the scanner: it keeps a pending key per open bracket and rescans them all
        # for every token, so a line of 5000 '[' is slow long before the composer sees the 65th level.
        if self.flow_level >= MAX_DEPTH:
            raise yaml.scanner.ScannerError(None, None, f"nested more than {MAX_DEPTH} levels deep", self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]  # unannotated in types-PyYAML
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # a constructor's own ValueError, KeyError, OverflowError...
            shown = repr(node.value if len(node.value) <= 40 else node.value[:40] + "…") \
                if isinstance(node, yaml.ScalarNode) else "this value"
            raise yaml.constructor.ConstructorError(
                None, None, f"invalid {_short_tag(node.tag)} value {shown}", node.start_mark) from exc

    def construct_undefined(self, node: yaml.Node) -> Any:
        raise yaml.constructor.ConstructorError(
            None, None, f"unknown tag {_short_tag(node.tag)!r}; policy files use plain YAML values",
            node.start_mark)

    def construct_timestamp_as_text(self, node: yaml.Node) -> str:
        return str(self.construct_scalar(node))  # type: ignore[arg-type]


PolicyLoader.add_constructor(_TIMESTAMP_TAG, PolicyLoader.construct_timestamp_as_text)
PolicyLoader.add_constructor(None, PolicyLoader.construct_undefined)


def _short_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_CORE_TAG) if tag.startswith(_CORE_TAG) else tag


def _read_text(file: Path) -> str | Problem:
    name = str(file)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        return Problem(name, None, "", f"cannot read: {exc.strerror or exc}")
    if len(raw) > 4 * MAX_FILE_CHARS:  # UTF-8 takes at most 4 bytes a character
        return Problem(name, None, "", f"file too large: over {MAX_FILE_CHARS} characters")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return Problem(name, line, "", f"not UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start}")
    if len(text) > MAX_FILE_CHARS:
        return Problem(name, None, "", f"file too large: over {MAX_FILE_CHARS} characters")
    return text


def _compose(name: str, text: str) -> list[yaml.Node] | Problem:
    """The YAML node tree of each document in ``text`` (syntax only: nothing is constructed yet)."""
    nodes: list[yaml.Node] = []
    try:
        loader = PolicyLoader(text)
        try:
            while loader.check_node():
                node = loader.get_node()  # not None after check_node
                if node is not None:
                    nodes.append(node)
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as exc:  # an unprintable character, e.g. NUL: has a position, no mark
        line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
        character = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        return Problem(name, line, "", f"invalid YAML: unacceptable character {character}: {exc.reason}")
    except yaml.YAMLError as exc:
        return Problem(name, _mark_line(exc), "", f"invalid YAML: {_yaml_message(exc)}")
    except RecursionError:  # not expected with MAX_DEPTH, but never a traceback
        return Problem(name, None, "", f"invalid YAML: nested more than {MAX_DEPTH} levels deep")
    return nodes


def _construct(name: str, index: int, node: yaml.Node) -> Document | Problem:
    """Python values of one document, or the one problem that stops them being made."""
    label = name if index == 0 else f"{name}#{index + 1}"
    problem = _check_size(label, node)
    if problem is not None:
        return problem
    try:
        data = PolicyLoader("").construct_document(node)
    except yaml.YAMLError as exc:
        mark = _mark(exc) or node.start_mark
        return Problem(label, mark.line + 1, _dotted(_path_at(node, mark.index)), f"invalid YAML: {_yaml_message(exc)}")
    except Exception as exc:  # not expected from PolicyLoader, but never a traceback
        return Problem(label, node.start_mark.line + 1, "", f"invalid YAML: {exc}")
    return Document(name, index, node, data)


def _check_size(label: str, root: yaml.Node) -> Problem | None:
    """Refuse a document that refers to itself, or that expands past :data:`MAX_VALUES` through aliases.

    PyYAML composes and constructs an alias as a reference to the anchored value, so a few lines of
    nested aliases ("billion laughs") cost nothing until something walks the values (the version
    digest's ``repr``, a validator that descends into free-form data): then they would take forever. Today's
    schema happens to reject such shapes early; this does not count on it. Counted on the node graph,
    each node once, without recursion.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children = _children(node)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = min(MAX_VALUES + 1, 1 + sum(sizes[id(c)] for c in children))
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            return Problem(label, node.start_mark.line + 1, _dotted(_path_at(root, node.start_mark.index)),
                           "an alias refers to a value that contains it (a recursive structure)")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children)
    if sizes[id(root)] > MAX_VALUES:
        return Problem(label, root.start_mark.line + 1, "",
                       f"document too large: more than {MAX_VALUES} values once aliases are expanded")
    return None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _path_at(root: yaml.Node, index: int) -> tuple[Any, ...]:
    """The field path of the deepest value whose text spans character ``index`` of the file."""
    path: list[Any] = []
    current = root
    visited = {id(root)}  # an alias of an enclosing value spans the same text: never go round
    for _ in range(MAX_DEPTH + 1):
        found = None
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                if _spans(key, index):
                    return tuple(path)  # in a key: the mapping holding it is as far as a path goes
                if id(value) not in visited and _spans(value, index):
                    path.append(key.value if isinstance(key, yaml.ScalarNode) else "?")
                    found = value
                    break
        elif isinstance(current, yaml.SequenceNode):
            for i, item in enumerate(current.value):
                if id(item) not in visited and _spans(item, index):
                    path.append(i)
                    found = item
                    break
        if found is None:
            break
        visited.add(id(found))
        current = found
    return tuple(path)


def _spans(node: yaml.Node, index: int) -> bool:
    return bool(node.start_mark.index <= index <= node.end_mark.index)


def _mark(exc: yaml.YAMLError) -> yaml.Mark | None:
    return getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)


def _mark_line(exc: yaml.YAMLError) -> int | None:
    mark = _mark(exc)
    return mark.line + 1 if mark is not None else None


def _yaml_message(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    if problem == "found unhashable key":
        return "a mapping key must be a plain value, not a list or mapping"
    context = getattr(exc, "context", None)
    return str(problem or context or exc)


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
        problems.extend(_check_deployments(services, providers))
    if problems:
        raise PolicyError(problems)
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(repr(doc.data).encode())
    defined = {p.name for _, _, p in providers}
    return compile_policy_set(
        mesh=mesh[1] if mesh else MeshSettings(),
        providers=[*(p for _, _, p in providers), *(p for p in BUILTIN_PROVIDERS if p.name not in defined)],
        services=[(doc.label, policy) for doc, policy in services],
        version=digest.hexdigest()[:12],
        prices=prices,
    )


def _validate(model: type[M], doc: Document, problems: list[Problem]) -> M | None:
    try:
        return model.model_validate(doc.data)
    except ValidationError as exc:
        errors = [(_error_loc(e), e) for e in exc.errors()]
        for loc, error in errors:
            if error["type"] == "too_short" and any(len(o) > len(loc) and o[:len(loc)] == loc for o, _ in errors):
                continue  # a list left short only because its invalid items were dropped: not news
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown field"
            problems.append(Problem(doc.label, _line(doc.node, loc), _dotted(loc), message))
        return None


def _error_loc(error: Any) -> tuple[Any, ...]:
    loc = tuple(p for p in error["loc"] if not _is_union_tag(p))
    if error["type"] == "duplicate":  # a name listed twice: ctx['loc'] is the second item, below the model
        loc += tuple(error.get("ctx", {}).get("loc", ()))
    return loc


def _is_union_tag(part: object) -> bool:
    # pydantic puts validator/union member names (e.g. 'function-before[...]') into locations.
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def _cross_check(
    services: list[tuple[Document, ServicePolicy]],
    providers: list[tuple[Document, int, Provider]],
    mesh: tuple[Document, MeshSettings] | None,
) -> Iterator[Problem]:
    known: dict[str, Document | None] = {p.name: None for p in BUILTIN_PROVIDERS}  # None: built in
    for doc, index, provider in providers:
        earlier = known.get(provider.name)
        if earlier is not None:
            yield Problem(doc.label, _line(doc.node, ("providers", index, "name")), f"providers[{index}].name",
                          f"provider {provider.name!r} already defined in {earlier.label}")
        else:
            known[provider.name] = doc  # a file's definition replaces a built-in one
    owners: dict[tuple[str | None, str], Document] = {}
    for doc, policy in services:
        key = (policy.namespace, policy.service)
        if key in owners:
            yield Problem(doc.label, _line(doc.node, ("service",)), "service",
                          f"service {policy.service!r} already has a policy in {owners[key].label}")
        owners.setdefault(key, doc)
        yield from _check_providers(doc, ("ai_proxy",), policy.ai_proxy.models, known)
        names = ", ".join(sorted(known)) or "none defined"
        for i, allowed in enumerate(policy.ai_proxy.allow_paths):
            if allowed.provider not in known:
                loc: tuple[str | int, ...] = ("ai_proxy", "allow_paths", i, "provider")
                yield Problem(doc.label, _line(doc.node, loc), _dotted(loc),
                              f"unknown provider {allowed.provider!r} (known: {names})")
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
    table = PriceTable(prices, {**{p.name: p for p in BUILTIN_PROVIDERS}, **{p.name: p for _, _, p in providers}})
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


def _check_deployments(services: list[tuple[Document, ServicePolicy]],
                       providers: list[tuple[Document, int, Provider]]) -> Iterator[Problem]:
    """An Azure OpenAI provider on deployment paths serves only the models it names a deployment for."""
    azure = {p.name: p for _, _, p in providers if p.api == "azure_openai" and p.deployments is not None}
    for doc, policy in services:
        for i, model in enumerate(policy.ai_proxy.models):
            targets: list[tuple[tuple[str | int, ...], str, str]] = [(("model",), model.provider, model.model)]
            targets += [(("variants", j, "model"), v.provider or model.provider, v.model or model.model)
                        for j, v in enumerate(model.variants)]
            targets += [(("fallback", j, "model"), f.provider, f.model) for j, f in enumerate(model.fallback)]
            for where, provider, upstream in targets:
                found = azure.get(provider)
                if found is not None and upstream not in (found.deployments or {}):
                    loc = ("ai_proxy", "models", i, *where)
                    yield Problem(doc.label, _line(doc.node, loc), _dotted(loc),
                                  f"provider {provider!r} has no deployment for model {upstream!r} (its deployments: "
                                  f"{', '.join(sorted(found.deployments or {}))})")


def _check_providers(doc: Document, prefix: tuple[Any, ...], models: Iterable[Any],
                     known: dict[str, Document | None]) -> Iterator[Problem]:
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
