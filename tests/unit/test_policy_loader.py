"""Policy files: the issue's per-service shape loads as written; every problem names file, line and field."""

from __future__ import annotations

import asyncio
import logging
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from extproc.cli import main, sample_policy_dir
from extproc.policy.loader import PolicyError, load_policy

if TYPE_CHECKING:
    from devtools.launch import Managed

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
         "order.yaml:5: ai_proxy.models[0].provider: unknown provider 'gemini' (known: anthropic, claude, openai)"),
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
         "order.yaml:11: ai_proxy.models[0].fallback[0].provider: unknown provider 'gemini' "
         "(known: anthropic, claude, openai)"),
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
    from extproc.policy.store import PolicyStore

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


# --- YAML that PyYAML's SafeLoader could not construct: a problem at its line, never a traceback.

@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-13-45",  # SafeLoader made a date of it, and failed: now it stays a string
         "10: ai_proxy.models[0].timeout: '2024-13-45' is not a duration; use a number with a unit, "
         "ms (milliseconds), s (seconds), m (minutes) or h (hours) (e.g. 2000ms or 5m)"),
        ("!foo 2000ms",
         "10: ai_proxy.models[0].timeout: invalid YAML: unknown tag '!foo'; policy files use plain YAML values"),
        ("!!float abc", "10: ai_proxy.models[0].timeout: invalid YAML: invalid !!float value 'abc'"),
        ("!!bool maybe", "10: ai_proxy.models[0].timeout: invalid YAML: invalid !!bool value 'maybe'"),
        ("!!int 0x", "10: ai_proxy.models[0].timeout: invalid YAML: invalid !!int value '0x'"),
        ("!!binary abc", "10: ai_proxy.models[0].timeout: invalid YAML: failed to decode base64 data: "
         "Incorrect padding"),
        ("!!timestamp 2024-13-45",  # an explicit timestamp is text too
         "10: ai_proxy.models[0].timeout: '2024-13-45' is not a duration; use a number with a unit, "
         "ms (milliseconds), s (seconds), m (minutes) or h (hours) (e.g. 2000ms or 5m)"),
        ("{[1]: x}",
         "10: ai_proxy.models[0].timeout: invalid YAML: a mapping key must be a plain value, not a list or mapping"),
        ("9" * 5000, "10: ai_proxy.models[0].timeout: invalid YAML: invalid !!int value "
         "'9999999999999999999999999999999999999999…'"),
        ("!!python/object/apply:os.system ['true']", "10: ai_proxy.models[0].timeout: invalid YAML: unknown tag "
         "'!!python/object/apply:os.system'; policy files use plain YAML values"),
        ("*nowhere", "10: invalid YAML: found undefined alias 'nowhere'"),
    ],
    ids=["invalid-date", "unknown-tag", "float", "bool", "int", "binary", "timestamp", "unhashable-key",
         "huge-int", "python-tag", "undefined-alias"],
)
def test_yaml_construction_errors_are_problems(tmp_path: Path, value: str, expected: str) -> None:
    write(tmp_path, "mesh.yaml", MESH)
    order = write(tmp_path, "order.yaml", ORDER_SERVICE.replace("timeout: 2000ms", f"timeout: {value}"))
    assert problems_of(tmp_path) == [f"{order}:{expected}"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("service: x\n? [a, b]\n: 1\n", "2: invalid YAML: a mapping key must be a plain value, not a list or mapping"),
        ("service: x\nai_proxy:\n  models: {[1]: x}\n",
         "3: ai_proxy.models: invalid YAML: a mapping key must be a plain value, not a list or mapping"),
        ("service: x\nai_proxy: {}\n\x00\n", "3: invalid YAML: unacceptable character #x0000: special characters "
         "are not allowed"),
        ("service: x\n---\nservice: !!float y\n", "#2:3: service: invalid YAML: invalid !!float value 'y'"),
    ],
    ids=["complex-key", "nested-unhashable-key", "nul", "second-document"],
)
def test_file_level_yaml_problems_have_lines(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    problems = [p for p in problems_of(tmp_path) if "invalid YAML" in p]  # the first document is incomplete
    assert problems == [f"{path}{expected}" if expected.startswith("#") else f"{path}:{expected}"]


def test_bytes_that_are_not_utf8_are_placed(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_bytes(b"service: x\nai_proxy:\n  models: [\xff]\n")
    assert problems_of(tmp_path) == [f"{tmp_path / 'p.yaml'}:3: not UTF-8: byte 0xff at offset 32"]


def test_a_duplicate_model_name_points_at_the_second_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    write(tmp_path, "mesh.yaml", MESH)
    order = write(tmp_path, "order.yaml", ORDER_SERVICE + """\
  - name: fraud_detector
    provider: openai
    model: gpt-4o
""")
    assert main(["check", str(tmp_path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{order}:11: ai_proxy.models[1].name: model name 'fraud_detector' is listed twice",
        "1 problem(s) found",
    ]


def test_a_duplicate_variant_name_points_at_the_second_variant(tmp_path: Path) -> None:
    write(tmp_path, "mesh.yaml", MESH)
    order = write(tmp_path, "order.yaml", ORDER_SERVICE + """\
    variants:
    - {name: a, weight: 1}
    - {name: b, weight: 1}
    - {name: a, weight: 2}
""")
    assert problems_of(tmp_path) == [
        f"{order}:14: ai_proxy.models[0].variants[2].name: variant names must be unique ('a' is also variants[0])"]


def test_a_duplicate_default_policy_model_is_placed_under_mesh(tmp_path: Path) -> None:
    mesh = write(tmp_path, "mesh.yaml", "mesh:\n  unknown_service: default\n  default_policy:\n    models:\n"
                 "    - {name: m, provider: openai, model: gpt-4}\n"
                 "    - {name: m, provider: openai, model: gpt-4o}\n" + MESH)
    assert problems_of(tmp_path) == [
        f"{mesh}:6: mesh.default_policy.models[1].name: model name 'm' is listed twice"]


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [
        ("20m", "must be between 1ms and 10m (600000ms); 20m is 1200000ms"),  # minutes: no "1200ms" guess
        ("2h", "must be between 1ms and 10m (600000ms); 2h is 7200000ms"),
        ("700000ms", "must be between 1ms and 10m (600000ms)"),
        ("2000", "must be between 1ms and 10m; did you mean 2000ms?"),  # a bare number is seconds
        ("'5000'", "must be between 1ms and 10m; did you mean 5000ms?"),
        ("700000", "must be between 1ms and 10m; a bare number is seconds"),  # 700000ms would be too long too
        ("0ms", "must be between 1ms and 10m"),
        ("5min", "unknown duration unit 'min' in '5min'; use ms (milliseconds), s (seconds), m (minutes) or "
         "h (hours); did you mean 5m?"),
    ],
)
def test_timeout_messages_say_what_was_read(tmp_path: Path, timeout: str, expected: str) -> None:
    write(tmp_path, "mesh.yaml", MESH)
    order = write(tmp_path, "order.yaml", ORDER_SERVICE.replace("timeout: 2000ms", f"timeout: {timeout}"))
    assert problems_of(tmp_path) == [f"{order}:10: ai_proxy.models[0].timeout: {expected}"]


def test_ten_minutes_is_the_longest_timeout(tmp_path: Path) -> None:
    write(tmp_path, "mesh.yaml", MESH)
    write(tmp_path, "order.yaml", ORDER_SERVICE.replace("timeout: 2000ms", "timeout: 10m"))
    route = load_policy([tmp_path]).for_caller("order-service", None).resolve("fraud_detector")  # type: ignore[union-attr]
    assert route is not None and route.timeout == 600_000


def test_a_port_out_of_range_is_a_problem(tmp_path: Path) -> None:
    mesh = write(tmp_path, "mesh.yaml", MESH.replace("http://api.openai.com/v1", "http://api.openai.com:99999/v1"))
    assert problems_of(tmp_path) == [
        f"{mesh}:8: providers[1].base_url: has an invalid port: use a number from 1 to 65535"]


# --- The running processor: a bad edit is logged and the watcher keeps going.

BAD_FLOAT = ORDER_SERVICE.replace("timeout: 2000ms", "timeout: !!float abc")  # raised out of the watcher once


def _timeout_served(store: object) -> int | None:
    route = store.current().for_caller("order-service", None).resolve("fraud_detector")  # type: ignore[attr-defined]
    return route.timeout if route is not None else None


async def _until(check: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {seconds}s")
        await asyncio.sleep(0.01)


def test_watcher_survives_a_bad_edit_and_serves_the_next_good_one(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from extproc.policy.store import PolicyStore

    write(tmp_path, "mesh.yaml", MESH)
    order = write(tmp_path, "order.yaml", ORDER_SERVICE)
    store = PolicyStore([tmp_path])
    version = store.current().version
    caplog.set_level(logging.INFO, logger="extproc.policy.store")

    async def drive() -> None:
        watcher = asyncio.create_task(store.watch(0.01))
        order.write_text(BAD_FLOAT)
        await _until(lambda: store.last_error is not None)
        assert _timeout_served(store) == 2000  # the last good policy keeps serving
        order.write_text(ORDER_SERVICE.replace("2000ms", "2500ms"))
        await _until(lambda: _timeout_served(store) == 2500)
        assert not watcher.done()
        watcher.cancel()
        await asyncio.wait({watcher})

    asyncio.run(drive())
    rejected = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert rejected == [f"policy update rejected, still serving version {version}: "
                        f"{order}:10: ai_proxy.models[0].timeout: invalid YAML: invalid !!float value 'abc'"]
    assert store.last_error is None


def test_watcher_logs_an_unexpected_reload_failure_and_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from extproc.policy import store as policy_store
    from extproc.policy.store import PolicyStore

    write(tmp_path, "mesh.yaml", MESH)
    order = write(tmp_path, "order.yaml", ORDER_SERVICE)
    store = PolicyStore([tmp_path])
    real_load = policy_store.load_policy
    calls = []

    def broken_once(paths: list[Path]) -> object:
        calls.append(paths)
        if len(calls) == 1:
            raise RuntimeError("a bug in the loader")
        return real_load(paths)

    monkeypatch.setattr(policy_store, "load_policy", broken_once)

    async def drive() -> None:
        watcher = asyncio.create_task(store.watch(0.01))
        order.write_text(ORDER_SERVICE.replace("2000ms", "2100ms"))
        await _until(lambda: len(calls) == 1)
        order.write_text(ORDER_SERVICE.replace("2000ms", "2500ms"))
        await _until(lambda: _timeout_served(store) == 2500)
        watcher.cancel()
        await asyncio.wait({watcher})

    asyncio.run(drive())
    (failure,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failure.getMessage().startswith("policy reload failed, still serving version ")
    assert failure.exc_info is not None and str(failure.exc_info[1]) == "a bug in the loader"


def test_sigterm_after_a_rejected_edit_drains_and_exits_0(tmp_path: Path) -> None:
    """A real `extproc serve`: a policy edit that used to kill the watcher, then SIGTERM."""
    from devtools.launch import free_port, start_processor

    for path in sample_policy_dir().iterdir():
        (tmp_path / path.name).write_text(path.read_text())
    user = tmp_path / "user-service.yaml"
    good = user.read_text()
    processor = start_processor([tmp_path], free_port(), log_dir=tmp_path,
                                extra_args=["--watch", "0.05", "--grace", "1"])
    try:
        user.write_text(good.replace("timeout: 5000ms", "timeout: !!float abc"))
        _wait_for_log(processor, "policy update rejected")
        user.write_text(good.replace("timeout: 5000ms", "timeout: 4000ms"))
        _wait_for_log(processor, "policy version ")  # the watcher is alive: the good edit is applied
        assert processor.stop(timeout=10) == 0, processor.log_text()
    finally:
        processor.stop()
    log = processor.log_text()
    assert "policy update rejected, still serving version" in log
    assert f"{user}:9: ai_proxy.models[0].timeout: invalid YAML: invalid !!float value 'abc'" in log
    assert "shutting down: refusing new streams, draining in-flight ones for up to 1.0s" in log
    assert log.rstrip().endswith("stopped"), log
    assert "Traceback" not in log, log


def _wait_for_log(processor: Managed, text: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while text not in processor.log_text():
        assert processor.process is not None and processor.process.poll() is None, processor.log_text()
        assert time.monotonic() < deadline, f"{text!r} not logged within {seconds}s:\n{processor.log_text()}"
        time.sleep(0.05)


def test_sigterm_drains_even_when_the_watcher_died(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """In process: a watcher that died (as it did on `!!float abc`) once made shutdown re-raise its error
    before the drain, and `extproc serve` exit 2. Now serve() drains and returns."""
    import os
    import signal

    from devtools.launch import free_port
    from extproc.policy.store import PolicyStore
    from extproc.server.app import ServeOptions, serve

    async def dies(self: PolicyStore, interval: float) -> None:
        raise ValueError("could not convert string to float: 'abc'")

    monkeypatch.setattr(PolicyStore, "watch", dies)
    caplog.set_level(logging.INFO, logger="extproc.server.app")
    options = ServeOptions(f"127.0.0.1:{free_port()}", (sample_policy_dir(),), grace_seconds=0.5, watch_seconds=0.05)

    async def drive() -> None:
        ready = asyncio.Event()
        server = asyncio.create_task(serve(options, ready))
        await asyncio.wait_for(ready.wait(), 10)
        await asyncio.sleep(0.1)  # the watcher has died by now
        os.kill(os.getpid(), signal.SIGTERM)  # serve()'s own handler: sets its stop event
        await asyncio.wait_for(server, 10)  # returns: no ValueError out of the shutdown

    asyncio.run(drive())
    messages = [r.getMessage() for r in caplog.records if r.name == "extproc.server.app"]
    assert "policy watcher died; it is not restarted" in messages
    assert "shutting down: refusing new streams, draining in-flight ones for up to 0.5s" in messages
    assert messages[-1] == "stopped"
