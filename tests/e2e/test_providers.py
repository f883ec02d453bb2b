"""Every provider API through the real Envoy, driven by both official SDKs (#15).

One service, one model entry per provider: Azure OpenAI (a deployment path and the api-key header),
Bedrock (Converse, SigV4 by the AWS chain's keys, its binary event stream answered as SSE), Gemini
(API key), Vertex AI (an OAuth token google-auth fetches with a service-account key from the mock's
token endpoint) and an OpenAI-compatible server in the mesh on another port. Each is called with the
``openai`` and the ``anthropic`` SDK, as JSON, as a stream and with a tool, and must answer in the
caller's own format. Then one fallback across each new pair, and the credential failures.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from devtools.launch import free_port
from devtools.stack import Stack

SERVICE = "app-service"
VERTEX_PROJECT = "demo-project"
VERTEX_LOCATION = "us-central1"

# model name the caller sends → (provider, upstream model, the mock's record of its API)
ROUTES = {
    "azure-chat": ("azure", "gpt-4o-mini", "azure_openai"),
    "bedrock-chat": ("bedrock", "anthropic.claude-3-haiku-20240307-v1:0", "bedrock"),
    "gemini-chat": ("gemini", "gemini-2.5-flash", "gemini"),
    "vertex-chat": ("vertex", "gemini-2.5-flash", "vertex"),
    "compat-chat": ("compat", "llama-3.1-8b-instruct", "openai"),
    # The v1 path (the body names the deployment) with an Entra ID token.
    "azure-entra-v1": ("azure-entra", "gpt-4o-mini-prod", "azure_openai"),
}
ENTRA_TOKEN = "entra-demo-token"
TOOL_OPENAI: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_ANTHROPIC: Any = {"name": "get_weather", "description": "Weather for a city",
                       "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                        "required": ["city"]}}


def _policies(directory: Path, key_file: Path, token_file: Path) -> None:
    (directory / "mesh.yaml").write_text(f"""
mesh:
  unknown_service: deny
providers:
- name: azure
  api: azure_openai
  base_url: http://contoso-ai.openai.azure.com
  api_version: 2024-10-21
  deployments: {{gpt-4o-mini: gpt-4o-mini-prod}}
  credential: {{env: AZURE_OPENAI_API_KEY}}
- name: azure-entra
  api: azure_openai
  base_url: http://contoso-ai.openai.azure.com
  api_version: v1
  credential: {{type: entra_id, file: {token_file}}}
- name: bedrock
  api: bedrock
  region: us-east-1
  credential: {{type: aws}}
- name: bedrock-wrong-key
  api: bedrock
  region: us-east-1
  credential: {{type: aws, profile: wrong}}
- name: gemini
  api: gemini
  credential: {{env: GEMINI_API_KEY}}
- name: gemini-no-key
  api: gemini
  credential: {{env: GEMINI_KEY_NOBODY_SET}}
- name: vertex
  api: vertex
  project: {VERTEX_PROJECT}
  location: {VERTEX_LOCATION}
  credential: {{type: google, file: {key_file}}}
- name: compat
  api: openai_compatible
  base_url: http://vllm.models.svc.cluster.local:8000/v1
  credential: {{env: COMPATIBLE_API_KEY}}
- name: compat-no-key
  api: openai_compatible
  base_url: http://vllm-open.models.svc.cluster.local:8000/v1
