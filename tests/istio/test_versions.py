"""The install on every supported Istio release, each checked with the Envoy minor that release ships.

istiod drops an EnvoyFilter field its Envoy does not know with only a warning, so a rendering is
checked where it would run: the patches applied to an Istio-shaped sidecar and egress gateway, then
``envoy --mode validate`` by that release's own Envoy binary (``make setup`` installs one per release
into .tools/envoy-MAJOR.MINOR), and calls through the gateway install on each of them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import yaml

from devtools.launch import LaunchError, envoy_version, find_release_envoy
from extproc.cli import main
from extproc.envoy_config.bootstrap import SidecarSpec, render_bootstrap, upstream_for
from extproc.envoy_config.versions import (
    CONTENT_LENGTH_AFTER_REWRITE,
    DEFAULT_ISTIO,
    ISTIO_ENVOY,
    SUPPORTED_ISTIO,
    EnvoyVersion,
    envoy_for_istio,
)
from extproc.policy.loader import load_policy
from tests.istio.sidecar import apply_envoy_filter, istio_outbound_bootstrap
from tests.istio.test_manifests import kustomize
from tests.istio.test_trust_manifests import (
    ISTIO,
    OPENAI_KEY,
    OPT_IN,
    PROVIDER_HOSTS,
    Key,
    apply_gateway_filter,
    by_key,
    gateway_bootstrap,
    make_certs,
    mock_requests,
    running_gateway_mesh,
    spiffe,
)

REPO = ISTIO.parent
OLDEST, NEWEST = SUPPORTED_ISTIO[0], SUPPORTED_ISTIO[-1]


def release_envoy(release: str) -> str:
    try:
        binary = find_release_envoy(ISTIO_ENVOY[release])
    except LaunchError as exc:
        from tests.conftest import missing

        missing(str(exc))
        raise
    assert envoy_version(binary) == ISTIO_ENVOY[release]
    return binary


def render(directory: Path, release: str, *options: str) -> Path:
    assert main(["render", "istio", "--istio-version", release, *options, "-o", str(directory)]) == 0
    return directory


def envoy_filters(directory: Path) -> list[dict[str, Any]]:
    """The rendered EnvoyFilters, in the order istiod applies them (by priority)."""
    documents = [d for d in yaml.safe_load_all((directory / "envoyfilter.yaml").read_text()) if d]
    return sorted(documents, key=lambda f: f["spec"].get("priority", 0))


def validate(binary: str, config: dict[str, Any], path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return subprocess.run([binary, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)


def patched_sidecar(directory: Path) -> dict[str, Any]:
    config = istio_outbound_bootstrap(service="user-service", namespace="ai-demo", labels=OPT_IN, listen_port=10000,
                                      admin_port=10001, processor_port=10002, relay_port=10003,
                                      hosts={host: 10004 for host in PROVIDER_HOSTS.values()})
    applied = 0
    for envoy_filter in envoy_filters(directory):
        config, count = apply_envoy_filter(config, envoy_filter)
        applied += count
    assert applied > 0
    return config


def install_for(release: str, directory: Path) -> dict[Key, dict[str, Any]]:
    """The checked-in install with the EnvoyFilters rendered for ``release`` (nothing else depends on it)."""
    install = by_key(kustomize(ISTIO))
    for obj in yaml.safe_load_all((render(directory, release) / "envoyfilter.yaml").read_text()):
        install[("EnvoyFilter", obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj
    return install


def test_the_matrix_is_one_list() -> None:
    """versions.py names the releases; the Makefile installs each one's Envoy; the README states them."""
    makefile = (REPO / "Makefile").read_text()
    (line,) = re.findall(r"^ISTIO_ENVOYS := (.+)$", makefile, re.M)
    installed = {EnvoyVersion.parse(v) for v in line.split()}
    assert installed == set(ISTIO_ENVOY.values())
    readme = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| Istio (1\.\d+) \| Envoy (1\.\d+) \|", readme, re.M))
    assert rows == {release: str(envoy) for release, envoy in ISTIO_ENVOY.items()}
    assert DEFAULT_ISTIO == OLDEST  # the checked-in install works on every supported release


def test_an_unsupported_release_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for release in ("1.27", "1.32.0", "latest"):
        assert main(["render", "istio", "--istio-version", release, "-o", str(tmp_path)]) == 1
        error = capsys.readouterr().err
        assert "--istio-version" in error or f"{OLDEST} to {NEWEST}" in error
    assert envoy_for_istio("1.29.4") == envoy_for_istio("v1.29") == EnvoyVersion(1, 37)


