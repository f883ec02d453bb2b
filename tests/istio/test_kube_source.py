"""The Kubernetes policy source against a local list/watch API server: sync, updates, status
write-back, per-object rejection that keeps the last good version, dropped watches and 410 Gone."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.cli import sample_policy_dir
from extproc.policy.kube_source import Backoff, KubeOptions, KubePolicySource, api_client
from extproc.policy.store import PolicyStore
from tests.istio.fake_kube import FakeKube, Served

POL, PROV = "aipolicies", "aiproviders"
OPTIONS = KubeOptions(root_namespace="istio-system", provider_namespace="ai-system", watch_timeout_seconds=2,
                      backoff_initial=0.05, backoff_max=0.2)


def eventually(check: Callable[[], Any], timeout: float = 8.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, KeyError):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        time.sleep(0.02)


def sample_spec(service: str) -> dict[str, Any]:
    spec = yaml.safe_load((sample_policy_dir() / f"{service}.yaml").read_text())
    assert isinstance(spec, dict)
    return spec


@dataclass
class Cluster:
    kube: FakeKube
    source: KubePolicySource
    store: PolicyStore

    def models(self, service: str, namespace: str = "demo") -> dict[str, str]:
        found = self.store.current().for_caller(service, namespace)
        return {} if found is None else {m.name: m.model for m in found.proxy.models}

    def status(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        return dict(self.kube.get(plural, namespace, name).get("status") or {})


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    kube = FakeKube()
    openai_key = {"secretRef": {"name": "openai-api-key", "key": "api-key"}}
    anthropic_key = {"secretRef": {"name": "anthropic-api-key", "key": "api-key"}}
    kube.put(PROV, "ai-system", "openai", {"api": "openai", "base_url": "http://api.openai.com/v1",
                                           "credential": openai_key})
    kube.put(PROV, "ai-system", "claude", {"api": "anthropic", "base_url": "http://api.anthropic.com/v1",
                                           "credential": anthropic_key})
    kube.put(PROV, "elsewhere", "rogue", {"api": "openai", "base_url": "http://evil.example/v1"})
    for service in ("user-service", "product-service", "order-service"):
        kube.put(POL, "demo", service, sample_spec(service))
    served = Served(kube)
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("mesh: {unknown_service: deny}\n")
    source = KubePolicySource(api_client(served.url), OPTIONS)
    source.start()
    try:
        assert source.wait_synced(10)
        store = PolicyStore([mesh], source)
        source.attach(store.reload)
        yield Cluster(kube, source, store)
    finally:
        source.stop()
        served.close()


def test_initial_list_serves_every_object_and_reports_accepted(cluster: Cluster) -> None:
    policy = cluster.store.current()
    # 'rogue' lives outside the provider namespace; 'anthropic' is built in (no AIProvider defines it).
    assert sorted(policy.providers) == ["anthropic", "claude", "openai"]
    assert policy.providers["openai"].credential is not None
    assert policy.providers["openai"].credential.file == "/var/run/secrets/ai-providers/openai-api-key/api-key"
    assert cluster.models("user-service") == {"auth_assistant": "gpt-4"}
    assert cluster.models("user-service", "other") == {}  # a namespaced AIPolicy governs its namespace only
    for plural, namespace, name in [(POL, "demo", "order-service"), (PROV, "ai-system", "claude")]:
        assert eventually(lambda p=plural, n=namespace, m=name: cluster.status(p, n, m)) == {
            "state": "Accepted", "reason": "", "observedGeneration": 1, "servingGeneration": 1}
    assert cluster.status(PROV, "elsewhere", "rogue") == {}  # not ours: no status written


def test_watch_applies_changes_and_deletions(cluster: Cluster) -> None:
    spec = sample_spec("user-service")
    spec["ai_proxy"]["models"][0]["model"] = "gpt-4o"
    cluster.kube.put(POL, "demo", "user-service", spec)
    eventually(lambda: cluster.models("user-service") == {"auth_assistant": "gpt-4o"})
    assert eventually(lambda: cluster.status(POL, "demo", "user-service")["observedGeneration"] == 2)
    cluster.kube.delete(POL, "demo", "order-service")
    eventually(lambda: cluster.models("order-service") == {})
    assert cluster.models("product-service")  # the others stay


def test_an_invalid_update_keeps_that_objects_last_good_version(cluster: Cluster) -> None:
    spec = sample_spec("user-service")
    spec["ai_proxy"]["models"][0]["timeout"] = "20000000ms"  # matches the schema's pattern; the model refuses it
    spec["ai_proxy"]["models"][0]["model"] = "gpt-4o"
    cluster.kube.put(POL, "demo", "user-service", spec)
    status = eventually(lambda: cluster.status(POL, "demo", "user-service") if
                        cluster.status(POL, "demo", "user-service")["state"] == "Rejected" else None)
    assert status["observedGeneration"] == 2 and status["servingGeneration"] == 1
    assert status["reason"] == ("spec.ai_proxy.models[0].timeout: must be between 1ms and 10m (600000ms)"
                                "; still serving generation 1")
    assert cluster.models("user-service") == {"auth_assistant": "gpt-4"}  # generation 1 still serves
    # Other objects keep being applied while this one is rejected.
    product = sample_spec("product-service")
    product["ai_proxy"]["models"][1]["model"] = "text-embedding-3-large"
    cluster.kube.put(POL, "demo", "product-service", product)
    eventually(lambda: cluster.models("product-service").get("product_embeddings") == "text-embedding-3-large")
    assert cluster.models("user-service") == {"auth_assistant": "gpt-4"}
    # Fixing it is accepted.
    spec["ai_proxy"]["models"][0]["timeout"] = "20s"
    cluster.kube.put(POL, "demo", "user-service", spec)
    eventually(lambda: cluster.models("user-service") == {"auth_assistant": "gpt-4o"})
    assert eventually(lambda: cluster.status(POL, "demo", "user-service")["state"] == "Accepted")


def test_new_invalid_objects_are_rejected_and_not_served(cluster: Cluster) -> None:
    cluster.kube.put(POL, "demo", "billing", {"service": "billing", "ai_proxy": {"models": [
        {"name": "x", "provider": "gemini", "model": "g"}]}})
    cluster.kube.put(POL, "team-a", "steal", {"service": "order-service", "namespace": "demo", "ai_proxy": {
        "models": [{"name": "y", "provider": "openai", "model": "gpt-4o"}]}})
    cluster.kube.put(POL, "demo", "dup", sample_spec("order-service"))  # a second policy for demo/order-service
    cluster.kube.put(PROV, "ai-system", "both", {"api": "openai", "base_url": "http://x.example/v1", "credential": {
        "env": "K", "secretRef": {"name": "s", "key": "k"}}})
    billing = eventually(lambda: cluster.status(POL, "demo", "billing"))
    assert billing == {"state": "Rejected", "observedGeneration": 1, "reason":
                       "spec.ai_proxy.models[0].provider: unknown provider 'gemini' "
                       "(known: anthropic, claude, openai); not serving"}
    steal = eventually(lambda: cluster.status(POL, "team-a", "steal"))
    assert steal["reason"].startswith("spec.namespace: must be omitted or 'team-a'")
    dup = eventually(lambda: cluster.status(POL, "demo", "dup"))
    assert dup["reason"] == ("spec.service: service 'order-service' already has a policy in "
                             "AIPolicy demo/order-service; not serving")
    both = eventually(lambda: cluster.status(PROV, "ai-system", "both"))
    assert both["reason"].startswith("spec.credential: set exactly one of 'env', 'file' or 'secretRef'")
    assert cluster.models("billing") == {}
    assert cluster.models("order-service") == {"fraud_detector": "claude-3"}
    assert "both" not in cluster.store.current().providers


def test_a_dropped_watch_resumes_from_its_resource_version(cluster: Cluster) -> None:
    lists, watches = cluster.kube.list_count(POL), cluster.kube.watch_count(POL)
    cluster.kube.drop_watches()
    spec = sample_spec("order-service")
    spec["ai_proxy"]["models"][0]["model"] = "claude-4"
    cluster.kube.put(POL, "demo", "order-service", spec)
    eventually(lambda: cluster.models("order-service") == {"fraud_detector": "claude-4"})
    assert cluster.kube.watch_count(POL) > watches
    assert cluster.kube.list_count(POL) == lists  # resumed, not relisted
    resumed = [r for r in cluster.kube.requests if r.plural == POL and r.watch][-1]
    assert resumed.resource_version is not None and int(resumed.resource_version) > 100


def test_410_gone_relists(cluster: Cluster) -> None:
    lists = cluster.kube.list_count(POL)
    spec = sample_spec("order-service")
    spec["ai_proxy"]["models"][0]["model"] = "claude-5"
    cluster.kube.put(POL, "demo", "order-service", spec)
    cluster.kube.delete(POL, "demo", "product-service")
    cluster.kube.compact()  # history is gone: every resourceVersion the client has is now too old...
    cluster.kube.drop_watches()  # ...so resuming the watch gets 410 Gone, and only a relist recovers
    eventually(lambda: cluster.kube.list_count(POL) > lists)
    eventually(lambda: cluster.models("order-service") == {"fraud_detector": "claude-5"})
    eventually(lambda: cluster.models("product-service") == {})
    later = sample_spec("user-service")
    later["ai_proxy"]["models"][0]["model"] = "gpt-5"
    cluster.kube.put(POL, "demo", "user-service", later)  # and watching resumes after the relist
    eventually(lambda: cluster.models("user-service") == {"auth_assistant": "gpt-5"})


def test_an_unreachable_api_is_retried_until_it_answers(tmp_path: Path) -> None:
    kube = FakeKube()
    kube.put(POL, "istio-system", "mesh-user", sample_spec("user-service"))
    kube.put(PROV, "ai-system", "openai", {"api": "openai", "base_url": "http://api.openai.com/v1"})
    served = Served(kube)
    port = served.port
    served.close()  # nothing listens there now
    source = KubePolicySource(api_client(f"http://127.0.0.1:{port}"), OPTIONS)
    source.start()
    try:
        assert not source.wait_synced(0.5)
        revived = Served(kube, port=port)
        try:
            assert source.wait_synced(10)
            store = PolicyStore([], source)  # no files at all: providers and policies from the API only
            # In the root namespace a policy without spec.namespace applies to that service everywhere.
            found = store.current().for_caller("user-service", "any-namespace")
            assert found is not None and found.allowed == ("auth_assistant",)
        finally:
            source.stop()
            revived.close()
    finally:
        source.stop()


def test_backoff_grows_to_its_ceiling_and_resets() -> None:
    backoff = Backoff(0.5, 4.0, rand=lambda: 1.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.next() == 0.5
    assert Backoff(0.5, 4.0, rand=lambda: 0.0).next() == 0.25  # jitter: half to all of the ceiling


def test_a_mesh_file_change_re_judges_objects_and_updates_their_status(cluster: Cluster, tmp_path: Path) -> None:
    """Files (the mesh ConfigMap) and objects are validated together: a provider added to the file
    makes a policy that referred to it acceptable, with no Kubernetes event involved."""
    cluster.kube.put(POL, "demo", "search", {"service": "search", "ai_proxy": {"models": [
        {"name": "ranker", "provider": "vllm", "model": "llama-3"}]}})
    eventually(lambda: cluster.status(POL, "demo", "search").get("state") == "Rejected")
    (tmp_path / "mesh.yaml").write_text("mesh: {unknown_service: deny}\nproviders:\n- name: vllm\n  api: openai\n"
                                        "  base_url: http://vllm.models.svc.cluster.local:8000/v1\n")
    assert cluster.store.reload()  # what the file watcher does when the ConfigMap changes
    assert cluster.models("search") == {"ranker": "llama-3"}
    assert eventually(lambda: cluster.status(POL, "demo", "search").get("state") == "Accepted")


def test_serve_kubernetes_is_not_ready_before_the_first_list(tmp_path: Path) -> None:
    """The processor listens (so its gRPC probes pass) only once both kinds are listed."""
    import socket
    import sys

    from devtools.launch import Managed, free_port, wait_for_port

    kube = FakeKube()
    kube.put(PROV, "ai-system", "openai", {"api": "openai", "base_url": "http://api.openai.com/v1"})
    kube.put(POL, "demo", "user-service", sample_spec("user-service"))
    api_port, grpc_port = free_port(), free_port()
    processor = Managed("processor", [sys.executable, "-m", "extproc", "serve-kubernetes", "--listen",
                                      f"127.0.0.1:{grpc_port}", "--kube-api", f"http://127.0.0.1:{api_port}"],
                        log_dir=tmp_path).start()
    try:
        # The API server is not there yet: the processor is up and retrying, but not listening.
        eventually(lambda: "list/watch interrupted" in processor.log_text(), timeout=15)
        assert processor.process is not None and processor.process.poll() is None
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", grpc_port), timeout=0.2):
            pass
        served = Served(kube, port=api_port)
        try:
            wait_for_port(grpc_port, 15, processor.process)
            eventually(lambda: kube.get(POL, "demo", "user-service").get("status", {}).get("state") == "Accepted")
        finally:
            processor.stop(timeout=5)
            served.close()
    finally:
        processor.stop(timeout=5)
    assert "listed 1 AIPolicy object(s)" in processor.log_text()