""")
    models = [f"  - {{name: {name}, provider: {provider}, model: '{model}'}}"
              for name, (provider, model, _) in ROUTES.items()]
    models += [
        "  - {name: azure-then-openai, provider: azure, model: gpt-4o-mini, fallback: [openai/gpt-4o]}",
        "  - {name: bedrock-then-claude, provider: bedrock, model: 'anthropic.claude-3-haiku-20240307-v1:0', "
        "fallback: [claude/claude-3]}",
        "  - {name: compat-then-openai, provider: compat, model: llama-3.1-8b-instruct, fallback: [openai/gpt-4o]}",
        "  - {name: gemini-then-bedrock, provider: gemini, model: gemini-2.5-flash, "
        "fallback: ['bedrock/anthropic.claude-3-haiku-20240307-v1:0']}",
        "  - {name: openai-then-vertex, provider: openai, model: gpt-4o, fallback: [vertex/gemini-2.5-flash]}",
        "  - {name: bedrock-bad-signature, provider: bedrock-wrong-key, "
        "model: 'anthropic.claude-3-haiku-20240307-v1:0'}",
        "  - {name: gemini-no-key, provider: gemini-no-key, model: gemini-2.5-flash}",
        "  - {name: compat-unauthenticated, provider: compat-no-key, model: llama-3.1-8b-instruct}",
    ]
    (directory / "app.yaml").write_text(f"service: {SERVICE}\nai_proxy:\n  models:\n" + "\n".join(models) + "\n")


@pytest.fixture(scope="module")
def cloud(envoy_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("providers")
    port = free_port()
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = directory / "google-public.pem"
    public.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    key_file = directory / "vertex-key.json"
    key_file.write_text(json.dumps({
        "type": "service_account", "project_id": VERTEX_PROJECT, "private_key_id": "k1", "private_key": pem,
        "client_email": f"extproc@{VERTEX_PROJECT}.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": f"http://127.0.0.1:{port}/token"}))
    # A named profile with keys the mock does not know: its calls are signed, and refused at the mock.
    credentials = directory / "aws-credentials"
    credentials.write_text("[wrong]\naws_access_key_id = AKIADEMO00000000000\n"
                           "aws_secret_access_key = not-the-secret-the-mock-knows\n")
    policies = directory / "policies"
    policies.mkdir()
    token_file = directory / "entra-token"
    token_file.write_text(ENTRA_TOKEN + "\n")  # kept fresh by the platform (workload identity)
    _policies(policies, key_file, token_file)
    running = Stack(policies, tmp_path_factory.mktemp("providers-logs"), services=[SERVICE], cloud_port=port,
                    processor_env={"AWS_SHARED_CREDENTIALS_FILE": str(credentials)},
                    cloud_mock_args=["--google-public-key-file", str(public), "--vertex-project", VERTEX_PROJECT,
                                     "--vertex-location", VERTEX_LOCATION,
                                     "--azure-deployments", "gpt-4o-mini-prod=gpt-4o-mini",
                                     "--azure-token", ENTRA_TOKEN])
    yield running
    running.close()


def _clear(stack: Stack) -> None:
    for port in set(stack.mock_ports.values()):
        httpx.delete(f"http://127.0.0.1:{port}/_mock/requests").raise_for_status()


def _openai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url(SERVICE) + "/v1", api_key="sk-app-own-key", max_retries=0)


def _anthropic(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base_url(SERVICE), api_key="sk-ant-app-own-key", max_retries=0)


def _mock_api(name: str) -> str:
    """The mock that serves a route: the in-mesh OpenAI-compatible server is a process of its own."""
    return "openai_compatible" if ROUTES[name][2] == "openai" else ROUTES[name][2]


def _reached(stack: Stack, name: str) -> dict[str, Any]:
    """The one request the provider got: with the provider's credential, never the caller's."""
    api = ROUTES[name][2]
    records = [r for r in httpx.get(f"http://127.0.0.1:{stack.mock_ports[_mock_api(name)]}"
                                    "/_mock/requests").json() if r["provider_api"] == api]
    assert len(records) == 1, records
    headers = records[0]["headers"]
    assert "sk-app-own-key" not in json.dumps(headers) and "sk-ant-app-own-key" not in json.dumps(headers)
    return dict(records[0])


@pytest.mark.parametrize("name", list(ROUTES))
def test_openai_sdk_json_stream_and_tool(cloud: Stack, name: str) -> None:
    client = _openai(cloud)
    _clear(cloud)
    answer = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hello there"}])
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    record = _reached(cloud, name)
    _check_credential(name, record)

    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "stream please"}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    called = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "weather in Paris?"}], tools=[TOOL_OPENAI],
        tool_choice="required")
    calls = called.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert isinstance(json.loads(calls[0].function.arguments), dict)  # type: ignore[union-attr]
    assert called.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("name", list(ROUTES))
def test_anthropic_sdk_json_stream_and_tool(cloud: Stack, name: str) -> None:
    client = _anthropic(cloud)
    message = client.messages.create(model=name, max_tokens=100, messages=[{"role": "user", "content": "hello"}])
    assert message.content and message.content[0].type == "text" and message.content[0].text
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0

    with client.messages.stream(model=name, max_tokens=100,
                                messages=[{"role": "user", "content": "stream please"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.usage.output_tokens > 0 and final.stop_reason == "end_turn"

    called = client.messages.create(model=name, max_tokens=100, tools=[TOOL_ANTHROPIC],
                                    tool_choice={"type": "any"},
                                    messages=[{"role": "user", "content": "weather in Paris?"}])
    uses = [block for block in called.content if block.type == "tool_use"]
    assert uses and uses[0].name == "get_weather" and isinstance(uses[0].input, dict)
    assert called.stop_reason == "tool_use"


def _check_credential(name: str, record: dict[str, Any]) -> None:
    headers = record["headers"]
    provider = ROUTES[name][0]
    if provider == "azure":
        assert headers["api-key"] == "azure-demo-key" and "authorization" not in headers
        assert record["path"] == "/openai/deployments/gpt-4o-mini-prod/chat/completions"
        assert record["query"] == "api-version=2024-10-21"
    elif provider == "azure-entra":
        assert headers["authorization"] == f"Bearer {ENTRA_TOKEN}" and "api-key" not in headers
        assert record["path"] == "/openai/v1/chat/completions" and record["body"]["model"] == "gpt-4o-mini-prod"
    elif provider == "bedrock":
        assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIADEMO00000000000/")
        assert record["path"] == "/model/anthropic.claude-3-haiku-20240307-v1:0/converse"
    elif provider == "gemini":
        assert headers["x-goog-api-key"] == "gemini-demo-key"
        assert record["path"] == "/v1beta/models/gemini-2.5-flash:generateContent"
    elif provider == "vertex":
        assert headers["authorization"].startswith("Bearer ya29.")
        assert record["path"] == (f"/v1/projects/{VERTEX_PROJECT}/locations/{VERTEX_LOCATION}/publishers/google/"
                                  "models/gemini-2.5-flash:generateContent")
    else:
        assert headers["authorization"] == "Bearer in-mesh-demo-key"
        assert record["host"] == "vllm.models.svc.cluster.local:8000"


@pytest.mark.parametrize(("name", "failing", "answering"), [
    ("azure-then-openai", "cloud", "openai"),
    ("bedrock-then-claude", "cloud", "claude"),
    ("compat-then-openai", "in-mesh", "openai"),
    ("gemini-then-bedrock", "gemini-2.5-flash", "bedrock"),
    ("openai-then-vertex", "openai", "vertex"),
])
@pytest.mark.parametrize("sdk", ["openai", "openai-stream", "anthropic", "anthropic-stream"])
def test_fallback_across_each_new_pair(cloud: Stack, name: str, failing: str, answering: str, sdk: str) -> None:
    """The first hop answers 503 (only it: x-mock-only names its mock or model); the next answers, in the
    caller's format, whichever APIs the two providers speak."""
    faults = {"x-mock-status": "503", "x-mock-only": failing}
    messages: Any = [{"role": "user", "content": "fall back"}]
    if sdk == "openai":
        raw = _openai(cloud).chat.completions.with_raw_response.create(model=name, messages=messages,
                                                                       extra_headers=faults)
        assert raw.parse().choices[0].message.content
        headers = raw.headers
    elif sdk == "openai-stream":
        streamed = _openai(cloud).chat.completions.with_raw_response.create(
            model=name, messages=messages, extra_headers=faults, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)
        headers = streamed.headers
    elif sdk == "anthropic":
        message = _anthropic(cloud).messages.with_raw_response.create(model=name, max_tokens=50, messages=messages,
                                                                      extra_headers=faults)
        block = message.parse().content[0]
        assert block.type == "text" and block.text
        headers = message.headers
    else:
        with _anthropic(cloud).messages.stream(model=name, max_tokens=50, messages=messages,
                                               extra_headers=faults) as stream:
            assert "".join(stream.text_stream) and stream.get_final_message().usage.output_tokens > 0
            headers = stream.response.headers
    hops = headers["x-ai-fallback-hops"].split(", ")
    assert hops[0].endswith("=upstream_error") and hops[-1].startswith(answering + "/"), hops
    assert headers["x-ai-provider"] == answering


