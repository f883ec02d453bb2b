"""Routing, rewriting and credential injection through a real Envoy, driven by the official SDKs."""

from __future__ import annotations

import time
from collections import Counter

import anthropic
import httpx
import openai
import pytest

from devtools.launch import envoy_version, find_envoy
from devtools.stack import ANTHROPIC_KEY, OPENAI_KEY, Stack
from extproc.envoy_config.versions import CONTENT_LENGTH_AFTER_REWRITE
from tests.e2e.conftest import Mock, processor_alive


def openai_client(stack: Stack, service: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url(service) + "/v1", api_key="app-own-key", max_retries=0)


def anthropic_client(stack: Stack, service: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base_url(service), api_key="app-own-key", max_retries=0)


def test_openai_chat_is_routed_rewritten_and_credentialed(stack: Stack, mock: Mock) -> None:
    raw = openai_client(stack, "user-service").chat.completions.with_raw_response.create(
        model="auth_assistant", messages=[{"role": "user", "content": "reset my password"}])
    completion = raw.parse()
    assert completion.choices[0].message.content == "mock reply from gpt-4: reset my password"
    assert completion.model == "gpt-4"
    assert (raw.headers["x-ai-provider"], raw.headers["x-ai-model"], raw.headers["x-ai-route"]) == (
        "openai", "gpt-4", "auth_assistant")
    seen = mock.last("openai")
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert seen["host"] == "api.openai.com"
    assert seen["path"] == "/v1/chat/completions"
    assert headers["authorization"] == f"Bearer {OPENAI_KEY}"  # the app's own key was replaced
    assert seen["body"] == {"model": "gpt-4", "messages": [{"role": "user", "content": "reset my password"}]}
    # The body was rewritten, and content-length follows it (no chunked re-encoding) on an Envoy that
    # keeps it; an older one sends the rewritten body chunked (versions.py).
    rewritten = b'{"model":"gpt-4","messages":[{"role":"user","content":"reset my password"}]}'
    if envoy_version(find_envoy()) >= CONTENT_LENGTH_AFTER_REWRITE:
        assert int(headers["content-length"]) == len(rewritten)
    else:
        assert "content-length" not in headers and headers["transfer-encoding"] == "chunked"


def test_openai_stream_is_not_buffered(stack: Stack, mock: Mock) -> None:
    client = openai_client(stack, "user-service")
    arrivals: list[float] = []
    text = ""
    stream = client.chat.completions.create(
        model="auth_assistant", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "one two three four five six"}],
        extra_headers={"x-mock-event-delay-ms": "150"})
    usage = None
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == "mock reply from gpt-4: one two three four five six"
    assert usage is not None and usage.completion_tokens == len(text.split())
    # The mock waits 150 ms between ~13 events. Had anything on the path buffered the stream, all
    # chunks would reach us together; instead they arrive spread over (at least half) that time.
    assert arrivals[-1] - arrivals[0] > 0.5 * 0.150 * (len(arrivals) - 2)
    assert mock.last("openai")["body"]["stream"] is True  # type: ignore[index]


