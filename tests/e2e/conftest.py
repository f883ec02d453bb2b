from __future__ import annotations

import shutil
from collections.abc import Iterator

import httpx
import pytest

from devtools.launch import LaunchError, find_envoy
from devtools.stack import Stack
from extproc.cli import sample_policy_dir
from tests.conftest import missing


@pytest.fixture(scope="session")
def envoy_binary() -> str:
    try:
        return find_envoy()
    except LaunchError as exc:
        missing(str(exc))
        raise


@pytest.fixture(scope="session")
def stack(envoy_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The demo's setup: sample policies, one Envoy per sample service."""
    running = Stack(sample_policy_dir(), tmp_path_factory.mktemp("stack"))
    yield running
    running.close()


@pytest.fixture(scope="session")
def strict_stack(envoy_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway-style mesh: trusted identity header, 4 KiB body limit."""
    policies = tmp_path_factory.mktemp("strict-policies")
    for path in sample_policy_dir().iterdir():
        shutil.copy(path, policies / path.name)
    mesh = (policies / "mesh.yaml").read_text()
    mesh = mesh.replace("max_body_bytes: 1048576", "max_body_bytes: 4096")
    mesh = mesh.replace("mesh:\n", "mesh:\n  identity: {trust_header: true}\n", 1)
    (policies / "mesh.yaml").write_text(mesh)
    running = Stack(policies, tmp_path_factory.mktemp("strict"), services=["shared-gateway"])
    yield running
    running.close()


class Mock:
    """The mock providers' request records, to see what really reached the provider."""

    def __init__(self, stack: Stack) -> None:
        self._stack = stack

    def _url(self, api: str) -> str:
        return f"http://127.0.0.1:{self._stack.mock_ports[api]}/_mock/requests"

    def clear(self) -> None:
        for api in self._stack.mock_ports:
            httpx.delete(self._url(api)).raise_for_status()

    def requests(self, api: str) -> list[dict[str, object]]:
        response = httpx.get(self._url(api))
        response.raise_for_status()
        return list(response.json())

    def last(self, api: str) -> dict[str, object]:
        records = self.requests(api)
        assert records, f"the {api} mock received nothing"
        return records[-1]


@pytest.fixture
def mock(stack: Stack) -> Mock:
    recorder = Mock(stack)
    recorder.clear()
    return recorder


def processor_alive(stack: Stack) -> bool:
    return stack.processor.process is not None and stack.processor.process.poll() is None


def logs(stack: Stack) -> str:
    return "\n".join(f"--- {p.name}\n{p.log_text()[-3000:]}" for p in stack.parts)


