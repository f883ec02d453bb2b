"""The Istio install, run here without a cluster: the checked-in EnvoyFilter applied to Envoy
bootstraps shaped like Istio sidecars (one per sample service), the processor in
``serve-kubernetes`` mode reading the checked-in AIProvider and sample AIPolicy objects from a local
list/watch API server, provider keys from mounted-Secret-style files, and the official SDKs calling
``http://api.openai.com`` / ``http://api.anthropic.com`` unmodified (an HTTP proxy stands in for the
iptables redirect into the sidecar)."""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml

from devtools.launch import LaunchError, Managed, find_envoy, free_port, start_mock_provider, wait_for_port
from extproc.envoy_config.bootstrap import SidecarSpec, render_bootstrap, upstream_for
from extproc.envoy_config.filter import FILTER_NAME, ext_proc_filter
from extproc.envoy_config.istio import ProviderHost, provider_calls_only
from extproc.envoy_config.versions import DEFAULT_ISTIO, envoy_for_istio
from extproc.policy.model import Provider
from tests.istio.fake_kube import FakeKube, Served
from tests.istio.sidecar import PROCESSOR_CLUSTER, PROCESSOR_HOST, apply_envoy_filter, istio_outbound_bootstrap

ISTIO = Path(__file__).resolve().parents[2] / "istio"
OPENAI_KEY, ANTHROPIC_KEY, OTHER_KEY = "sk-mesh-openai", "sk-ant-mesh", "sk-other-service"
OPT_IN = {"ai.extproc.io/enabled": "true"}
SERVICES = ("user-service", "product-service", "order-service")
pytestmark = pytest.mark.e2e


@functools.cache
def sidecar_mode() -> Path:
    """The install rendered in developer mode (keys added by the sidecar, no egress gateway): these tests
    run sidecars without a gateway; gateway mode has its own in test_trust_manifests.py."""
    from extproc.cli import main

    directory = Path(tempfile.mkdtemp(prefix="istio-sidecar-mode-"))
    assert main(["render", "istio", "--credentials", "sidecar", "-o", str(directory)]) == 0
    return directory


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def envoy_filter() -> dict[str, Any]:
    main, _ = load_all(sidecar_mode() / "envoyfilter.yaml")
    return main


def envoy_filters() -> list[dict[str, Any]]:
    """Both EnvoyFilters, in the order istiod applies them (by priority)."""
    return sorted(load_all(sidecar_mode() / "envoyfilter.yaml"), key=lambda f: f["spec"].get("priority", 0))


@dataclass
class Mesh:
    kube: FakeKube
    proxies: dict[str, str]  # workload → its sidecar's address as an HTTP proxy
    admins: dict[str, int]  # workload → its sidecar's admin port
    mocks: dict[str, int]
    processor: Managed
    tmp: Path

    def openai(self, workload: str) -> openai.OpenAI:
        return openai.OpenAI(base_url="http://api.openai.com/v1", api_key="app-holds-no-real-key", max_retries=0,
                             http_client=openai.DefaultHttpxClient(proxy=self.proxies[workload]))

    def anthropic(self, workload: str) -> anthropic.Anthropic:
        proxy = anthropic.DefaultHttpxClient(proxy=self.proxies[workload])
        return anthropic.Anthropic(base_url="http://api.anthropic.com", api_key="app-holds-no-real-key",
                                   max_retries=0, http_client=proxy)

    def last_request(self, mock: str) -> dict[str, Any]:
        records = httpx.get(f"http://127.0.0.1:{self.mocks[mock]}/_mock/requests").json()
        assert records, f"the {mock} mock received nothing"
        return dict(records[-1])


def write_secret(root: Path, name: str, value: str) -> None:
    # As the kubelet mounts a Secret: <mount>/<key>, a symlink into a ..data directory.
    directory = root / name
    (directory / "..data").mkdir(parents=True)
    (directory / "..data" / "api-key").write_text(value + "\n")
    (directory / "api-key").symlink_to("..data/api-key")


