"""The package's layers: each may import from the layers below it, never from those above, and no two
packages of one layer import each other. Dev tools (the demo, the mock providers, the local stack)
live outside the runtime package, so the processor's image cannot import them.

Imports under ``if TYPE_CHECKING:`` are annotations only and do not count; imports inside functions do.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Top to bottom. A module belongs to the first entry that prefixes its name.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("extproc.__main__", "extproc.cli"),  # the command line
    ("extproc.server", "extproc.envoy_config"),  # the gRPC and HTTP servers; Envoy and Istio configuration
    ("extproc.core",),  # the decision journey and the response side
    # What the journey uses: quotas, the response cache, jobs, usage events, telemetry, translation; and the
    # spend ledger, which reads the usage events.
    ("extproc.quota", "extproc.cache", "extproc.jobs", "extproc.events", "extproc.ledger", "extproc.telemetry",
     "extproc.translate"),
    ("extproc.policy",),  # the policy model, its sources and prices
    ("extproc.base",),  # what every layer shares: the AI APIs, the wire contract, signed tokens, back-off
)
# Packages of one layer that may import each other, in this direction only (and why).
SIDEWAYS: frozenset[tuple[str, str]] = frozenset({
    ("extproc.__main__", "extproc.cli"),  # python -m extproc
    ("extproc.events", "extproc.telemetry"),  # usage events are telemetry records sent elsewhere
    ("extproc.ledger", "extproc.events"),  # the ledger stores usage events
})


def layer_of(module: str) -> tuple[int, str]:
    for index, layer in enumerate(LAYERS):
        for package in layer:
            if module == package or module.startswith(package + "."):
                return index, package
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, module) of every extproc import that runs, i.e. outside ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (item for child in node.orelse for item in imports(ast.Module([child], [])))
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        yield from imports(node)


def violations(files: dict[str, str]) -> list[str]:
    """``files``: module name → source. Every import that goes up a layer or sideways."""
    found = []
    for module, source in sorted(files.items()):
        here, own = layer_of(module)
        for line, target in imports(ast.parse(source)):
            if not target.startswith("extproc"):
                if target.split(".")[0] in ("devtools", "tests", "bench"):
                    found.append(f"{module}:{line} imports {target}: the runtime package never imports dev tools")
                continue
            there, other = layer_of(target)
            if there < here:
                found.append(f"{module}:{line} imports {target}: {other} is above {own}")
            elif there == here and other != own and (own, other) not in SIDEWAYS:
                found.append(f"{module}:{line} imports {target}: {own} and {other} are one layer (see SIDEWAYS)")
    return found


def package_sources() -> dict[str, str]:
    """Every module of the package but its root ``__init__`` (which imports nothing) and protoc output."""
    sources = {module_name(p): p.read_text() for p in (ROOT / "extproc").rglob("*.py") if "gen" not in p.parts}
    assert not list(imports(ast.parse(sources.pop("extproc"))))
    return sources


def test_every_import_goes_down_a_layer() -> None:
    problems = violations(package_sources())
    assert not problems, "\n".join(problems)


def test_dev_tools_are_outside_the_runtime_package() -> None:
    for tool in ("demo", "stack", "launch", "mock_provider"):
        assert not (ROOT / "extproc" / f"{tool}.py").exists(), f"extproc/{tool}.py: dev tools live in devtools/"
        assert (ROOT / "devtools" / f"{tool}.py").exists()
    assert "COPY devtools" not in (ROOT / "Dockerfile").read_text()  # the image ships the runtime only


def test_the_check_can_fail() -> None:
    found = violations({
        "extproc.policy.model": "from extproc.core.decision import Decider\n",
        "extproc.quota.engine": "from extproc.cache.store import ResponseCache\n",
        "extproc.core.decision": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from extproc.server.app import serve\n"
                                  "def f():\n    from extproc.cli import main\n"),
        "extproc.server.app": "import devtools.stack\nfrom extproc.core.runtime import Runtime\n",
        "extproc.events.sinks": "from extproc.telemetry.record import CallRecord\n",
    })
    assert found == [
        "extproc.core.decision:5 imports extproc.cli: extproc.cli is above extproc.core",
        "extproc.policy.model:1 imports extproc.core.decision: extproc.core is above extproc.policy",
        "extproc.quota.engine:1 imports extproc.cache.store: extproc.quota and extproc.cache are one layer "
        "(see SIDEWAYS)",
        "extproc.server.app:1 imports devtools.stack: the runtime package never imports dev tools",
    ]
