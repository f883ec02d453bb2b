"""Policy files: the issue's per-service shape loads as written; every problem names file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from extproc.cli import main, sample_policy_dir
from extproc.policy.loader import PolicyError, load_policy

MESH = """\
providers:
- name: claude
  api: anthropic
  base_url: http://api.anthropic.com/v1
  credential: {env: ANTHROPIC_API_KEY}
- name: openai
  api: openai
  base_url: http://api.openai.com/v1
  credential: {file: /var/run/secrets/openai/key}
"""

ORDER_SERVICE = """\
service: order-service
ai_proxy:
  models:
  - name: fraud_detector
    provider: claude
    model: claude-3
    purpose: fraud_detection
    rate_limit: 100/min
    cache_ttl: 3600
    timeout: 2000ms
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy([tmp_path])
    return [str(p) for p in caught.value.problems]


def test_issue_shape_loads_exactly_as_written(tmp_path: Path) -> None:
    write(tmp_path, "mesh.yaml", MESH)
    write(tmp_path, "order.yaml", ORDER_SERVICE)
    policy = load_policy([tmp_path])
    service = policy.for_caller("order-service", "shop")
    assert service is not None
    model = service.resolve("fraud_detector")
    assert model is not None
    assert (model.provider, model.model, model.purpose) == ("claude", "claude-3", "fraud_detection")
    assert model.timeout == 2000
    assert model.cache_ttl == 3_600_000
    assert model.rate_limit is not None and (model.rate_limit.count, model.rate_limit.per_seconds) == (100, 60)
    # The upstream model name is accepted too, and resolves to the same entry.
    assert service.resolve("claude-3") is model


def test_fallback_shapes_load(tmp_path: Path) -> None:
    write(tmp_path, "mesh.yaml", MESH)
    write(tmp_path, "order.yaml", ORDER_SERVICE.replace("timeout: 2000ms", """timeout: 2000ms
    first_byte_timeout: 800ms
    fallback: [openai/gpt-4o, {provider: claude, model: claude-3-haiku}]
    circuit_breaker: {consecutive_failures: 3, open_for: 10s}"""))
    route = load_policy([tmp_path]).for_caller("order-service", None).resolve("fraud_detector")  # type: ignore[union-attr]
    assert route is not None
    assert [(f.provider, f.model) for f in route.fallback] == [("openai", "gpt-4o"), ("claude", "claude-3-haiku")]
    assert route.first_byte_timeout == 800 and route.circuit_breaker is not None
    assert route.circuit_breaker.open_for == 10_000 and route.circuit_breaker.consecutive_failures == 3


def test_samples_load() -> None:
    policy = load_policy([sample_policy_dir()])
    assert set(policy.service_names) == {"user-service", "product-service", "order-service"}
    assert policy.providers["openai"].authority == "api.openai.com"
    assert policy.providers["claude"].base_path == "/v1"


def test_version_changes_with_content(tmp_path: Path) -> None:
    write(tmp_path, "mesh.yaml", MESH)
    order = write(tmp_path, "order.yaml", ORDER_SERVICE)
    first = load_policy([tmp_path]).version
    order.write_text(ORDER_SERVICE.replace("2000ms", "2500ms"))
    assert load_policy([tmp_path]).version != first