def patched_bootstrap(workload: str, labels: dict[str, str], ports: dict[str, int], mocks: dict[str, int]
                      ) -> tuple[dict[str, Any], int]:
    base = istio_outbound_bootstrap(
        service=workload, namespace="ai-demo", labels=labels, listen_port=ports["listen"],
        admin_port=ports["admin"], processor_port=ports["processor"],
        hosts={"api.openai.com": mocks["openai"], "api.anthropic.com": mocks["anthropic"],
               "reports.ai-demo.svc.cluster.local": mocks["other"]}, relay_port=ports.get("relay"))
    applied = 0
    for envoy_filter_object in envoy_filters():
        base, count = apply_envoy_filter(base, envoy_filter_object)
        applied += count
    return base, applied


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    try:
        envoy = find_envoy()
    except LaunchError as exc:
        from tests.conftest import missing

        missing(str(exc))
        raise
    tmp = tmp_path_factory.mktemp("mesh")
    parts: list[Managed] = []
    kube = FakeKube()
    for obj in [*load_all(ISTIO / "providers.yaml"), *load_all(ISTIO / "samples" / "policies.yaml")]:
        if obj["kind"] in ("AIProvider", "AIPolicy"):
            plural = "aiproviders" if obj["kind"] == "AIProvider" else "aipolicies"
            kube.put(plural, obj["metadata"]["namespace"], obj["metadata"]["name"], obj["spec"])
    served = Served(kube)
    secrets = tmp / "secrets"
    write_secret(secrets, "openai-api-key", OPENAI_KEY)
    write_secret(secrets, "claude-api-key", ANTHROPIC_KEY)
    try:
        mocks = {"openai": free_port(), "anthropic": free_port(), "other": free_port()}
        parts.append(start_mock_provider(mocks["openai"], ["--openai-key", OPENAI_KEY], "openai", tmp))
        parts.append(start_mock_provider(mocks["anthropic"], ["--anthropic-key", ANTHROPIC_KEY], "anthropic", tmp))
        parts.append(start_mock_provider(mocks["other"], ["--openai-key", OTHER_KEY], "other", tmp))
        processor_port, relay_port = free_port(), free_port()
        processor = Managed("processor", [
            sys.executable, "-m", "extproc", "serve-kubernetes", "--listen", f"127.0.0.1:{processor_port}",
            "--relay", f"127.0.0.1:{relay_port}",
            "--kube-api", served.url, "--policy", str(sidecar_mode() / "mesh.yaml"), "--secrets-dir", str(secrets),
            "--root-namespace", "istio-system", "--provider-namespace", "ai-system", "--grace", "1",
        ], log_dir=tmp).start()
        parts.append(processor)
        try:
            wait_for_port(processor_port, 20, processor.process)
        except LaunchError as exc:
            raise LaunchError(f"{exc}\n{processor.log_text()}") from exc
        proxies, admins = {}, {}
        workloads = {**{s: OPT_IN for s in SERVICES}, "legacy-batch": {},  # legacy-batch did not opt in
                     "reporting": {**OPT_IN, "ai.extproc.io/on-processor-failure": "open"}}
        for workload, labels in workloads.items():
            ports = {"listen": free_port(), "admin": free_port(), "processor": processor_port, "relay": relay_port}
            config, _ = patched_bootstrap(workload, labels, ports, mocks)
            path = tmp / f"envoy-{workload}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            proxy = Managed(f"envoy-{workload}", [envoy, "-c", str(path), "--log-level", "warn", "--concurrency", "1",
                                                  "--base-id", str(ports["admin"])], log_dir=tmp).start()
            parts.append(proxy)
            wait_for_port(ports["listen"], 20, proxy.process)
            proxies[workload] = f"http://127.0.0.1:{ports['listen']}"
            admins[workload] = ports["admin"]
        yield Mesh(kube, proxies, admins, mocks, processor, tmp)
    finally:
        for part in reversed(parts):
            part.stop(timeout=5)
        served.close()


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


# ---- the patched configuration -----------------------------------------------------------------