def test_anthropic_messages_json_and_stream(stack: Stack, mock: Mock) -> None:
    client = anthropic_client(stack, "order-service")
    raw = client.messages.with_raw_response.create(
        model="fraud_detector", max_tokens=50, messages=[{"role": "user", "content": "order 42 looks odd"}])
    message = raw.parse()
    assert message.model == "claude-3"
    assert message.content[0].text == "mock reply from claude-3: order 42 looks odd"  # type: ignore[union-attr]
    assert raw.headers["x-ai-provider"] == "claude"
    seen = mock.last("anthropic")
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert seen["host"] == "api.anthropic.com"
    assert headers["x-api-key"] == ANTHROPIC_KEY
    assert "authorization" not in headers
    assert headers["anthropic-version"]  # the SDK's own version is kept (the mock requires one)
    with client.messages.stream(model="fraud_detector", max_tokens=50,
                                messages=[{"role": "user", "content": "score order 43"}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == "mock reply from claude-3: score order 43"
    assert final.usage.output_tokens == len(streamed.split())
    assert mock.last("anthropic")["body"]["model"] == "claude-3"  # type: ignore[index]


def test_embeddings(stack: Stack, mock: Mock) -> None:
    result = openai_client(stack, "product-service").embeddings.create(
        model="product_embeddings", input=["red shoes", "blue hat"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 8
    assert mock.last("openai")["path"] == "/v1/embeddings"
    assert mock.last("openai")["body"]["model"] == "text-embedding-3-small"  # type: ignore[index]


def test_ab_split_ratio_and_stickiness(stack: Stack, mock: Mock) -> None:
    client = openai_client(stack, "product-service")
    seen: dict[str, str] = {}
    for user in range(300):
        raw = client.chat.completions.with_raw_response.create(
            model="recommendation_engine", messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-user-id": f"ab-user-{user}"})
        served = raw.parse().model
        variant = raw.headers["x-ai-variant"]
        assert served == {"control": "gpt-4-turbo", "candidate": "gpt-4o"}[variant]
        seen[f"ab-user-{user}"] = variant
    share = Counter(seen.values())["candidate"] / len(seen)
    # Policy says 20%; binomial sd at n=300 is 2.3%, so 0.11..0.29 is a ~4-sigma bound.
    assert 0.11 < share < 0.29, share
    for user in ("ab-user-3", "ab-user-150", "ab-user-299"):
        for _ in range(3):
            raw = client.chat.completions.with_raw_response.create(
                model="recommendation_engine", messages=[{"role": "user", "content": "again"}],
                extra_headers={"x-user-id": user})
            assert raw.headers["x-ai-variant"] == seen[user]


def test_model_timeout_from_policy(stack: Stack, mock: Mock) -> None:
    # order-service's fraud_detector: timeout 2000ms for the whole call, first_byte_timeout 1500ms per
    # attempt, fallback openai/gpt-4o. Both providers take 2.5 s: Claude is left after 1.5 s, and
    # OpenAI gets the 0.5 s left of the budget.
    client = anthropic_client(stack, "order-service")
    started = time.monotonic()
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(model="fraud_detector", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                               extra_headers={"x-mock-latency-ms": "2500"})
    elapsed = time.monotonic() - started
    assert caught.value.status_code == 504
    # Envoy's own timeout reply, translated into the Anthropic format the caller speaks.
    assert caught.value.body == {"type": "error", "error": {"type": "timeout_error",
                                                            "message": "upstream request timeout"}}
    assert caught.value.response.headers["x-ai-fallback-hops"] == "claude/claude-3=timeout, openai/gpt-4o"
    assert elapsed < 2.5  # cut by the policy's 2 s budget, not by a provider answering


def test_spoofed_identity_header_is_stripped_and_ignored(stack: Stack, mock: Mock) -> None:
    spoof = {"x-ai-service": "order-service"}
    with pytest.raises(openai.PermissionDeniedError) as caught:
        openai_client(stack, "user-service").chat.completions.create(
            model="fraud_detector", messages=[{"role": "user", "content": "x"}], extra_headers=spoof)
    assert caught.value.body["code"] == "model_not_allowed"  # type: ignore[index]
    assert "demo/user-service" in caught.value.body["message"]  # type: ignore[index]
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic_client(stack, "user-service").messages.create(
            model="fraud_detector", max_tokens=5, messages=[{"role": "user", "content": "x"}], extra_headers=spoof)
    openai_client(stack, "user-service").chat.completions.create(
        model="auth_assistant", messages=[{"role": "user", "content": "x"}], extra_headers=spoof)
    assert "x-ai-service" not in mock.last("openai")["headers"]  # type: ignore[operator]


def test_provider_errors_reach_the_caller_intact(stack: Stack, mock: Mock) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        openai_client(stack, "user-service").chat.completions.create(
            model="auth_assistant", messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-status": "429"})
    assert caught.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        anthropic_client(stack, "order-service").messages.create(
            model="fraud_detector", max_tokens=5, messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-status": "529"})
    assert overloaded.value.status_code == 529


def test_ungoverned_paths_are_denied_and_provider_resources_governed(stack: Stack, mock: Mock) -> None:
    # As in the mesh, the app addresses the provider host.
    host = {"host": "api.openai.com", "authorization": "Bearer app-own-key"}
    denied = httpx.get(stack.base_url("user-service") + "/v1/files", headers=host)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "path_not_allowed"
    encoded = httpx.get(stack.base_url("user-service") + "/v1/fil%65s", headers=host)
    assert encoded.status_code == 403  # an encoded spelling is the same path
    assert mock.requests("openai") == []  # the provider never saw them
    # GET /v1/models is governed natively: the service's provider, its credential, not the app's key.
    models = httpx.get(stack.base_url("user-service") + "/v1/models?limit=2", headers=host)
    assert models.status_code == 200 and models.json()["object"] == "list"
    assert models.headers["x-ai-provider"] == "openai"
    sent = mock.last("openai")
    assert sent["path"] == "/v1/models" and sent["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"  # type: ignore[index]
    # Whatever host the app names, a path no AI endpoint covers is refused before any routing.
    response = httpx.get(stack.base_url("user-service") + "/healthz")
    assert response.status_code == 403 and response.json()["error"]["code"] == "path_not_allowed"
    completion = openai.OpenAI(base_url=stack.base_url("user-service") + "/v1", api_key="x", max_retries=0
                               ).chat.completions.create(model="auth_assistant",
                                                         messages=[{"role": "user", "content": "still there?"}])
    assert completion.choices[0].message.content == "mock reply from gpt-4: still there?"
    assert processor_alive(stack)