def test_only_the_envoyfilters_depend_on_the_release(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = render(tmp_path / "old", OLDEST), render(tmp_path / "new", NEWEST)
    notes = capsys.readouterr().err
    def body(path: Path) -> str:  # the header names the command, --istio-version included
        return path.read_text().split("\n", 1)[1]

    for path in sorted(old.rglob("*.yaml")):
        if path.name != "envoyfilter.yaml":
            assert body(path) == body(new / path.relative_to(old)), path.name
    old_text, new_text = (old / "envoyfilter.yaml").read_text(), (new / "envoyfilter.yaml").read_text()
    assert "allow_content_length_header: true" not in old_text and "allow_content_length_header: true" in new_text
    # What is left out is said, in the file and on stderr, for the releases that lack it only.
    assert "left out ext_proc allow_content_length_header" in old_text.split("apiVersion", 1)[0]
    assert "left out" not in new_text.split("apiVersion", 1)[0]
    assert f"Istio {OLDEST} (Envoy {ISTIO_ENVOY[OLDEST]}): left out" in notes
    assert f"Istio {NEWEST}" not in notes
    # Apart from that field (and the command in the header) the renderings are the same.
    without = re.sub(r"\n *allow_content_length_header: true", "", new_text)
    assert without.split("\napiVersion", 1)[1] == old_text.split("\napiVersion", 1)[1]


@pytest.mark.parametrize("release", SUPPORTED_ISTIO)
def test_each_releases_envoy_accepts_its_rendering(release: str, tmp_path: Path) -> None:
    binary = release_envoy(release)
    for credentials in ("gateway", "sidecar"):
        directory = render(tmp_path / credentials, release, "--credentials", credentials)
        run = validate(binary, patched_sidecar(directory), tmp_path / f"sidecar-{credentials}.yaml")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # The egress gateway with its credential filter (gateway mode).
    install = install_for(release, tmp_path / "install")
    certs = make_certs(tmp_path, {spiffe("cluster.local/ns/ai-system/sa/ai-egress"): list(PROVIDER_HOSTS.values())})
    gateway = gateway_bootstrap(install, certs, listen=10010, admin=10011, credentials=10012,
                                mocks={host: 10013 for host in PROVIDER_HOSTS.values()})
    assert apply_gateway_filter(gateway, install[("EnvoyFilter", "ai-system", "ai-egress-credentials")]) == 4
    run = validate(binary, gateway, tmp_path / "gateway.yaml")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # The standalone sidecar (envoy/), rendered for this Envoy.
    policy = load_policy([REPO / "extproc" / "samples" / "policies"])
    standalone = render_bootstrap(SidecarSpec(
        service="user-service", namespace="demo", listen_port=10020, admin_port=10021, processor=("127.0.0.1", 10022),
        upstreams=tuple(upstream_for(p, ("127.0.0.1", 10023)) for p in policy.providers.values()),
        relay=(("127.0.0.1", 10024),), envoy=ISTIO_ENVOY[release]))
    run = validate(binary, standalone, tmp_path / "standalone.yaml")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_a_newer_releases_rendering_fails_on_an_older_envoy(tmp_path: Path) -> None:
    """The check has teeth: what the newest release's rendering adds, the oldest's Envoy refuses."""
    binary = release_envoy(OLDEST)
    run = validate(binary, patched_sidecar(render(tmp_path, NEWEST)), tmp_path / "sidecar.yaml")
    assert run.returncode != 0
    assert "allow_content_length_header" in run.stdout + run.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("release", SUPPORTED_ISTIO)
def test_calls_through_each_releases_envoy(release: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The gateway install rendered for the release, on its Envoy: a rewritten call, a stream whose usage
    chunk is stripped (full-duplex ext_proc), and a cross-provider fallback (buffer, relay, translation)."""
    binary = release_envoy(release)
    tmp = tmp_path_factory.mktemp(f"istio-{release}")
    with running_gateway_mesh(install_for(release, tmp / "install"), tmp, binary) as mesh:
        client = openai.OpenAI(base_url="http://api.openai.com/v1", api_key="app-holds-no-real-key", max_retries=0,
                               http_client=openai.DefaultHttpxClient(proxy=mesh.proxies["user-service"]))
        completion = client.chat.completions.create(model="auth_assistant",
                                                    messages=[{"role": "user", "content": "hi"}])
        assert completion.model == "gpt-4"
        seen = mock_requests(mesh, "api.openai.com")[-1]
        assert seen["body"]["model"] == "gpt-4" and seen["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
        if ISTIO_ENVOY[release] >= CONTENT_LENGTH_AFTER_REWRITE:
            assert "content-length" in seen["headers"]
        else:  # left out for this release: the rewritten body goes chunked, whole all the same
            assert seen["headers"].get("transfer-encoding") == "chunked"
        chunks = list(client.chat.completions.create(model="auth_assistant", stream=True,
                                                     messages=[{"role": "user", "content": "stream"}]))
        assert chunks and all(c.usage is None for c in chunks)  # the usage chunk we asked for is not shown
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        claude = anthropic.Anthropic(base_url="http://api.anthropic.com", api_key="app-holds-no-real-key",
                                     max_retries=0,
                                     http_client=anthropic.DefaultHttpxClient(proxy=mesh.proxies["order-service"]))
        raw = claude.messages.with_raw_response.create(
            model="fraud_detector", max_tokens=16, messages=[{"role": "user", "content": "check order 9"}],
            extra_headers={"x-mock-only": "anthropic", "x-mock-status": "529"})
        assert raw.headers["x-ai-fallback-hops"] == "claude/claude-3=upstream_error, openai/gpt-4o"
        message = raw.parse()
        assert message.type == "message" and message.content[0].type == "text"  # translated back