def test_patches_land_where_istio_would_put_them() -> None:
    ports = {"listen": 10000, "admin": 10001, "processor": 10002}
    mocks = {"openai": 1, "anthropic": 2, "other": 3}
    config, applied = patched_bootstrap("user-service", OPT_IN, ports, mocks)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    # Ours come after Istio's own filters and right before the router, in the bootstrap's order.
    # (the standalone bootstrap rendered for the Envoy of the release the install is rendered for)
    bootstrap = render_bootstrap(SidecarSpec(service="s", namespace="n", listen_port=1, admin_port=2,
                                             processor=("127.0.0.1", 3), upstreams=(),
                                             envoy=envoy_for_istio(DEFAULT_ISTIO)))
    standalone = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ours = [f["name"] for f in standalone["http_filters"][:-1]]
    assert names == ["envoy.filters.http.grpc_stats", "envoy.filters.http.fault", "envoy.filters.http.cors",
                     *ours, "envoy.filters.http.router"]
    inserted = {f["name"]: f for f in hcm["http_filters"] if f["name"] in ours}
    assert all(f.pop("disabled") is True for f in inserted.values())  # off unless a provider vhost turns it on
    assert inserted[FILTER_NAME] == ext_proc_filter(cluster_name=PROCESSOR_CLUSTER, authority=PROCESSOR_HOST,
                                                    envoy=envoy_for_istio(DEFAULT_ISTIO))
    # Every filter is the bootstrap's own filter, only pointed at the processor's Istio cluster.
    for name, patched in inserted.items():
        (plain,) = [f for f in standalone["http_filters"] if f["name"] == name]
        text = yaml.safe_dump(plain).replace("ai-extproc.ai-system.svc.cluster.local", PROCESSOR_HOST)
        assert yaml.safe_dump(patched) == text.replace("cluster_name: ai-extproc", f"cluster_name: {PROCESSOR_CLUSTER}")
    vhosts = {v["name"]: v for v in hcm["route_config"]["virtual_hosts"]}
    for name in ("api.openai.com:80", "api.anthropic.com:80"):
        assert set(vhosts[name]["typed_per_filter_config"]) == set(ours)
        assert vhosts[name]["response_headers_to_add"] == standalone["route_config"]["response_headers_to_add"]
    for name in ("reports.ai-demo.svc.cluster.local:80", "allow_any"):
        assert "typed_per_filter_config" not in vhosts[name]
    providers = [ProviderHost("api.openai.com", 80), ProviderHost("api.anthropic.com", 80)]
    assert hcm["local_reply_config"] == provider_calls_only(standalone["local_reply_config"], providers)
    assert applied == len(envoy_filter()["spec"]["configPatches"])  # every patch matched something
    assert inserted[FILTER_NAME]["typed_config"]["failure_mode_allow"] is False  # not labelled: fails closed
    # Fallback: each provider route targets its [provider, relay] aggregate and retries only calls
    # that carry a fallback chain, as the standalone sidecar does.
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for host in ("api.openai.com", "api.anthropic.com"):
        (route,) = vhosts[f"{host}:80"]["routes"]
        assert route["route"]["cluster"] == f"ai-failover|outbound|80||{host}"
        assert clusters[route["route"]["cluster"]]["cluster_type"]["typed_config"]["clusters"] == [
            f"outbound|80||{host}", "outbound|50052||ai-extproc.ai-system.svc.cluster.local"]
        policy = route["route"]["retry_policy"]
        assert policy["retriable_request_headers"] == [{"name": "x-ai-fallback", "present_match": True}]
        assert policy["retry_priority"]["name"] == "envoy.retry_priorities.previous_priorities"
        # Istio's own retry host predicate survives the MERGE, and the standalone sidecar's route
        # carries the very same retry policy: fallback is tested under the mesh's retry settings.
        assert [p["name"] for p in policy["retry_host_predicate"]] == ["envoy.retry_host_predicates.previous_hosts"]
        assert policy["host_selection_retry_max_attempts"] == "5"
        assert policy == standalone_retry_policy()
    assert vhosts["reports.ai-demo.svc.cluster.local:80"]["routes"][0]["route"]["cluster"] == (
        "outbound|80||reports.ai-demo.svc.cluster.local")  # other services keep Istio's own route
    labelled, _ = patched_bootstrap("reporting", {**OPT_IN, "ai.extproc.io/on-processor-failure": "open"}, ports,
                                    mocks)
    labelled_hcm = labelled["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (ext_proc,) = [f for f in labelled_hcm["http_filters"] if f["name"] == FILTER_NAME]
    assert ext_proc["typed_config"]["failure_mode_allow"] is True
    _, unselected = patched_bootstrap("legacy-batch", {}, ports, mocks)
    assert unselected == 0


def standalone_retry_policy() -> dict[str, Any]:
    """The retry policy of a provider route in the standalone sidecar (envoy/), with fallback on."""
    provider = Provider(name="openai", api="openai", base_url="http://api.openai.com/v1")
    bootstrap = render_bootstrap(SidecarSpec(service="s", namespace="n", listen_port=1, admin_port=2,
                                             processor=("127.0.0.1", 3), relay=(("127.0.0.1", 4),),
                                             upstreams=(upstream_for(provider, ("127.0.0.1", 5)),)))
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (vhost,) = [v for v in hcm["route_config"]["virtual_hosts"] if v["name"] != "no_ai_route"]
    return dict(vhost["routes"][0]["route"]["retry_policy"])


def test_envoy_validates_the_patched_sidecar(tmp_path: Path) -> None:
    try:
        envoy = find_envoy()
    except LaunchError as exc:
        from tests.conftest import missing

        missing(str(exc))
        raise
    config, _ = patched_bootstrap("user-service", OPT_IN, {"listen": 10000, "admin": 10001, "processor": 10002},
                                  {"openai": 10003, "anthropic": 10004, "other": 10005})
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(config))
    run = subprocess.run([envoy, "--mode", "validate", "-c", str(good)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    # The same check fails for a per-vhost config naming a filter type Envoy does not know.
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    vhost = next(v for v in hcm["route_config"]["virtual_hosts"] if v["name"] == "api.openai.com:80")
    vhost["typed_per_filter_config"][FILTER_NAME]["@type"] = "type.googleapis.com/envoy.config.route.v3.NoSuchThing"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    run = subprocess.run([envoy, "--mode", "validate", "-c", str(bad)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0


# ---- traffic ------------------------------------------------------------------------------------


def test_openai_sdk_call_is_governed_by_the_callers_aipolicy(mesh: Mesh) -> None:
    raw = mesh.openai("user-service").chat.completions.with_raw_response.create(
        model="auth_assistant", messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().model == "gpt-4"
    assert (raw.headers["x-ai-provider"], raw.headers["x-ai-model"]) == ("openai", "gpt-4")
    seen = mesh.last_request("openai")
    assert seen["host"] == "api.openai.com"
    assert seen["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"  # from the mounted Secret, not the app


def test_anthropic_sdk_call_and_stream(mesh: Mesh) -> None:
    client = mesh.anthropic("order-service")
    raw = client.messages.with_raw_response.create(model="fraud_detector", max_tokens=16,
                                                   messages=[{"role": "user", "content": "check order 42"}])
    assert raw.parse().model == "claude-3"
    assert raw.headers["x-ai-provider"] == "claude"
    with client.messages.stream(model="fraud_detector", max_tokens=16,
                                messages=[{"role": "user", "content": "stream it"}]) as stream:
        text = "".join(stream.text_stream)
    assert text
    assert mesh.last_request("anthropic")["headers"]["x-api-key"] == ANTHROPIC_KEY


def test_cross_provider_fallback_in_the_istio_sidecar(mesh: Mesh) -> None:
    """order-service's Claude fails; the call is answered by OpenAI within the same call, in Anthropic format."""
    # The running sidecar's route has Istio's default retry host predicate next to ours.
    dump = httpx.get(f"http://127.0.0.1:{mesh.admins['order-service']}/config_dump").text
    assert dump.count("envoy.retry_host_predicates.previous_hosts") >= 3  # every port-80 vhost, Istio's way
    assert "envoy.retry_priorities.previous_priorities" in dump
    raw = mesh.anthropic("order-service").messages.with_raw_response.create(
        model="fraud_detector", max_tokens=16, messages=[{"role": "user", "content": "check order 43"}],
        extra_headers={"x-mock-only": "anthropic", "x-mock-status": "529"})
    message = raw.parse()
    assert message.content[0].text == "mock reply from gpt-4o: check order 43"  # type: ignore[union-attr]
    assert raw.headers["x-ai-fallback-hops"] == "claude/claude-3=upstream_error, openai/gpt-4o"
    sent = mesh.last_request("openai")
    assert sent["body"]["model"] == "gpt-4o" and sent["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"


def test_ab_split_and_refusals(mesh: Mesh) -> None:
    client = mesh.openai("product-service")
    variants = set()
    for user in range(12):
        raw = client.chat.completions.with_raw_response.create(
            model="recommendation_engine", messages=[{"role": "user", "content": "bike"}],
            extra_headers={"x-user-id": f"user-{user}"})
        variants.add((raw.headers["x-ai-variant"], raw.parse().model))
    assert variants == {("control", "gpt-4-turbo"), ("candidate", "gpt-4o")}
    with pytest.raises(openai.PermissionDeniedError, match="auth_assistant"):
        mesh.openai("user-service").chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


def test_other_hosts_and_workloads_bypass_the_processor(mesh: Mesh) -> None:
    # A non-AI service on the same port-80 listener: gpt-4o is not in user-service's policy, yet the
    # call goes through untouched with the app's own key, because the filter is off on that vhost.
    other = openai.OpenAI(base_url="http://reports.ai-demo.svc.cluster.local/v1", api_key=OTHER_KEY, max_retries=0,
                          http_client=openai.DefaultHttpxClient(proxy=mesh.proxies["user-service"]))
    raw = other.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert raw.parse().model == "gpt-4o"
    assert "x-ai-provider" not in raw.headers
    # A workload without the opt-in label: no filter at all, so its dummy key reaches the provider.
    with pytest.raises(openai.AuthenticationError):
        mesh.openai("legacy-batch").chat.completions.create(model="auth_assistant",
                                                           messages=[{"role": "user", "content": "x"}])


def test_envoy_errors_are_json_for_ai_calls_only(mesh: Mesh) -> None:
    """The HCM-wide local reply mappers are narrowed to calls to provider hosts."""
    with pytest.raises(openai.InternalServerError) as ai_call:
        mesh.openai("user-service").chat.completions.create(
            model="auth_assistant", messages=[{"role": "user", "content": "x"}], extra_headers={"x-mock-reset": "1"})
    assert ai_call.value.status_code == 503
    assert ai_call.value.response.headers["content-type"] == "application/json"
    assert ai_call.value.response.json()["error"]["type"] == "server_error"
    other = httpx.post("http://reports.ai-demo.svc.cluster.local/v1/chat/completions", json={"model": "m"},
                       headers={"x-mock-reset": "1", "authorization": f"Bearer {OTHER_KEY}"},
                       proxy=mesh.proxies["user-service"])
    assert other.status_code == 503
    assert other.headers["content-type"] == "text/plain"  # Envoy's usual reply, untouched
    assert other.text.startswith("upstream connect error or disconnect/reset before headers")


def test_an_unreachable_processor_fails_closed_with_json(mesh: Mesh) -> None:
    """A sidecar whose processor cluster has no live endpoint: the call is refused, never sent."""
    ports = {"listen": free_port(), "admin": free_port(), "processor": free_port()}  # nothing on that port
    config, _ = patched_bootstrap("user-service", OPT_IN, ports, mesh.mocks)
    path = mesh.tmp / "envoy-no-processor.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proxy = Managed("envoy-no-processor", [find_envoy(), "-c", str(path), "--log-level", "warn", "--concurrency", "1",
                                           "--base-id", str(ports["admin"])], log_dir=mesh.tmp).start()
    try:
        wait_for_port(ports["listen"], 20, proxy.process)
        before = len(httpx.get(f"http://127.0.0.1:{mesh.mocks['openai']}/_mock/requests").json())
        response = httpx.post("http://api.openai.com/v1/chat/completions", proxy=f"http://127.0.0.1:{ports['listen']}",
                              json={"model": "auth_assistant", "messages": []})
    finally:
        proxy.stop(timeout=5)
    assert response.status_code >= 500
    assert response.headers["content-type"] == "application/json"
    assert "processor could not be reached" in response.json()["error"]["message"]
    assert len(httpx.get(f"http://127.0.0.1:{mesh.mocks['openai']}/_mock/requests").json()) == before


def test_an_aipolicy_change_reaches_the_sidecars_and_its_status(mesh: Mesh) -> None:
    spec = mesh.kube.get("aipolicies", "ai-demo", "user-service")["spec"]
    spec["ai_proxy"]["models"][0]["model"] = "gpt-4o-mini"
    mesh.kube.put("aipolicies", "ai-demo", "user-service", spec)

    def served() -> bool:
        raw = mesh.openai("user-service").chat.completions.with_raw_response.create(
            model="auth_assistant", messages=[{"role": "user", "content": "hi"}])
        return raw.headers["x-ai-model"] == "gpt-4o-mini"

    eventually(served)
    status = mesh.kube.get("aipolicies", "ai-demo", "user-service")["status"]
    assert status == {"state": "Accepted", "reason": "", "observedGeneration": 2, "servingGeneration": 2}
    # An invalid edit is refused in the status and the previous generation keeps serving.
    spec["ai_proxy"]["models"][0]["provider"] = "gemini"
    mesh.kube.put("aipolicies", "ai-demo", "user-service", spec)
    eventually(lambda: mesh.kube.get("aipolicies", "ai-demo", "user-service")["status"]["state"] == "Rejected")
    raw = mesh.openai("user-service").chat.completions.with_raw_response.create(
        model="auth_assistant", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-ai-model"] == "gpt-4o-mini"
    for name in ("openai", "claude"):
        assert mesh.kube.get("aiproviders", "ai-system", name)["status"]["state"] == "Accepted"


def test_sample_providers_match_the_sample_policy_files() -> None:
    from extproc.cli import sample_policy_dir
    from extproc.policy.loader import load_policy

    rendered = {o["metadata"]["name"]: o["spec"] for o in load_all(ISTIO / "providers.yaml")
                if o["kind"] == "AIProvider"}
    from extproc.policy.model import BUILTIN_PROVIDERS

    for provider in load_policy([sample_policy_dir()]).providers.values():
        assert isinstance(provider, Provider)
        if any(provider is builtin for builtin in BUILTIN_PROVIDERS):
            continue  # built into the processor, not installed as an object
        assert rendered[provider.name]["base_url"] == provider.base_url
        assert upstream_for(provider).cluster_name == f"outbound|80||{provider.authority}"



def started(mesh: Mesh, workload: str) -> dict[str, int]:
    """ext_proc streams started per filter (stat prefix) on a workload's sidecar."""
    text = httpx.get(f"http://127.0.0.1:{mesh.admins[workload]}/stats?filter=ext_proc.*streams_started").text
    return {line.split(".")[-2]: int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line}


def test_response_side_usage_filter_runs_per_provider_vhost(mesh: Mesh) -> None:
    """The usage filter (composite, also disabled in the chain) is switched on by the provider vhost:
    product-service's token limit makes the processor ask for the response's usage."""
    before = started(mesh, "product-service")
    client = mesh.openai("product-service")
    raw = client.chat.completions.with_raw_response.create(
        model="recommendation_engine", messages=[{"role": "user", "content": "bike"}],
        extra_headers={"x-user-id": "u1"})
    assert raw.headers["x-ratelimit-limit-tokens"] == "200000"
    with client.chat.completions.create(model="recommendation_engine", stream=True,
                                        messages=[{"role": "user", "content": "bike"}]) as stream:
        chunks = list(stream)
    assert chunks and all(not c.usage for c in chunks)  # the usage chunk we asked for on its behalf is stripped
    after = started(mesh, "product-service")
    assert after["ai_extproc"] - before.get("ai_extproc", 0) == 2
    assert after["ai_usage_observe"] - before.get("ai_usage_observe", 0) == 1
    assert after["ai_usage_strip"] - before.get("ai_usage_strip", 0) == 1
    # Not on other hosts: no stream of any of our filters for a call to a non-AI service.
    other = openai.OpenAI(base_url="http://reports.ai-demo.svc.cluster.local/v1", api_key=OTHER_KEY, max_retries=0,
                          http_client=openai.DefaultHttpxClient(proxy=mesh.proxies["product-service"]))
    other.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert started(mesh, "product-service") == after
