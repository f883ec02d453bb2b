"""Bad input gets a precise error in the caller's API format, and the processor keeps serving."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from devtools.stack import Stack
from tests.e2e.conftest import Mock, logs, processor_alive

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
JSON = {"content-type": "application/json"}
ANTHROPIC = {"content-type": "application/json", "anthropic-version": "2023-06-01"}


def post(stack: Stack, service: str, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(stack.base_url(service) + path, content=body, headers=headers, timeout=10)


def openai_error(response: httpx.Response) -> dict[str, object]:
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


def anthropic_error(response: httpx.Response) -> dict[str, object]:
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return dict(body["error"])


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "code"),
    [
        (CHAT, b'{"model": "auth_assistant", "messages": [', JSON, 400, "invalid_json"),
        (CHAT, b'{"messages": []}', JSON, 400, "missing_model"),
        (CHAT, b'{"model": "gpt-5-ultra", "messages": []}', JSON, 403, "model_not_allowed"),
        (CHAT, b'{"model": "auth_assistant"}', {"content-type": "text/plain"}, 415, "unsupported_media_type"),
        (CHAT, b'{"model": "auth_assistant", "messages": ["\xff\xfe"]}', JSON, 400, "invalid_utf8"),
        (CHAT, b"", JSON, 400, "empty_body"),
        (CHAT, b'{"model": "auth_assistant", "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}', JSON, 413,
         "request_too_large"),
    ],
    ids=["malformed-json", "missing-model", "unknown-model", "content-type", "invalid-utf8", "empty", "too-large"],
)
def test_openai_format_errors(stack: Stack, mock: Mock, path: str, body: bytes, headers: dict[str, str],
                              status: int, code: str) -> None:
    response = post(stack, "user-service", path, body, headers)
    assert response.status_code == status, response.text
    error = openai_error(response)
    assert error["code"] == code
    assert error["message"]
    assert mock.requests("openai") == []  # refused inside the mesh: the provider never saw it
    assert processor_alive(stack), logs(stack)


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b"{not json", 400, "invalid_request_error"),
        (b'{"max_tokens": 5, "messages": []}', 400, "invalid_request_error"),
        (b'{"model": "claude-opus-9", "max_tokens": 5, "messages": []}', 403, "permission_error"),
        (b'{"model": "fraud_detector", "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}', 413, "request_too_large"),
    ],
    ids=["malformed-json", "missing-model", "unknown-model", "too-large"],
)
def test_anthropic_format_errors(stack: Stack, mock: Mock, body: bytes, status: int, kind: str) -> None:
    response = post(stack, "order-service", MESSAGES, body, ANTHROPIC)
    assert response.status_code == status, response.text
    assert anthropic_error(response)["type"] == kind
    assert mock.requests("anthropic") == []


def test_sdks_raise_their_own_typed_errors(stack: Stack) -> None:
    with pytest.raises(openai.PermissionDeniedError) as denied:
        openai.OpenAI(base_url=stack.base_url("order-service") + "/v1", api_key="x", max_retries=0
                      ).chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert "allowed models: fraud_detector" in denied.value.message
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        anthropic.Anthropic(base_url=stack.base_url("user-service"), api_key="x", max_retries=0
                            ).messages.create(model="fraud_detector", max_tokens=5,
                                              messages=[{"role": "user", "content": "x"}])
    assert "allowed models: auth_assistant" in refused.value.message


def test_wrong_method_on_ai_path(stack: Stack) -> None:
    response = httpx.get(stack.base_url("user-service") + CHAT)
    assert response.status_code == 405
    assert openai_error(response)["code"] == "method"


def test_still_serving_after_bad_input(stack: Stack, mock: Mock) -> None:
    for _ in range(3):
        post(stack, "user-service", CHAT, b"\x00\xff{{", JSON)
    completion = openai.OpenAI(base_url=stack.base_url("user-service") + "/v1", api_key="x", max_retries=0
                               ).chat.completions.create(model="auth_assistant",
                                                         messages=[{"role": "user", "content": "still there?"}])
    assert completion.choices[0].message.content == "mock reply from gpt-4: still there?"
    assert processor_alive(stack)


def test_an_ungoverned_path_is_denied_in_the_callers_format(strict_stack: Stack) -> None:
    response = httpx.get(strict_stack.base_url("shared-gateway") + "/v1/files", headers={"host": "api.openai.com"})
    assert response.status_code == 403
    error = openai_error(response)
    assert error["code"] == "path_not_allowed" and "ai_proxy.allow_paths" in str(error["message"])
    response = httpx.post(strict_stack.base_url("shared-gateway") + "/v1/complete", json={},
                          headers={"host": "api.anthropic.com", "anthropic-version": "2023-06-01"})
    assert response.status_code == 403
    assert anthropic_error(response)["type"] == "permission_error"


def test_configured_body_limit(strict_stack: Stack) -> None:
    body = b'{"model": "auth_assistant", "pad": "' + b"x" * 5000 + b'"}'
    response = post(strict_stack, "shared-gateway", CHAT, body, {**JSON, "x-ai-service": "user-service"})
    assert response.status_code == 413
    assert "4096 bytes" in str(openai_error(response)["message"])


def test_trusted_identity_header(strict_stack: Stack) -> None:
    """Behind a shared gateway the platform trusts the identity header, and only then."""
    client = openai.OpenAI(base_url=strict_stack.base_url("shared-gateway") + "/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="auth_assistant", messages=[{"role": "user", "content": "x"}],
        extra_headers={"x-ai-service": "user-service"})
    assert raw.headers["x-ai-model"] == "gpt-4"
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model="auth_assistant", messages=[{"role": "user", "content": "x"}],
                                       extra_headers={"x-ai-service": "order-service"})
    assert "demo/order-service" in caught.value.message
    with pytest.raises(openai.PermissionDeniedError) as anonymous:
        client.chat.completions.create(model="auth_assistant", messages=[{"role": "user", "content": "x"}])
    assert "demo/shared-gateway has no AI policy" in anonymous.value.message
