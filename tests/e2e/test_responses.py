"""The OpenAI Responses API and the paths beyond the AI endpoints, through the real Envoy with the official SDK.

A Responses call is governed like a chat completion: routed and aliased, credentialed, charged and
settled from the provider's own usage, and falls back to an Anthropic provider in the Responses
format (JSON and SSE). A request naming state only its provider keeps does not fall back. Paths a
policy allows are served with the provider's credential; others are refused.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from devtools.stack import ANTHROPIC_KEY, OPENAI_KEY, Stack
from tests.e2e.conftest import Mock

POLICY = """\
mesh:
  unknown_paths: deny
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_API_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_API_KEY}}
---
service: order-service
ai_proxy:
  limits: {tokens: 100000/min}
  allow_paths:
  - {path: /v1/files/**, methods: [GET], provider: openai}
  models:
  - name: assistant
    provider: openai
    model: gpt-4o
    timeout: 8000ms
    fallback: [claude/claude-3]
    circuit_breaker: {consecutive_failures: 1000}
"""
OPENAI_FAILS = {"x-mock-only": "openai", "x-mock-status": "503"}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def stack(envoy_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    policies = tmp_path_factory.mktemp("responses-policies")
    (policies / "policy.yaml").write_text(POLICY)
    running = Stack(policies, tmp_path_factory.mktemp("responses"), services=["order-service"])
    yield running
    running.close()


@pytest.fixture
def mock(stack: Stack) -> Mock:
    recorder = Mock(stack)
    recorder.clear()
    return recorder


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url("order-service") + "/v1", api_key="app-key", max_retries=0)


def used_tokens(stack: Stack) -> int:
    limits = httpx.get(f"http://127.0.0.1:{stack.admin_port}/quota").json()["limits"]
    return sum(int(line["used"]) for line in limits if line["metric"] == "total_tokens")


def test_a_responses_call_is_routed_credentialed_and_charged(stack: Stack, mock: Mock) -> None:
    before = used_tokens(stack)
    raw = client(stack).responses.with_raw_response.create(model="assistant", input="hello there",
                                                          max_output_tokens=50)
    response = raw.parse()
    assert response.status == "completed" and response.output_text == "mock reply from gpt-4o: hello there"
    assert raw.headers["x-ai-provider"] == "openai" and raw.headers["x-ai-model"] == "gpt-4o"
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    sent = mock.last("openai")
    assert sent["path"] == "/v1/responses" and sent["body"]["model"] == "gpt-4o"  # type: ignore[index]
    assert sent["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"  # type: ignore[index]
    assert response.usage is not None
    # Settled from the provider's own usage (the reservation of max_output_tokens is replaced).
    assert used_tokens(stack) - before == response.usage.total_tokens


def test_a_responses_stream_with_text_and_a_function_call(stack: Stack, mock: Mock) -> None:
    with client(stack).responses.stream(model="assistant", input="tell me a story") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "mock reply from gpt-4o: tell me a story"
    assert final.usage is not None and final.usage.output_tokens > 0
    with client(stack).responses.stream(model="assistant", input="what is get_weather in Paris?",
                                        tools=[WEATHER]) as stream:  # type: ignore[list-item]
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather"]


def test_a_responses_call_falls_back_to_anthropic_in_the_responses_format(stack: Stack, mock: Mock) -> None:
    raw = client(stack).responses.with_raw_response.create(model="assistant", input="score order 42",
                                                          instructions="be brief", extra_headers=OPENAI_FAILS)
    response = raw.parse()  # the SDK's own parser: a Responses-format answer
    assert response.output_text == "mock reply from claude-3: score order 42"
    assert response.model == "assistant" and response.usage is not None and response.usage.output_tokens > 0
    assert raw.headers["x-ai-fallback-hops"] == "openai/gpt-4o=upstream_error, claude/claude-3"
    sent = mock.last("anthropic")
    assert sent["path"] == "/v1/messages" and sent["body"]["system"] == "be brief"  # type: ignore[index]
    assert sent["headers"]["x-api-key"] == ANTHROPIC_KEY  # type: ignore[index]
    with client(stack).responses.stream(model="assistant", input="stream it", tools=[WEATHER],  # type: ignore[list-item]
                                        extra_headers=OPENAI_FAILS) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == "mock reply from claude-3: stream it"
    assert final.status == "completed" and final.usage is not None


def test_a_request_naming_provider_state_does_not_fall_back(stack: Stack, mock: Mock) -> None:
    first = client(stack).responses.create(model="assistant", input="remember 42")
    with pytest.raises(openai.InternalServerError) as caught:  # the provider's own error, not a wrong answer
        client(stack).responses.create(model="assistant", input="what did I say?", previous_response_id=first.id,
                                       extra_headers=OPENAI_FAILS)
    assert caught.value.status_code == 503
    assert "x-ai-fallback-hops" not in caught.value.response.headers
    assert mock.requests("anthropic") == []
    follow_up = client(stack).responses.create(model="assistant", input="what did I say?",
                                               previous_response_id=first.id)
    assert follow_up.status == "completed"


def test_stored_responses_go_to_the_provider_that_keeps_them(stack: Stack, mock: Mock) -> None:
    created = client(stack).responses.create(model="assistant", input="keep me")
    fetched = client(stack).responses.retrieve(created.id)
    assert fetched.id == created.id and fetched.output_text == created.output_text
    items = client(stack).responses.input_items.list(created.id)
    assert [i.type for i in items.data] == ["message"]
    client(stack).responses.delete(created.id)
    assert all(r["headers"]["authorization"] == f"Bearer {OPENAI_KEY}" for r in mock.requests("openai"))  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client(stack).responses.retrieve(created.id)


def test_bad_responses_input_is_answered_in_the_openai_format(stack: Stack, mock: Mock) -> None:
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client(stack).responses.create(model="gpt-5-ultra", input="x")
    assert denied.value.code == "model_not_allowed"
    with pytest.raises(openai.BadRequestError) as bad:
        client(stack).responses.create(model="assistant", input=5)  # type: ignore[arg-type]
    assert bad.value.status_code == 400 and isinstance(bad.value.body, dict)
    with pytest.raises(openai.BadRequestError) as missing:
        client(stack).responses.create(model="assistant")  # type: ignore[call-overload]
    assert missing.value.status_code == 400
    # A stream cut mid-way makes the SDK raise: it never ends cleanly.
    with pytest.raises(openai.APIError), client(stack).responses.stream(
            model="assistant", input="cut me short", extra_headers={"x-mock-cut-after": "4"}) as stream:
        for _ in stream:
            pass


def test_an_allowed_path_is_served_and_others_refused(stack: Stack, mock: Mock) -> None:
    files = httpx.get(stack.base_url("order-service") + "/v1/files",
                      headers={"host": "api.openai.com", "authorization": "Bearer app-key"})
    assert files.headers.get("x-mock-provider") == "openai"  # it reached the provider...
    assert mock.last("openai")["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"  # type: ignore[index]
    batches = httpx.get(stack.base_url("order-service") + "/v1/batches", headers={"host": "api.openai.com"})
    assert batches.status_code == 403 and batches.json()["error"]["code"] == "path_not_allowed"
    posted = httpx.post(stack.base_url("order-service") + "/v1/files", content=b"data",
                        headers={"host": "api.openai.com"})
    assert posted.status_code == 403  # GET only