def test_a_wrong_signature_is_refused_at_the_mock(cloud: Stack) -> None:
    """Keys the provider does not know: the mock's SigV4 check refuses, and the caller gets the refusal in
    its own format."""
    with pytest.raises(openai.PermissionDeniedError) as caught:
        _openai(cloud).chat.completions.create(model="bedrock-bad-signature",
                                               messages=[{"role": "user", "content": "hi"}])
    assert "signature" in str(caught.value).lower() or "security token" in str(caught.value).lower()
    with pytest.raises(anthropic.PermissionDeniedError):
        _anthropic(cloud).messages.create(model="bedrock-bad-signature", max_tokens=10,
                                          messages=[{"role": "user", "content": "hi"}])


def test_a_missing_credential_is_a_503_naming_the_provider(cloud: Stack) -> None:
    _clear(cloud)
    with pytest.raises(openai.APIStatusError) as caught:
        _openai(cloud).chat.completions.create(model="gemini-no-key", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503
    assert "gemini-no-key" in caught.value.message and isinstance(caught.value.body, dict)
    with pytest.raises(anthropic.APIStatusError) as refused:
        _anthropic(cloud).messages.create(model="gemini-no-key", max_tokens=10,
                                          messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 503 and "gemini-no-key" in refused.value.message
    assert not [r for r in httpx.get(f"http://127.0.0.1:{cloud.mock_ports['gemini']}/_mock/requests").json()
                if r["provider_api"] == "gemini"], "nothing may reach the provider without its credential"
    log = "\n".join(p.log_text() for p in cloud.processors)
    assert "the credential of provider 'gemini-no-key' cannot be had" in log


def test_a_missing_key_is_refused_at_the_mock(cloud: Stack) -> None:
    """An in-mesh server that wants a key, reached through a provider entry that has none: the server's
    own 401 comes back to the caller in the caller's format (the caller's own key never goes)."""
    _clear(cloud)
    with pytest.raises(openai.AuthenticationError):
        _openai(cloud).chat.completions.create(model="compat-unauthenticated",
                                               messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.AuthenticationError):
        _anthropic(cloud).messages.create(model="compat-unauthenticated", max_tokens=10,
                                          messages=[{"role": "user", "content": "hi"}])
    records = httpx.get(f"http://127.0.0.1:{cloud.mock_ports['openai_compatible']}/_mock/requests").json()
    assert len(records) == 2 and all("authorization" not in r["headers"] for r in records), records


@pytest.mark.parametrize("name", list(ROUTES))
def test_openai_responses_api_json_stream_and_tool(cloud: Stack, name: str) -> None:
    """The Responses API of the official SDK, answered by each provider (natively by Azure's v1 path,
    translated through the canonical form by the others)."""
    client = _openai(cloud)
    response = client.responses.create(model=name, input="hello there")
    assert response.output_text and response.status == "completed"
    assert response.usage is not None and response.usage.input_tokens > 0 and response.usage.output_tokens > 0

    with client.responses.stream(model=name, input="stream please") as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text and final.output_text == text and final.usage is not None and final.usage.output_tokens > 0

    called = client.responses.create(
        model=name, input="weather in Paris?", tool_choice="required",
        tools=[{"type": "function", "name": "get_weather", "description": "Weather for a city", "strict": False,
                "parameters": TOOL_OPENAI["function"]["parameters"]}])
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and isinstance(json.loads(calls[0].arguments), dict)