@pytest.mark.parametrize(
    ("replace", "by", "expected"),
    [
        ("provider: claude", "provider: gemini",
         "order.yaml:5: ai_proxy.models[0].provider: unknown provider 'gemini' (known: claude, openai)"),
        ("timeout: 2000ms", "timeout: 2000",
         "order.yaml:10: ai_proxy.models[0].timeout: must be between 1ms and 10m; did you mean 2000ms?"),
        ("timeout: 2000ms", "timeout: soon",
         "order.yaml:10: ai_proxy.models[0].timeout: 'soon' is not a duration"),
        ("rate_limit: 100/min", "rate_limit: 100 per minute",
         "order.yaml:8: ai_proxy.models[0].rate_limit: '100 per minute' is not a rate"),
        ("purpose: fraud_detection", "purpse: fraud_detection",
         "order.yaml:7: ai_proxy.models[0].purpse: unknown field"),
        ("    model: claude-3\n", "",
         "order.yaml:4: ai_proxy.models[0].model: Field required"),
        ("timeout: 2000ms", "timeout: 2000ms\n    fallback: [gemini/pro]",
         "order.yaml:11: ai_proxy.models[0].fallback[0].provider: unknown provider 'gemini' (known: claude, openai)"),
        ("timeout: 2000ms", "timeout: 2000ms\n    first_byte_timeout: 3s",
         "order.yaml:4: ai_proxy.models[0]: first_byte_timeout must not exceed timeout"),
        ("timeout: 2000ms", "timeout: 2000ms\n    fallback_on_context_length: true",
         "order.yaml:4: ai_proxy.models[0]: fallback_on_context_length needs a fallback list"),
        ("timeout: 2000ms", "timeout: 2000ms\n    circuit_breaker: {error_rate: 2}",
         "order.yaml:11: ai_proxy.models[0].circuit_breaker.error_rate: Input should be less than or equal to 1"),
    ],
)
def test_field_errors_name_file_line_and_path(tmp_path: Path, replace: str, by: str, expected: str) -> None:
    write(tmp_path, "mesh.yaml", MESH)
    assert replace in ORDER_SERVICE
    write(tmp_path, "order.yaml", ORDER_SERVICE.replace(replace, by))
    problems = problems_of(tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(str(tmp_path / expected.split(":", 1)[0]))
    assert expected.split(":", 1)[1] in problems[0]


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    write(tmp_path, "mesh.yaml", MESH)
    write(tmp_path, "order.yaml", "service: x\nai_proxy:\n  models: [\n")
    (problem,) = problems_of(tmp_path)
    assert "order.yaml:4: invalid YAML" in problem


def test_duplicate_service_and_provider(tmp_path: Path) -> None:
    write(tmp_path, "mesh.yaml", MESH + MESH.split("\n", 1)[1])
    write(tmp_path, "a.yaml", ORDER_SERVICE)
    write(tmp_path, "b.yaml", ORDER_SERVICE)
    problems = problems_of(tmp_path)
    assert any("b.yaml:1: service: service 'order-service' already has a policy in" in p for p in problems)
    assert any("provider 'claude' already defined" in p for p in problems)


def test_unrecognised_document_and_empty_models(tmp_path: Path) -> None:
    write(tmp_path, "mesh.yaml", MESH)
    write(tmp_path, "odd.yaml", "kind: Something\n")
    write(tmp_path, "empty.yaml", "service: empty\nai_proxy:\n  models: []\n")
    problems = problems_of(tmp_path)
    assert any("odd.yaml:1: unrecognised document (has kind)" in p for p in problems)
    assert any("empty.yaml:3: ai_proxy.models:" in p and "at least 1" in p for p in problems)


def test_split_validation(tmp_path: Path) -> None:
    write(tmp_path, "mesh.yaml", MESH)
    write(tmp_path, "p.yaml", """\
        service: p
        ai_proxy:
          models:
          - name: m
            provider: openai
            model: gpt-4
            sticky_header: "bad header"
            variants:
            - {name: a, weight: 0}
            - {name: b, weight: 0, provider: nobody}
        """)
    problems = problems_of(tmp_path)
    assert any("ai_proxy.models[0].sticky_header: 'bad header' is not a valid HTTP header name" in p
               for p in problems)


def test_default_policy_required(tmp_path: Path) -> None:
    write(tmp_path, "mesh.yaml", "mesh:\n  unknown_service: default\n" + MESH)
    assert any("unknown_service: default needs a default_policy" in p for p in problems_of(tmp_path))


def test_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "mesh.yaml", MESH)
    order = write(tmp_path, "order.yaml", ORDER_SERVICE)
    assert main(["check", str(tmp_path)]) == 0
    assert "order-service: fraud_detector→claude/claude-3" in capsys.readouterr().out
    order.write_text(ORDER_SERVICE.replace("provider: claude", "provider: gemini"))
    assert main(["check", str(tmp_path / "mesh.yaml"), str(order)]) == 1
    err = capsys.readouterr().err
    assert "order.yaml:5: ai_proxy.models[0].provider: unknown provider 'gemini'" in err
    assert "1 problem(s) found" in err


def test_store_follows_configmap_style_symlink_swap(tmp_path: Path) -> None:
    """A ConfigMap volume: visible files are symlinks into ..data, which is swapped atomically."""
    from extproc.server.policy_store import PolicyStore

    volume = tmp_path / "volume"
    volume.mkdir()
    for version, timeout in (("v1", "2000ms"), ("v2", "2500ms")):
        (volume / version).mkdir()
        (volume / version / "mesh.yaml").write_text(MESH)
        (volume / version / "order.yaml").write_text(ORDER_SERVICE.replace("2000ms", timeout))
    (volume / "..data").symlink_to("v1")
    for name in ("mesh.yaml", "order.yaml"):
        (volume / name).symlink_to(f"..data/{name}")
    store = PolicyStore([volume])
    assert store.current().for_caller("order-service", None).resolve("fraud_detector").timeout == 2000  # type: ignore[union-attr]
    (volume / "..data_tmp").symlink_to("v2")
    (volume / "..data_tmp").rename(volume / "..data")
    assert store.changed()
    assert store.reload()
    assert store.current().for_caller("order-service", None).resolve("fraud_detector").timeout == 2500  # type: ignore[union-attr]


def test_credentials_from_file_are_cached_and_refreshed(tmp_path: Path) -> None:
    from extproc.core.credentials import CredentialStore
    from extproc.policy.model import CredentialSource

    key = tmp_path / "key"
    key.write_text("sk-one\n")
    now = [100.0]
    store = CredentialStore(refresh_seconds=5, environ={"K": "sk-env"}, clock=lambda: now[0])
    source = CredentialSource(file=str(key))
    assert store.get(source) == "sk-one"
    key.write_text("sk-two")
    now[0] += 4.9
    assert store.get(source) == "sk-one"  # cached: no disk access on the hot path
    now[0] += 0.2
    assert store.get(source) == "sk-two"  # a rotated Secret is picked up
    key.unlink()
    now[0] += 5
    assert store.get(source) is None
    assert store.get(CredentialSource(env="K")) == "sk-env"
    assert store.get(CredentialSource(env="MISSING")) is None
