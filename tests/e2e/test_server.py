"""The processor as a service: gRPC health, graceful shutdown, policy reloads that keep the last good set."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.stack import Stack
from extproc.cli import sample_policy_dir
from extproc.server.app import SERVICE_NAME


def health(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status)


def test_health_service(stack: Stack) -> None:
    assert health(stack.processor_port) == health_pb2.HealthCheckResponse.SERVING
    assert health(stack.processor_port, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def own_stack(envoy_binary: str, tmp_path: Path) -> Iterator[tuple[Stack, Path]]:
    """A private stack whose processor we may stop or whose policy we may change."""
    policies = tmp_path / "policies"
    shutil.copytree(sample_policy_dir(), policies)
    running = Stack(policies, tmp_path, services=["user-service"], processor_args=["--watch", "0.2", "--grace", "5"])
    yield running, policies
    running.close()


def chat(stack: Stack, model: str, **headers: str) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=stack.base_url("user-service") + "/v1", api_key="x", max_retries=0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                          extra_headers=headers)


def test_graceful_shutdown_drains_in_flight_calls(own_stack: tuple[Stack, Path]) -> None:
    """SIGTERM while a call's ext_proc stream is open (its body still uploading): the call completes."""
    stack, _ = own_stack
    process = stack.processor.process
    assert process is not None
    result: dict[str, object] = {}

    def slow_body() -> Iterator[bytes]:
        yield b'{"model": "auth_assistant", '
        time.sleep(1.0)
        yield b'"messages": [{"role": "user", "content": "slow upload"}]}'

    def call() -> None:
        try:
            result["response"] = httpx.post(stack.base_url("user-service") + "/v1/chat/completions",
                                            content=slow_body(), headers={"content-type": "application/json"},
                                            timeout=10)
        except Exception as exc:  # reported below
            result["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.4)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert process.poll() is None, "exited without draining the in-flight stream"
    caller.join(10)
    assert "error" not in result, result
    response = result["response"]
    assert isinstance(response, httpx.Response)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "mock reply from gpt-4: slow upload"
    assert process.wait(5) == 0
    log = stack.processor.log_text()
    assert "shutting down" in log and "stopped" in log


def test_bad_policy_update_keeps_last_good(own_stack: tuple[Stack, Path]) -> None:
    stack, policies = own_stack
    user = policies / "user-service.yaml"
    good = user.read_text()
    user.write_text(good.replace("provider: openai", "provider: nowhere"))
    time.sleep(1.0)
    log = stack.processor.log_text()
    assert "policy update rejected" in log
    assert "user-service.yaml:5: ai_proxy.models[0].provider: unknown provider 'nowhere'" in log
    assert chat(stack, "auth_assistant").model == "gpt-4"  # still served by the last good policy
    before = httpx.get(f"http://127.0.0.1:{stack.admin_port}/config").json()["services"]
    # A good update takes effect without a restart, and /config shows the new version of that
    # service's policy only.
    user.write_text(good.replace("model: gpt-4\n", "model: gpt-4.1\n"))
    time.sleep(1.0)
    assert chat(stack, "auth_assistant").model == "gpt-4.1"
    after = httpx.get(f"http://127.0.0.1:{stack.admin_port}/config").json()["services"]
    assert after["user-service"]["version"] != before["user-service"]["version"]
    assert after["order-service"] == before["order-service"]
    assert after["user-service"]["models"] == ["auth_assistant"]
    assert "sk-" not in str(after)  # no secrets


def test_refuses_to_start_on_invalid_policy(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "bad.yaml").write_text("service: x\nai_proxy:\n  models:\n  - name: m\n    provider: p\n")
    run = subprocess.run([sys.executable, "-m", "extproc", "serve", "--listen", "127.0.0.1:0", "--policy",
                          str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "bad.yaml:4: ai_proxy.models[0].model: Field required" in run.stderr


def test_unreachable_provider_is_a_json_error_in_the_callers_format(own_stack: tuple[Stack, Path]) -> None:
    stack, _ = own_stack
    stack.parts[0].stop()  # the OpenAI mock provider goes away
    with pytest.raises(openai.InternalServerError) as caught:
        chat(stack, "auth_assistant")
    assert caught.value.status_code == 503
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "server_error" and body["message"].startswith("upstream connect error")
    assert body["code"].startswith("upstream_reset_before_response_started")


def test_processor_down_is_a_clear_503_in_the_callers_format(own_stack: tuple[Stack, Path]) -> None:
    """Fail closed: with no processor the call is not sent anywhere, and the caller is told so."""
    stack, _ = own_stack
    stack.processor.stop()
    with pytest.raises(openai.APIStatusError) as caught:
        chat(stack, "auth_assistant")
    assert caught.value.status_code == 503
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "server_error"
    assert body["message"].startswith("the AI policy processor could not be reached")
    assert body["code"].startswith("ext_proc_error")
    claude = anthropic.Anthropic(base_url=stack.base_url("user-service"), api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as anthropic_caught:
        claude.messages.create(model="x", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert anthropic_caught.value.status_code == 503
    assert anthropic_caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]
