"""A complete local stack on free 127.0.0.1 ports: mock providers, the processor, one Envoy per service.

Each service gets its own Envoy whose node metadata names it, exactly as an Istio sidecar's does.
``make demo``, the end-to-end tests and the benchmark all run on this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from devtools.launch import Managed, free_port, start_envoy, start_mock_provider, start_processor, start_worker
from extproc.envoy_config.bootstrap import SidecarSpec, upstream_for
from extproc.policy.loader import load_policy

OPENAI_KEY = "sk-demo-openai"
ANTHROPIC_KEY = "sk-ant-demo"
AZURE_KEY = "azure-demo-key"
GEMINI_KEY = "gemini-demo-key"
AWS_REGION = "us-east-1"
AWS_ACCESS_KEY_ID = "AKIADEMO00000000000"
AWS_SECRET_ACCESS_KEY = "demo-secret-access-key-0000000000000000"
COMPATIBLE_KEY = "in-mesh-demo-key"
# One mock serves the cloud providers' APIs (each on its own paths); an OpenAI-compatible server in the
# mesh is another process on another port.
_CLOUD_APIS = ("azure_openai", "bedrock", "gemini", "vertex")
# What the processor reads its cloud credentials from. The AWS chain must see only these keys: not this
# machine's own config files or instance metadata.
CLOUD_ENV = {"AZURE_OPENAI_API_KEY": AZURE_KEY, "GEMINI_API_KEY": GEMINI_KEY, "COMPATIBLE_API_KEY": COMPATIBLE_KEY,
             "AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET_ACCESS_KEY,
             "AWS_REGION": AWS_REGION, "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
             "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
SERVICES = ("user-service", "product-service", "order-service")
NAMESPACE = "demo"


class Stack:
    """Mock providers, the processor and one Envoy per service, all on free 127.0.0.1 ports."""

    def __init__(self, policy_dir: Path, log_dir: Path, services: Sequence[str] = SERVICES,
                 processor_env: Mapping[str, str] | None = None, processor_args: Sequence[str] = (),
                 replicas: int = 1, upstream_overrides: Mapping[str, tuple[str, int]] | None = None,
                 jobs: tuple[str, str] | None = None, cloud_mock_args: Sequence[str] = (),
                 cloud_port: int | None = None) -> None:
        """``upstream_overrides`` sends named providers elsewhere than their API's mock (e.g. a closed port);
        ``jobs`` (NATS URL, prefix) turns asynchronous calls on and starts an ``extproc worker``;
        ``cloud_mock_args`` go to the cloud providers' mock (e.g. the Google key that signs token requests),
        which listens on ``cloud_port`` when a test must know it beforehand (a key file's token URL)."""
        self.log_dir = log_dir
        self.parts: list[Managed] = []
        self.ports: dict[str, int] = {}
        policy = load_policy([policy_dir])
        try:
            openai_port, anthropic_port = free_port(), free_port()
            self.parts.append(start_mock_provider(openai_port, ["--openai-key", OPENAI_KEY], "openai", log_dir))
            self.parts.append(start_mock_provider(anthropic_port, ["--anthropic-key", ANTHROPIC_KEY], "anthropic",
                                                  log_dir))
            self.mock_ports = {"openai": openai_port, "anthropic": anthropic_port}
            self._start_cloud_mocks({p.api for p in policy.providers.values()}, cloud_mock_args, log_dir, cloud_port)
            env = {"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY, **CLOUD_ENV,
                   **(processor_env or {})}
            self.processors: list[Managed] = []
            self.processor_ports: list[int] = []
            self.admin_ports: list[int] = []
            self.relay_ports: list[int] = []
            # Replicas share the key that signs fallback state, as a Kubernetes Secret would give them.
            env.setdefault("EXTPROC_SIGNING_KEY", "stack-signing-key-0123456789abcdef")
            self.signing_key = env["EXTPROC_SIGNING_KEY"]
            for replica in range(replicas):
                port, admin, relay = free_port(), free_port(), free_port()
                job_args = ["--jobs-nats", jobs[0], "--jobs-prefix", jobs[1]] if jobs else []
                managed = start_processor([policy_dir], port, log_dir=log_dir, env=env, name=f"processor-{replica}",
                                          extra_args=["--admin", f"127.0.0.1:{admin}", "--relay",
                                                      f"127.0.0.1:{relay}", *job_args, *processor_args])
                self.parts.append(managed)
                self.processors.append(managed)
                self.processor_ports.append(port)
                self.admin_ports.append(admin)
                self.relay_ports.append(relay)
            self.processor, self.processor_port, self.admin_port = (self.processors[0], self.processor_ports[0],
                                                                    self.admin_ports[0])
            mocks = {api: ("127.0.0.1", port) for api, port in self.mock_ports.items()}
            overrides = upstream_overrides or {}
            upstreams = tuple(upstream_for(p, overrides.get(p.name, mocks.get(p.api)))
                              for p in policy.providers.values())
            self.envoy_admin_ports: dict[str, int] = {}
            for service in services:
                port, envoy_admin = free_port(), free_port()
                spec = SidecarSpec(service=service, namespace=NAMESPACE, listen_port=port, admin_port=envoy_admin,
                                   processor=("127.0.0.1", self.processor_port), upstreams=upstreams,
                                   more_processors=tuple(("127.0.0.1", p) for p in self.processor_ports[1:]),
                                   relay=tuple(("127.0.0.1", p) for p in self.relay_ports),
                                   failure_mode_allow=policy.fails_open(service, NAMESPACE))
                self.parts.append(start_envoy(spec, log_dir))
                self.ports[service] = port
                self.envoy_admin_ports[service] = envoy_admin
            self.worker: Managed | None = None
            if jobs is not None:
                # The worker replays each job through its own service's sidecar, as a mesh worker would
                # through the submitting service's identity.
                envoys = [f"--envoy={NAMESPACE}/{s}=http://127.0.0.1:{p}" for s, p in self.ports.items()]
                self.worker = start_worker(jobs, envoys, env, log_dir)
                self.parts.append(self.worker)
        except BaseException:
            self.close()
            raise

    def _start_cloud_mocks(self, apis: set[str], args: Sequence[str], log_dir: Path, port: int | None) -> None:
        """The cloud and in-mesh mocks, only for the provider APIs the policy names (each costs a process)."""
        if apis & set(_CLOUD_APIS):
            port = port or free_port()
            self.parts.append(start_mock_provider(port, [
                "--azure-key", AZURE_KEY, "--gemini-key", GEMINI_KEY, "--aws-access-key-id", AWS_ACCESS_KEY_ID,
                "--aws-secret-access-key", AWS_SECRET_ACCESS_KEY, "--aws-region", AWS_REGION, *args], "cloud", log_dir))
            self.mock_ports.update({api: port for api in _CLOUD_APIS if api in apis})
        if "openai_compatible" in apis:
            port = free_port()
            self.parts.append(start_mock_provider(port, ["--openai-key", COMPATIBLE_KEY], "in-mesh", log_dir))
            self.mock_ports["openai_compatible"] = port

    def base_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def close(self) -> None:
        for part in reversed(self.parts):
            part.stop()
