"""Shared fixtures. Real parts only: Envoy binary, our processor as a subprocess, the mock provider.

When a real dependency is missing, tests skip with the reason; with EXTPROC_REQUIRE_SERVICES=1
(set by .ci/run) a missing dependency fails instead, so CI cannot go green by skipping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from devtools.launch import free_port

REQUIRE = os.environ.get("EXTPROC_REQUIRE_SERVICES") == "1"


def missing(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"{reason} (EXTPROC_REQUIRE_SERVICES=1 turns this skip into a failure)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The machine's Redis on 127.0.0.1:6379, else a private redis-server on a free port, else skip."""
    if _redis_answers(6379):
        yield "redis://127.0.0.1:6379/0"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        missing("no Redis on 127.0.0.1:6379 and no redis-server binary to start one")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with _private_server(command, lambda: _redis_answers(port), "redis-server"):
        yield f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def _private_server(command: list[str], answers: Callable[[], bool], name: str) -> Iterator[None]:
    """Run a server binary for the test session; skip (or fail in CI) if it does not come up."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not answers():
            if time.monotonic() > deadline:
                missing(f"a private {name} did not start")
            time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(10)


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def jetstream_answers(port: int) -> bool:
    """A NATS server with JetStream enabled says so in the INFO line it greets clients with."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            info = sock.recv(4096)
    except OSError:
        return False
    return info.startswith(b"INFO ") and b'"jetstream":true' in info


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's NATS JetStream on 127.0.0.1:4222, else a private nats-server on a free port, else skip."""
    if jetstream_answers(4222):
        yield "nats://127.0.0.1:4222"
        return
    binary = shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if os.path.exists(p)), None)
    if binary is None:
        missing("no NATS JetStream on 127.0.0.1:4222 and no nats-server binary to start one")
    port = free_port()
    command = [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path_factory.mktemp("nats"))]
    with _private_server(command, lambda: jetstream_answers(port), "nats-server"):
        yield f"nats://127.0.0.1:{port}"


def _children() -> list[tuple[int, str]]:
    """This process's live children (pid, command line), from /proc; zombies are only not yet reaped."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != me or fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                found.append((int(entry), cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every process a test starts is stopped by it: a leftover (an orphaned processor, say) keeps its port
    and its CPU after the run. Leftovers are killed here and fail the session, named."""
    if not os.path.isdir("/proc"):
        return
    deadline = time.monotonic() + 5  # fixtures may still be draining a child's shutdown
    leftovers = _children()
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)
        leftovers = _children()
    for pid, _ in leftovers:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    if leftovers:
        names = "\n  ".join(f"{pid}: {command[:200]}" for pid, command in leftovers)
        print(f"\nprocesses the tests started and left running (killed now):\n  {names}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
