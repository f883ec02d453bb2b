"""`extproc check sidecars`: a platform team's own Sidecar resources checked against the hosts the
filters need (required_egress_hosts), with Istio's import rules: namespace/dnsName entries, wildcards,
port-bound listeners, the route table of a port, selector and root-namespace defaults."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.cli import main
from extproc.envoy_config.istio import (
    EgressNeed,
    IstioSpec,
    client_sidecar_objects,
    required_egress_hosts,
)
from extproc.envoy_config.sidecar_check import (
    check_sidecar,
    check_sidecars,
    dns_name_matches,
    entry_matches,
    sidecar_objects,
)
from extproc.policy.model import Provider

ISTIO = Path(__file__).resolve().parents[2] / "istio"
PROCESSOR = "ai-extproc.ai-system.svc.cluster.local"
GATEWAY = "ai-egress.ai-system.svc.cluster.local"
PROVIDERS = ("api.openai.com", "api.anthropic.com")  # the sample policies' providers

DECISIONS = EgressNeed("ai-system", PROCESSOR, 50051, "ext_proc decisions")
RELAY = EgressNeed("ai-system", PROCESSOR, 50052, "the fallback relay")
OPENAI = EgressNeed("ai-system", "api.openai.com", 80, "provider openai", vhost=True)
EGRESS_GATEWAY = EgressNeed("ai-system", GATEWAY, 80, "the egress gateway")
NEEDS = [DECISIONS, RELAY, OPENAI, EGRESS_GATEWAY]


def sidecar(namespace: str = "shop", name: str = "default", egress: Any = None, selector: dict[str, str] | None = None,
            mode: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if selector is not None:
        spec["workloadSelector"] = {"labels": selector}
    if egress is not None:
        spec["egress"] = egress
    if mode is not None:
        spec["outboundTrafficPolicy"] = {"mode": mode}
    return {"apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def hidden(obj: dict[str, Any], needs: list[EgressNeed] = NEEDS, namespace: str | None = "shop") -> list[EgressNeed]:
    return [h.need for h in check_sidecar(obj, needs, namespace, "test").hidden]


# ---- the matching rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "host", "matches"), [
    ("*", "api.openai.com", True),
    ("api.openai.com", "api.openai.com", True),
    ("API.OpenAI.com.", "api.openai.com", True),  # DNS names: case and the root dot do not matter
    ("*.openai.com", "api.openai.com", True),
    ("*.openai.com", "eu.api.openai.com", True),  # a suffix, not one label
    ("*.com", "api.openai.com", True),
    ("*openai.com", "api.openai.com", True),  # Istio allows a partial first label: suffix "openai.com"
    ("*.openai.com", "openai.com", False),  # the dot is part of the suffix
    ("*.openai.com", "api.openai.com.evil.example", False),
    ("api.openai.com", "eu.api.openai.com", False),
    ("openai.com", "api.openai.com", False),
    ("ai-extproc", PROCESSOR, False),  # Sidecar hosts are FQDNs: a short name imports nothing
    ("*.ai-system.svc.cluster.local", PROCESSOR, True),
])
def test_dns_name(pattern: str, host: str, matches: bool) -> None:
    assert dns_name_matches(pattern, host) is matches


@pytest.mark.parametrize(("entry", "namespace", "matches"), [
    ("*/*", "shop", True),
    ("*/api.openai.com", "shop", True),  # any namespace
    ("ai-system/*", "shop", True),
    ("ai-system/api.openai.com", "shop", True),
    ("ai-system/*.openai.com", "shop", True),
    ("./api.openai.com", "ai-system", True),  # "." is the namespace the Sidecar takes effect in
    ("./*", "ai-system", True),
    ("./*", "shop", False),
    ("./*", None, False),  # the mesh default checked for no namespace in particular
    ("shop/*", "shop", False),  # the ServiceEntry is in ai-system, whatever the caller's namespace
    ("istio-system/*", "shop", False),
    ("AI-SYSTEM/*", "shop", False),  # namespaces are compared exactly
    ("~/*", "shop", False),  # no namespace at all
    ("~/api.openai.com", "shop", False),
    ("*/api.anthropic.com", "shop", False),
    ("*/*.anthropic.com", "shop", False),
    ("api.openai.com", "shop", False),  # not namespace/dnsName: istiod ignores it
    ("*", "shop", False),
])
def test_entry(entry: str, namespace: str | None, matches: bool) -> None:
    assert entry_matches(entry, OPENAI, namespace) is matches


def test_no_egress_restricts_nothing() -> None:
    for obj in (sidecar(), sidecar(egress=[]), {"kind": "Sidecar", "metadata": {"name": "x", "namespace": "shop"}}):
        verdict = check_sidecar(obj, NEEDS, "shop", "namespace-wide")
        assert verdict.ok and "restricts nothing" in verdict.notes[0]


def test_registry_only_is_expected_not_flagged() -> None:
    verdict = check_sidecar(sidecar(egress=[{"hosts": ["*/*"]}], mode="REGISTRY_ONLY"), NEEDS, "shop", "x")
    assert verdict.ok and verdict.notes == ("outboundTrafficPolicy REGISTRY_ONLY: expected (every needed host is "
                                            "registered)",)


def test_tilde_and_own_namespace_only_hide_everything() -> None:
    assert hidden(sidecar(egress=[{"hosts": ["~/*"]}])) == NEEDS
    assert hidden(sidecar(egress=[{"hosts": ["./*", "istio-system/*"]}])) == NEEDS
    # The same entries in the platform namespace itself: "." is ai-system there.
    assert hidden(sidecar("ai-system", egress=[{"hosts": ["./*"]}]), namespace="ai-system") == []


def test_a_port_bound_listener_imports_on_its_port_only() -> None:
    on_80 = sidecar(egress=[{"port": {"number": 80, "protocol": "HTTP", "name": "http"}, "hosts": ["ai-system/*"]}])
    assert hidden(on_80) == [DECISIONS, RELAY]  # the processor's ports are not 80
    on_50051 = sidecar(egress=[{"port": {"number": 50051, "protocol": "GRPC", "name": "grpc"}, "hosts": ["*/*"]}])
    assert hidden(on_50051) == [RELAY, OPENAI, EGRESS_GATEWAY]
    # An HTTP_PROXY listener is a proxy for every port of its hosts.
    proxy = sidecar(egress=[{"port": {"number": 15080, "protocol": "HTTP_PROXY", "name": "proxy"},
                             "bind": "127.0.0.1", "hosts": ["ai-system/*"]}])
    verdict = check_sidecar(proxy, NEEDS, "shop", "x")
    assert [h.need for h in verdict.hidden] == [OPENAI]  # clusters yes; port 80's routes come from no listener
    assert "no egress listener makes the routes of port 80" in verdict.hidden[0].reason


def test_the_listener_on_a_port_alone_makes_its_routes() -> None:
    """Istio: with listeners on ports and one without, a port's hosts are the listener's on that port."""
    obj = sidecar(egress=[{"port": {"number": 80, "protocol": "HTTP", "name": "http"}, "hosts": ["./*"]},
                          {"hosts": ["ai-system/*", "istio-system/*"]}])
    verdict = check_sidecar(obj, NEEDS, "shop", "x")
    # The provider's virtual host is missing from port 80's routes; the clusters of the processor and the
    # gateway come from every listener (the one without a port imports them).
    assert [h.need for h in verdict.hidden] == [OPENAI]
    assert "egress[0] (port 80) does not import it" in verdict.hidden[0].reason
    assert [(f.listener, f.entries) for f in verdict.fixes] == [(0, ("ai-system/api.openai.com",))]
    fixed = sidecar(egress=[{"port": {"number": 80, "protocol": "HTTP", "name": "http"},
                             "hosts": ["./*", "ai-system/api.openai.com"]},
                            {"hosts": ["ai-system/*", "istio-system/*"]}])
    assert hidden(fixed) == []


def test_listeners_only_on_other_ports_need_a_new_listener() -> None:
    obj = sidecar(egress=[{"port": {"number": 8080, "protocol": "HTTP", "name": "http"}, "hosts": ["*/*"]}])
    verdict = check_sidecar(obj, NEEDS, "shop", "x")
    assert [h.need for h in verdict.hidden] == NEEDS
    assert "egress[0] (port 8080) lists it, but for port 8080 only" in verdict.hidden[0].reason
    (fix,) = verdict.fixes
    assert fix.listener is None and fix.entries == (f"ai-system/{PROCESSOR}", "ai-system/api.openai.com",
                                                    f"ai-system/{GATEWAY}")
    assert fix.lines()[1:3] == ["  - hosts:", f"    - ai-system/{PROCESSOR}"]


def test_exact_and_wildcard_entries() -> None:
    exact = [f"ai-system/{PROCESSOR}", "ai-system/api.openai.com", f"ai-system/{GATEWAY}"]
    assert hidden(sidecar(egress=[{"hosts": exact}])) == []
    assert hidden(sidecar(egress=[{"hosts": ["*/*.svc.cluster.local", "*/*.openai.com"]}])) == []
    assert hidden(sidecar(egress=[{"hosts": ["*/*.svc.cluster.local", "ai-system/*.anthropic.com"]}])) == [OPENAI]
    # Wrong namespace for the ServiceEntry, or a short Service name: hidden.
    assert hidden(sidecar(egress=[{"hosts": ["shop/api.openai.com", "ai-system/ai-extproc", f"*/{GATEWAY}"]}])) == [
        DECISIONS, RELAY, OPENAI]


def test_a_sidecar_that_hides_the_processor_is_reported() -> None:
    obj = sidecar(egress=[{"hosts": ["./*", "istio-system/*", "ai-system/api.openai.com", f"ai-system/{GATEWAY}"]}])
    verdict = check_sidecar(obj, NEEDS, "shop", "namespace-wide")
    assert [h.need for h in verdict.hidden] == [DECISIONS, RELAY]
    assert all("no egress listener imports it (egress[0]: ./*, istio-system/*" in h.reason for h in verdict.hidden)
    assert [(f.listener, f.entries) for f in verdict.fixes] == [(0, (f"ai-system/{PROCESSOR}",))]


# ---- which Sidecar governs whom ------------------------------------------------------------------------------------


def test_selector_namespace_and_root_defaults() -> None:
    sidecars = [
        sidecar("shop", "default", egress=[{"hosts": ["*/*"]}]),
        sidecar("shop", "checkout", egress=[{"hosts": ["./*"]}], selector={"app": "checkout"}),
        sidecar("istio-system", "default", egress=[{"hosts": ["./*", "istio-system/*"]}]),
    ]
    report = check_sidecars(sidecars, NEEDS, namespaces=["shop", "billing"])
    assert [(v.title, v.ok) for v in report.verdicts] == [
        ("shop/default (namespace-wide)", True),
        ("shop/checkout (selector app=checkout)", False),
        ("istio-system/default (mesh default, for billing)", False),  # shop has its own
    ]
    assert report.verdicts[1].notes == ("the pods it selects in shop use it instead of shop/default",)
    assert report.notes == ("billing has no Sidecar of its own: it relies on the mesh default istio-system/default",)
    assert not report.ok
    # Without client namespaces the mesh default is checked once; "./" cannot be resolved.
    (verdict,) = check_sidecars(sidecars[2:], NEEDS).verdicts
    assert verdict.governs == "mesh default: namespaces without a Sidecar of their own"
    assert any("./ entries mean each workload's own namespace" in n for n in verdict.notes)


def test_root_default_resolves_dot_per_namespace() -> None:
    model = EgressNeed("models", "vllm.models.svc.cluster.local", 8000, "in-mesh model server vllm", vhost=True)
    root = sidecar("istio-system", egress=[{"hosts": ["./*", "ai-system/*"]}])
    report = check_sidecars([root], [*NEEDS, model], namespaces=["models", "shop"])
    assert [(v.governs, [h.need for h in v.hidden]) for v in report.verdicts] == [
        ("mesh default, for models", []), ("mesh default, for shop", [model])]


def test_notes_without_any_default_and_for_two_namespace_wide_sidecars() -> None:
    report = check_sidecars([sidecar("shop", "a"), sidecar("shop", "b")], NEEDS, namespaces=["billing"])
    assert report.ok
    assert report.notes == (
        "shop has 2 Sidecars without workloadSelector (a, b): Istio's choice between them is undefined; keep one",
        "billing has no Sidecar of its own and there is no mesh default in istio-system: nothing restricts its "
        "egress")


def test_list_objects_and_other_kinds() -> None:
    plain = sidecar("a")
    documents = [None, {"apiVersion": "v1", "kind": "List", "items": [sidecar("b"), {"kind": "Service"}]},
                 {"apiVersion": "networking.istio.io/v1beta1", "kind": "SidecarList", "items": [sidecar("c")]},
                 plain, {"apiVersion": "example.com/v1", "kind": "Sidecar"}, "text", {"kind": "ConfigMap"}]
    assert [s["metadata"]["namespace"] for s in sidecar_objects(documents)] == ["b", "c", "a"]


# ---- required_egress_hosts and the rendered Sidecars -------------------------------------------------------------


def provider(name: str, url: str) -> Provider:
    return Provider(name=name, api="openai", base_url=url)


def test_required_hosts_follow_the_install_options() -> None:
    openai = provider("openai", "http://api.openai.com/v1")
    assert required_egress_hosts(IstioSpec(providers=(openai,))) == [
        *NEEDS[:3], EgressNeed("ai-system", GATEWAY, 80, "the egress gateway, where provider calls go")]
    # Sidecar mode: no egress gateway; the provider's own virtual host and cluster.
    assert [n.host for n in required_egress_hosts(IstioSpec(providers=(openai,), credentials="sidecar"))] == [
        PROCESSOR, PROCESSOR, "api.openai.com"]
    # An in-mesh model server is a Service in its own namespace, under its FQDN; it needs no gateway.
    vllm = provider("vllm", "http://vllm.models.svc:8000/v1")
    spec = IstioSpec(providers=(vllm,), processor_host="extproc.platform.svc.cluster.local", processor_port=9000)
    assert [(n.namespace, n.host, n.port, n.vhost) for n in required_egress_hosts(spec)] == [
        ("platform", "extproc.platform.svc.cluster.local", 9000, False),
        ("platform", "extproc.platform.svc.cluster.local", 50052, False),
        ("models", "vllm.models.svc.cluster.local", 8000, True)]


@pytest.mark.parametrize("options", [
    {},
    {"credentials": "sidecar"},
    {"provider_namespace": "providers", "processor_host": "extproc.platform.svc.example.internal",
     "cluster_domain": "example.internal"},
    {"extra": provider("vllm", "http://vllm.models.svc:8000/v1")},
])
def test_rendered_sidecars_pass_the_check(options: dict[str, Any]) -> None:
    """client_sidecar_objects and the check use one list: what we render never hides what we need."""
    extra = options.pop("extra", None)
    providers = (provider("openai", "http://api.openai.com/v1"), *([extra] if extra else []))
    spec = IstioSpec(providers=providers, client_namespaces=("shop", "billing"), **options)
    objects = client_sidecar_objects(spec)
    assert len(objects) == 2
    report = check_sidecars(objects, required_egress_hosts(spec), namespaces=spec.client_namespaces)
    assert report.ok and report.notes == ()


# ---- the command ---------------------------------------------------------------------------------------------------


def write(tmp_path: Path, *objects: dict[str, Any]) -> str:
    path = tmp_path / "sidecars.yaml"
    path.write_text(yaml.safe_dump_all(list(objects)))
    return str(path)


def test_checked_in_client_namespaces_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "sidecars", str(ISTIO / "client-namespaces.yaml")]) == 0
    out = capsys.readouterr().out
    assert "ai-demo/default (namespace-wide): ok\n" in out
    assert f"  ai-system/{PROCESSOR}:50051 (ext_proc decisions)\n" in out
    assert "hides" not in out and "missing" not in out


def test_own_namespace_and_istio_system_only_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, sidecar("shop", egress=[{"hosts": ["./*", "istio-system/*"]}], mode="REGISTRY_ONLY"))
    assert main(["check", "sidecars", path]) == 1
    out = capsys.readouterr().out
    assert "shop/default (namespace-wide): hides 5 needed host(s)\n" in out
    for missing in (f"ai-system/{PROCESSOR}:50051 (ext_proc decisions)", f"ai-system/{PROCESSOR}:50052",
                    "ai-system/api.openai.com:80 (provider openai)", "ai-system/api.anthropic.com:80 (provider claude)",
                    f"ai-system/{GATEWAY}:80"):
        assert f"  missing {missing}" in out
    assert ("  fix: add to spec.egress[0].hosts:\n"
            f"    - ai-system/{PROCESSOR}\n"
            "    - ai-system/api.openai.com\n"
            "    - ai-system/api.anthropic.com\n"
            f"    - ai-system/{GATEWAY}\n") in out
    assert "note: outboundTrafficPolicy REGISTRY_ONLY: expected" in out
    # Sidecar mode: no gateway to name.
    assert main(["check", "sidecars", "--credentials", "sidecar", path]) == 1
    assert "ai-egress" not in capsys.readouterr().out


def test_kubectl_list_on_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    listing = {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": [
        sidecar("shop", egress=[{"hosts": ["./*", "istio-system/*", "ai-system/*"]}]),
        sidecar("shop", "batch", egress=[{"hosts": ["./*"]}], selector={"app": "batch"}),
    ]}
    monkeypatch.setattr("sys.stdin", io.StringIO(yaml.safe_dump(listing)))
    assert main(["check", "sidecars", "-", "--client-namespace", "shop"]) == 1
    out = capsys.readouterr().out
    assert "shop/default (namespace-wide): ok\n" in out
    assert "shop/batch (selector app=batch): hides 5 needed host(s)\n" in out
    assert "note: the pods it selects in shop use it instead of shop/default" in out


def test_cluster_domain_changes_the_hosts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exact = sidecar("shop", egress=[{"hosts": [
        "./*", f"ai-system/{PROCESSOR}", f"ai-system/{GATEWAY}", *(f"ai-system/{h}" for h in PROVIDERS)]}])
    path = write(tmp_path, exact)
    assert main(["check", "sidecars", path]) == 0
    capsys.readouterr()
    assert main(["check", "sidecars", "--cluster-domain", "example.internal", path]) == 1
    needed, title, verdict = capsys.readouterr().out.partition("shop/default (namespace-wide): hides 3 needed host(s)")
    assert title and "cluster.local" not in needed
    assert "  ai-system/ai-extproc.ai-system.svc.example.internal:50051 (ext_proc decisions)\n" in needed
    assert "  ai-system/api.openai.com:80 (provider openai)\n" in needed  # external hosts: no cluster domain
    assert "missing ai-system/ai-extproc.ai-system.svc.example.internal:50051 (ext_proc decisions)" in verdict
    assert "missing ai-system/ai-egress.ai-system.svc.example.internal:80" in verdict
    assert "missing ai-system/api.openai.com" not in verdict
    assert ("  fix: add to spec.egress[0].hosts:\n"
            "    - ai-system/ai-extproc.ai-system.svc.example.internal\n"
            "    - ai-system/ai-egress.ai-system.svc.example.internal\n") in verdict


def test_no_sidecars_and_unreadable_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("apiVersion: v1\nkind: List\nitems: []\n")
    assert main(["check", "sidecars", str(empty)]) == 0
    assert "no Sidecar resources: nothing restricts egress" in capsys.readouterr().out
    assert main(["check", "sidecars", str(tmp_path / "absent.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [\n")
    assert main(["check", "sidecars", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_check_without_a_target_still_checks_policy_files(capsys: pytest.CaptureFixture[str]) -> None:
    samples = Path(__file__).resolve().parents[2] / "extproc" / "samples" / "policies"
    assert main(["check", str(samples)]) == 0
    assert main(["--log-level", "WARNING", "check", str(samples)]) == 0
    assert main(["check", "policy", str(samples)]) == 0
    assert capsys.readouterr().out.count("ok: 3 provider(s)") == 3
