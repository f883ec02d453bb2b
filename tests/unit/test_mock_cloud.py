"""The mock provider's cloud APIs (devtools/mock_cloud.py), driven by the real clients where they exist.

Azure OpenAI through the official ``openai`` SDK's AzureOpenAI client, Bedrock through botocore (which signs
with SigV4 and parses the binary event stream itself, so a framing or signing mistake fails here), Gemini
and Vertex AI through plain HTTP, Vertex with a token from google-auth's service-account flow against the
mock's /token endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import botocore.session
import google.auth.exceptions
import google.auth.transport.requests
import httpx
import openai
import pytest
import urllib3
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer
from botocore.exceptions import ClientError, ResponseStreamingError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.oauth2 import service_account

from devtools import mock_cloud, mock_provider
from devtools.mock_provider import MockConfig, build_app

OPENAI_KEY = "sk-mock-openai-0123456789"
AZURE_KEY = "azure-key-0123456789abcdef"
AZURE_TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOi.entra-token"
AWS_KEY_ID = "AKIAMOCK0123456789AB"
AWS_SECRET = "mock/secret+access/key0123456789abcdefgh"
AWS_TOKEN = "IQoJb3JpZ2luX2VjEMOCK-session-token"
REGION = "us-east-1"
GEMINI_KEY = "AIzaSyMock0123456789"
PROJECT = "mock-project"
LOCATION = "us-central1"
BEDROCK_MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
GEMINI_MODEL = "gemini-2.0-flash"
USER_TEXT = "one two three four five six seven eight nine ten"
EIGHT_WORDS = "one two three four five six seven eight"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "days", "unit"],
}
WEATHER_ARGS = {"city": "mock", "days": 1, "unit": "c"}


def _rsa_pair() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private, public


PRIVATE_PEM, PUBLIC_PEM = _rsa_pair()


class _Server:
    """The mock on its own loop in a thread: the clients under test are synchronous."""

    def __init__(self, config: MockConfig) -> None:
        self.app = build_app(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mock-cloud", daemon=True)
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        self.url = ""

    async def _start(self) -> str:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def __enter__(self) -> _Server:
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


CONFIG = MockConfig(
    name="cloud",
    openai_key=OPENAI_KEY,
    azure_key=AZURE_KEY,
    azure_token=AZURE_TOKEN,
    azure_deployments={"chat-dep": "gpt-4o", "embed-dep": "text-embedding-3-small"},
    aws_access_key_id=AWS_KEY_ID,
    aws_secret_access_key=AWS_SECRET,
    aws_session_token=AWS_TOKEN,
    aws_region=REGION,
    gemini_key=GEMINI_KEY,
    google_public_key_pem=PUBLIC_PEM,
    vertex_project=PROJECT,
    vertex_location=LOCATION,
)


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    with _Server(CONFIG) as running:
        yield running


@pytest.fixture
def http(server: _Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def _records(http: httpx.Client) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = http.get("/_mock/requests").json()
    return records


# ---------------------------------------------------------------------------------------------------
# Azure OpenAI


def _azure(server: _Server, **auth: Any) -> openai.AzureOpenAI:
    auth = auth or {"api_key": AZURE_KEY}
    return openai.AzureOpenAI(azure_endpoint=server.url, api_version="2024-10-21", max_retries=0, **auth)


def test_azure_chat_with_api_key_on_a_deployment_path(server: _Server, http: httpx.Client) -> None:
    http.delete("/_mock/requests")
    with _azure(server) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="chat-dep", messages=[{"role": "user", "content": USER_TEXT}]
        )
    completion = raw.parse()
    assert completion.model == "gpt-4o"
    assert completion.choices[0].message.content == f"mock reply from gpt-4o: {EIGHT_WORDS}"
    assert raw.headers["x-mock-received-model"] == "gpt-4o" and raw.headers["apim-request-id"]
    record = _records(http)[-1]
    assert record["provider_api"] == "azure_openai"
    assert record["path"] == "/openai/deployments/chat-dep/chat/completions"
    assert record["query"] == "api-version=2024-10-21"
    assert record["headers"]["api-key"] == AZURE_KEY and "model" in record["body"]  # the SDK sends it too


def test_azure_stream_with_an_entra_id_token(server: _Server) -> None:
    with _azure(server, azure_ad_token=AZURE_TOKEN) as client:
        chunks = list(client.chat.completions.create(
            model="chat-dep", messages=[{"role": "user", "content": USER_TEXT}], stream=True,
            stream_options={"include_usage": True},
        ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"mock reply from gpt-4o: {EIGHT_WORDS}"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(text.split())


def test_azure_tool_call(server: _Server) -> None:
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]
    with _azure(server) as client:
        completion = client.chat.completions.create(
            model="chat-dep", messages=[{"role": "user", "content": "use get_weather for Paris"}], tools=tools
        )
    call = completion.choices[0].message.tool_calls[0]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == WEATHER_ARGS


def test_azure_embeddings_on_a_deployment_path(server: _Server) -> None:
    with _azure(server) as client:
        result = client.embeddings.create(model="embed-dep", input=["a", "b"])
    assert result.model == "text-embedding-3-small" and len(result.data) == 2


def test_azure_v1_paths_take_the_deployment_from_the_body(server: _Server, http: httpx.Client) -> None:
    http.delete("/_mock/requests")
    with openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key=AZURE_KEY, max_retries=0) as client:
        completion = client.chat.completions.create(model="chat-dep", messages=[{"role": "user", "content": "hi"}])
        response = client.responses.create(model="chat-dep", input="hello there")
    assert completion.model == "gpt-4o" and completion.choices[0].message.content == "mock reply from gpt-4o: hi"
    assert response.model == "gpt-4o" and response.output_text == "mock reply from gpt-4o: hello there"
    assert [r["provider_api"] for r in _records(http)] == ["azure_openai", "azure_openai"]


def test_openai_under_an_openai_v1_base_path_stays_openai(server: _Server, http: httpx.Client) -> None:
    http.delete("/_mock/requests")
    with openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key=OPENAI_KEY, max_retries=0) as client:
        completion = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
    assert completion.model == "m1"
    assert _records(http)[-1]["provider_api"] == "openai"


def test_azure_auth_errors(server: _Server, http: httpx.Client) -> None:
    with _azure(server, api_key="wrong") as client, pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="chat-dep", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401
    assert caught.value.body == {"code": "401", "message": mock_cloud._AZURE_401}
    with _azure(server, azure_ad_token="not-the-token") as client, pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="chat-dep", messages=[{"role": "user", "content": "hi"}])
    reply = http.post("/openai/deployments/chat-dep/chat/completions?api-version=2024-10-21", json={"messages": []})
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "401"


def test_azure_resource_and_deployment_not_found(server: _Server, http: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    missing_version = http.post("/openai/deployments/chat-dep/chat/completions", json=body,
                                headers={"api-key": AZURE_KEY})
    assert missing_version.status_code == 404
    assert missing_version.json() == {"error": {"code": "404", "message": "Resource not found"}}
    with _azure(server) as client, pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-dep", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "DeploymentNotFound"
    # The body needs no model on a deployment path.
    reply = http.post("/openai/deployments/chat-dep/chat/completions?api-version=2024-10-21", json=body,
                      headers={"api-key": AZURE_KEY})
    assert reply.status_code == 200 and reply.json()["model"] == "gpt-4o"


def test_azure_faults_in_azures_envelope(server: _Server) -> None:
    with _azure(server) as client:
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="chat-dep", messages=[{"role": "user", "content": "hi"}],
                                           extra_headers={"x-mock-status": "429"})
        assert limited.value.body["code"] == "429"
        assert limited.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(model="chat-dep", messages=[{"role": "user", "content": "hi"}],
                                           extra_headers={"x-mock-status": "503"})
        assert failed.value.body["code"] == "ServiceUnavailable"
        # x-mock-only by deployment name: aimed elsewhere, the fault is ignored.
        ok = client.chat.completions.create(model="chat-dep", messages=[{"role": "user", "content": "hi"}],
                                            extra_headers={"x-mock-status": "500", "x-mock-only": "other-dep"})
        assert ok.model == "gpt-4o"
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="chat-dep", messages=[{"role": "user", "content": "hi"}],
                                           extra_headers={"x-mock-status": "500", "x-mock-only": "chat-dep"})


# ---------------------------------------------------------------------------------------------------
# Bedrock Converse


def _bedrock(server: _Server, secret: str = AWS_SECRET, key_id: str = AWS_KEY_ID,
             token: str | None = AWS_TOKEN) -> Any:
    return botocore.session.get_session().create_client(
        "bedrock-runtime", region_name=REGION, endpoint_url=server.url, aws_access_key_id=key_id,
        aws_secret_access_key=secret, aws_session_token=token,
        config=Config(retries={"total_max_attempts": 1}, read_timeout=10),
    )


def _with_headers(client: Any, headers: dict[str, str]) -> Any:
    def add(request: AWSRequest, **_: Any) -> None:
        for name, value in headers.items():
            request.headers[name] = value

    client.meta.events.register("before-sign.bedrock-runtime.*", add)
    return client


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"text": text}]}


WEATHER_TOOLS = {"tools": [{"toolSpec": {"name": "get_weather", "description": "weather",
                                         "inputSchema": {"json": WEATHER_SCHEMA}}}]}


def test_bedrock_converse(server: _Server, http: httpx.Client) -> None:
    http.delete("/_mock/requests")
    result = _bedrock(server).converse(
        modelId=BEDROCK_MODEL, messages=[_user("an earlier question"), {"role": "assistant", "content": [
            {"text": "an answer"}]}, _user(USER_TEXT)], system=[{"text": "be terse"}],
        inferenceConfig={"maxTokens": 100, "temperature": 0.5},
    )
    assert result["output"]["message"] == {
        "role": "assistant", "content": [{"text": f"mock reply from {BEDROCK_MODEL}: {EIGHT_WORDS}"}]
    }
    assert result["stopReason"] == "end_turn"
    usage = result["usage"]
    assert usage["outputTokens"] == 12 and usage["totalTokens"] == usage["inputTokens"] + 12
    assert result["metrics"]["latencyMs"] >= 0 and result["ResponseMetadata"]["RequestId"]
    record = _records(http)[-1]
    assert record["provider_api"] == "bedrock" and record["path"] == f"/model/{BEDROCK_MODEL}/converse"
    assert record["headers"]["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={AWS_KEY_ID}/")


def test_bedrock_converse_tool_use_and_max_tokens(server: _Server) -> None:
    client = _bedrock(server)
    called = client.converse(modelId=BEDROCK_MODEL, messages=[_user("use get_weather for Paris")],
                             toolConfig=WEATHER_TOOLS)
    tool_use = called["output"]["message"]["content"][0]["toolUse"]
    assert called["stopReason"] == "tool_use" and tool_use["name"] == "get_weather"
    assert tool_use["input"] == WEATHER_ARGS and tool_use["toolUseId"].startswith("tooluse_")
    answered = client.converse(modelId=BEDROCK_MODEL, toolConfig=WEATHER_TOOLS, messages=[
        _user("use get_weather for Paris"),
        {"role": "assistant", "content": [{"toolUse": tool_use}]},
        {"role": "user", "content": [{"toolResult": {"toolUseId": tool_use["toolUseId"],
                                                     "content": [{"text": "sunny and warm"}]}}]},
    ])
    assert answered["output"]["message"]["content"] == [{"text": f"mock reply from {BEDROCK_MODEL}: sunny and warm"}]
    forced = client.converse(modelId=BEDROCK_MODEL, messages=[_user("hi")],
                             toolConfig={**WEATHER_TOOLS, "toolChoice": {"any": {}}})
    assert forced["stopReason"] == "tool_use"
    cut = client.converse(modelId=BEDROCK_MODEL, messages=[_user(USER_TEXT)], inferenceConfig={"maxTokens": 3})
    assert cut["stopReason"] == "max_tokens" and cut["output"]["message"]["content"][0]["text"] == "mock reply from"


def test_bedrock_converse_stream_text(server: _Server) -> None:
    client = _bedrock(server)
    whole = client.converse(modelId=BEDROCK_MODEL, messages=[_user(USER_TEXT)])
    streamed = client.converse_stream(modelId=BEDROCK_MODEL, messages=[_user(USER_TEXT)])
    assert streamed["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/vnd.amazon.eventstream"
    events = list(streamed["stream"])
    names = [next(iter(event)) for event in events]
    assert names[0] == "messageStart" and names[-3:] == ["contentBlockStop", "messageStop", "metadata"]
    deltas = [event["contentBlockDelta"]["delta"]["text"] for event in events if "contentBlockDelta" in event]
    assert len(deltas) == 12 and "".join(deltas) == whole["output"]["message"]["content"][0]["text"]
    assert events[-2]["messageStop"]["stopReason"] == "end_turn"
    assert events[-1]["metadata"]["usage"] == whole["usage"] and "latencyMs" in events[-1]["metadata"]["metrics"]


def test_bedrock_converse_stream_tool_use(server: _Server) -> None:
    streamed = _bedrock(server).converse_stream(
        modelId=BEDROCK_MODEL, messages=[_user("what does get_weather say?")], toolConfig=WEATHER_TOOLS
    )
    events = list(streamed["stream"])
    start = events[1]["contentBlockStart"]["start"]["toolUse"]
    assert start["name"] == "get_weather" and start["toolUseId"].startswith("tooluse_")
    deltas = [event["contentBlockDelta"]["delta"] for event in events if "contentBlockDelta" in event]
    pieces = [delta["toolUse"]["input"] for delta in deltas]
    assert len(pieces) >= 2 and json.loads("".join(pieces)) == WEATHER_ARGS
    assert events[-2]["messageStop"]["stopReason"] == "tool_use"


def test_bedrock_stream_frames_are_padded_and_decode(server: _Server) -> None:
    # botocore decodes and hides the frames: read them raw once, through its own decoder.
    payload = json.dumps({"messages": [_user("hi")]}).encode()
    reply = httpx.post(f"{server.url}/model/{BEDROCK_MODEL}/converse-stream", content=payload,
                       headers=_signed("POST", f"{server.url}/model/{BEDROCK_MODEL}/converse-stream", payload))
    buffer = EventStreamBuffer()
    buffer.add_data(reply.content)
    messages = list(buffer)
    assert [m.headers[":event-type"] for m in messages] == [
        "messageStart", *["contentBlockDelta"] * 5, "contentBlockStop", "messageStop", "metadata",
    ]  # "mock reply from <model>: hi", word by word
    for message in messages:
        assert message.headers[":content-type"] == "application/json" and message.headers[":message-type"] == "event"
        assert json.loads(message.payload)["p"]


def _signed(method: str, url: str, body: bytes, *, secret: str = AWS_SECRET,
            at: dt.datetime | None = None) -> dict[str, str]:
    """Headers of a request signed by botocore's SigV4 signer, optionally as of ``at``."""
    request = AWSRequest(method=method, url=url, data=body, headers={"content-type": "application/json"})
    signer = SigV4Auth(Credentials(AWS_KEY_ID, secret, AWS_TOKEN), "bedrock", REGION)
    if at is None:
        signer.add_auth(request)
    else:
        with mock.patch("botocore.auth.get_current_datetime", return_value=at):
            signer.add_auth(request)
    return dict(request.headers.items())


def test_bedrock_signature_errors(server: _Server, http: httpx.Client) -> None:
    with pytest.raises(ClientError) as wrong_secret:
        _bedrock(server, secret="not-the-secret").converse(modelId=BEDROCK_MODEL, messages=[_user("hi")])
    assert wrong_secret.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert wrong_secret.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "does not match" in wrong_secret.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as unknown_key:
        _bedrock(server, key_id="AKIAUNKNOWN000000000").converse(modelId=BEDROCK_MODEL, messages=[_user("hi")])
    assert unknown_key.value.response["Error"]["Code"] == "UnrecognizedClientException"
    with pytest.raises(ClientError) as no_token:
        _bedrock(server, token=None).converse(modelId=BEDROCK_MODEL, messages=[_user("hi")])
    assert no_token.value.response["Error"]["Code"] == "UnrecognizedClientException"

    missing = http.post(f"/model/{BEDROCK_MODEL}/converse", json={"messages": [_user("hi")]})
    assert missing.status_code == 403 and missing.json() == {"message": "Missing Authentication Token"}
    assert missing.headers["x-amzn-ErrorType"].startswith("MissingAuthenticationTokenException:")


def test_bedrock_signature_covers_body_and_date(server: _Server) -> None:
    url = f"{server.url}/model/{BEDROCK_MODEL}/converse"
    body = json.dumps({"messages": [_user("hi")]}).encode()
    assert httpx.post(url, content=body, headers=_signed("POST", url, body)).status_code == 200
    tampered = httpx.post(url, content=body.replace(b"hi", b"yo"), headers=_signed("POST", url, body))
    assert tampered.status_code == 403 and tampered.headers["x-amzn-ErrorType"].startswith("InvalidSignatureException:")
    old = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(minutes=10)
    expired = httpx.post(url, content=body, headers=_signed("POST", url, body, at=old))
    assert expired.status_code == 403 and expired.json()["message"].startswith("Signature expired")
    # The path is verified as it arrived, percent-encoding and all: signed with the model id's ':' as %3A
    # (as botocore sends it) but sent with a bare ':', the request is refused.
    encoded = url.replace(":0/", "%3A0/")
    assert httpx.post(encoded, content=body, headers=_signed("POST", encoded, body)).status_code == 200
    assert httpx.post(url, content=body, headers=_signed("POST", encoded, body)).status_code == 403


def test_bedrock_validation(server: _Server) -> None:
    client = _bedrock(server)
    cases: list[tuple[list[dict[str, Any]], str]] = [
        ([{"role": "assistant", "content": [{"text": "hi"}]}], "must start with a user message"),
        ([_user("a"), _user("b")], "must alternate"),
        ([_user(" ")], "is blank"),
    ]
    for messages, expected in cases:
        with pytest.raises(ClientError) as caught:
            client.converse(modelId=BEDROCK_MODEL, messages=messages)
        assert caught.value.response["Error"]["Code"] == "ValidationException"
        assert expected in caught.value.response["Error"]["Message"]
    url = f"{server.url}/model/{BEDROCK_MODEL}/converse"
    body = json.dumps({"messages": [_user("hi")], "temperature": 1}).encode()
    unknown = httpx.post(url, content=body, headers=_signed("POST", url, body))
    assert unknown.status_code == 400 and "extraneous key [temperature]" in unknown.json()["message"]
    assert unknown.headers["x-amzn-ErrorType"].startswith("ValidationException:")


def test_bedrock_faults(server: _Server) -> None:
    expected = {"429": "ThrottlingException", "503": "ServiceUnavailableException", "500": "InternalServerException",
                "400": "ValidationException"}
    for status, code in expected.items():
        client = _with_headers(_bedrock(server), {"x-mock-status": status})
        with pytest.raises(ClientError) as caught:
            client.converse(modelId=BEDROCK_MODEL, messages=[_user("hi")])
        assert caught.value.response["Error"]["Code"] == code
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == int(status)
    throttled = _with_headers(_bedrock(server), {"x-mock-status": "429"})
    with pytest.raises(ClientError) as caught:
        throttled.converse_stream(modelId=BEDROCK_MODEL, messages=[_user("hi")])
    assert caught.value.response["Error"]["Message"] == "Too many requests, please wait before trying again."
    elsewhere = _with_headers(_bedrock(server), {"x-mock-status": "429", "x-mock-only": "some-other-model"})
    assert elsewhere.converse(modelId=BEDROCK_MODEL, messages=[_user("hi")])["stopReason"] == "end_turn"


def test_bedrock_stream_cut_after(server: _Server) -> None:
    client = _with_headers(_bedrock(server), {"x-mock-cut-after": "3"})
    received: list[dict[str, Any]] = []
    # urllib3's error as this botocore raises it; newer botocore versions wrap it in ResponseStreamingError.
    with pytest.raises((urllib3.exceptions.HTTPError, ResponseStreamingError)):
        for event in client.converse_stream(modelId=BEDROCK_MODEL, messages=[_user(USER_TEXT)])["stream"]:
            received.append(event)
    assert len(received) == 3 and "messageStart" in received[0]


# ---------------------------------------------------------------------------------------------------
# Gemini API


def _contents(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "parts": [{"text": text}]}]


GEMINI_PATH = f"/v1beta/models/{GEMINI_MODEL}"
GEMINI_AUTH = {"x-goog-api-key": GEMINI_KEY}
GEMINI_TOOLS = [{"functionDeclarations": [{"name": "get_weather", "description": "weather", "parameters": {
    "type": "OBJECT", "properties": {"city": {"type": "STRING"}, "days": {"type": "INTEGER"}},
    "required": ["city", "days"]}}]}]


def test_gemini_generate_content(http: httpx.Client) -> None:
    http.delete("/_mock/requests")
    body = {"contents": _contents(USER_TEXT), "systemInstruction": {"parts": [{"text": "be terse"}]},
            "generationConfig": {"temperature": 0.2}}
    reply = http.post(f"{GEMINI_PATH}:generateContent", json=body, headers=GEMINI_AUTH)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    candidate = data["candidates"][0]
    assert candidate["content"] == {
        "role": "model", "parts": [{"text": f"mock reply from {GEMINI_MODEL}: {EIGHT_WORDS}"}]
    }
    assert candidate["finishReason"] == "STOP" and candidate["index"] == 0
    usage = data["usageMetadata"]
    assert usage["candidatesTokenCount"] == 12
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + 12
    assert data["modelVersion"] == GEMINI_MODEL and data["responseId"]
    record = _records(http)[-1]
    assert record["provider_api"] == "gemini" and reply.headers["x-mock-received-model"] == GEMINI_MODEL
    by_query = http.post(f"/v1/models/{GEMINI_MODEL}:generateContent?key={GEMINI_KEY}", json=body)
    assert by_query.status_code == 200


def test_gemini_stream_sse(http: httpx.Client) -> None:
    whole = http.post(f"{GEMINI_PATH}:generateContent", json={"contents": _contents(USER_TEXT)}, headers=GEMINI_AUTH)
    reply = http.post(f"{GEMINI_PATH}:streamGenerateContent?alt=sse", json={"contents": _contents(USER_TEXT)},
                      headers=GEMINI_AUTH)
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.content.endswith(b"\r\n\r\n") and b"\n\n" not in reply.content.replace(b"\r\n", b"")
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in reply.content.split(b"\r\n\r\n") if event]
    assert len(chunks) == 3
    text = "".join(chunk["candidates"][0]["content"]["parts"][0]["text"] for chunk in chunks)
    assert text == whole.json()["candidates"][0]["content"]["parts"][0]["text"]
    assert [c["candidates"][0].get("finishReason") for c in chunks] == [None, None, "STOP"]
    counts = [chunk["usageMetadata"]["candidatesTokenCount"] for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] == 12
    assert {chunk["usageMetadata"]["promptTokenCount"] for chunk in chunks} == {
        whole.json()["usageMetadata"]["promptTokenCount"]}


def test_gemini_stream_json_array(http: httpx.Client) -> None:
    reply = http.post(f"{GEMINI_PATH}:streamGenerateContent", json={"contents": _contents("hi")}, headers=GEMINI_AUTH)
    chunks = reply.json()
    assert isinstance(chunks, list) and chunks[-1]["candidates"][0]["finishReason"] == "STOP"


def test_gemini_function_call(http: httpx.Client) -> None:
    body = {"contents": _contents("use get_weather in Rome"), "tools": GEMINI_TOOLS}
    data = http.post(f"{GEMINI_PATH}:generateContent", json=body, headers=GEMINI_AUTH).json()
    assert data["candidates"][0]["content"]["parts"] == [
        {"functionCall": {"name": "get_weather", "args": {"city": "mock", "days": 1}}}
    ]
    forced = {"contents": _contents("hi"), "tools": GEMINI_TOOLS,
              "tool_config": {"function_calling_config": {"mode": "ANY"}}}
    streamed = http.post(f"{GEMINI_PATH}:streamGenerateContent?alt=sse", json=forced, headers=GEMINI_AUTH)
    chunk = json.loads(streamed.content.split(b"\r\n\r\n")[0].removeprefix(b"data: "))
    assert chunk["candidates"][0]["content"]["parts"][0]["functionCall"]["name"] == "get_weather"
    answered = {"tools": GEMINI_TOOLS, "contents": [
        *_contents("use get_weather in Rome"),
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"sky": "clear"}}}]},
    ]}
    text = http.post(f"{GEMINI_PATH}:generateContent", json=answered, headers=GEMINI_AUTH).json()
    assert "text" in text["candidates"][0]["content"]["parts"][0]


def test_gemini_auth_and_validation_errors(http: httpx.Client) -> None:
    body = {"contents": _contents("hi")}
    wrong = http.post(f"{GEMINI_PATH}:generateContent", json=body, headers={"x-goog-api-key": "nope"})
    assert wrong.status_code == 400
    assert {k: wrong.json()["error"][k] for k in ("code", "message", "status")} == {
        "code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT"}
    missing = http.post(f"{GEMINI_PATH}:generateContent", json=body)
    assert missing.status_code == 403 and missing.json()["error"]["status"] == "PERMISSION_DENIED"
    unknown = http.post(f"{GEMINI_PATH}:generateContent", json={**body, "temperature": 1}, headers=GEMINI_AUTH)
    assert unknown.status_code == 400
    assert unknown.json()["error"]["message"] == (
        'Invalid JSON payload received. Unknown name "temperature": Cannot find field.'
    )
    empty = http.post(f"{GEMINI_PATH}:generateContent", json={"contents": []}, headers=GEMINI_AUTH)
    assert empty.status_code == 400 and "contents is not specified" in empty.json()["error"]["message"]
    role = http.post(f"{GEMINI_PATH}:generateContent", json={"contents": [{"role": "assistant", "parts": [
        {"text": "x"}]}]}, headers=GEMINI_AUTH)
    assert role.json()["error"]["message"] == "Please use a valid role: user, model."


def test_gemini_faults(http: httpx.Client) -> None:
    for status, code in ((429, "RESOURCE_EXHAUSTED"), (503, "UNAVAILABLE"), (500, "INTERNAL")):
        reply = http.post(f"{GEMINI_PATH}:generateContent", json={"contents": _contents("hi")},
                          headers={**GEMINI_AUTH, "x-mock-status": str(status)})
        assert reply.status_code == status and reply.json()["error"]["status"] == code
        assert reply.json()["error"]["code"] == status
    cut = http.post(f"{GEMINI_PATH}:generateContent", json={"contents": _contents("hi")},
                    headers={**GEMINI_AUTH, "x-mock-status": "429", "x-mock-only": "gemini-1.5-pro"})
    assert cut.status_code == 200


def test_gemini_stream_cut_after(server: _Server) -> None:
    received = b""
    with (
        httpx.Client(timeout=10) as client,
        pytest.raises(httpx.HTTPError),
        client.stream("POST", f"{server.url}{GEMINI_PATH}:streamGenerateContent?alt=sse",
                      json={"contents": _contents(USER_TEXT)},
                      headers={**GEMINI_AUTH, "x-mock-cut-after": "1"}) as reply,
    ):
        for piece in reply.iter_bytes():
            received += piece
    assert received.count(b"\r\n\r\n") == 1


# ---------------------------------------------------------------------------------------------------
# Vertex AI and the OAuth token endpoint


VERTEX_PATH = f"/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/{GEMINI_MODEL}"


def _service_account(server: _Server, private_pem: str = PRIVATE_PEM) -> service_account.Credentials:
    info = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "mock-key-1",
        "private_key": private_pem,
        "client_email": f"mock@{PROJECT}.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": f"{server.url}/token",
    }
    return service_account.Credentials.from_service_account_info(
        info, scopes=["https://www.googleapis.com/auth/cloud-platform"]
    )


def _vertex_token(server: _Server) -> str:
    credentials = _service_account(server)
    credentials.refresh(google.auth.transport.requests.Request())
    token = credentials.token
    assert isinstance(token, str)
    return token


def test_vertex_with_a_google_auth_token(server: _Server, http: httpx.Client) -> None:
    http.delete("/_mock/requests")
    token = _vertex_token(server)
    assert token.startswith("ya29.mock-")
    reply = http.post(f"{VERTEX_PATH}:generateContent", json={"contents": _contents(USER_TEXT)},
                      headers={"authorization": f"Bearer {token}"})
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["candidates"][0]["content"]["parts"][0]["text"] == f"mock reply from {GEMINI_MODEL}: {EIGHT_WORDS}"
    assert data["createTime"] and data["usageMetadata"]["candidatesTokenCount"] == 12
    oauth, vertex = _records(http)
    assert oauth["provider_api"] == "google_oauth" and oauth["body"]["grant_type"].endswith("jwt-bearer")
    assert vertex["provider_api"] == "vertex"
    streamed = http.post(f"{VERTEX_PATH}:streamGenerateContent?alt=sse", json={"contents": _contents(USER_TEXT)},
                         headers={"authorization": f"Bearer {token}"})
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in streamed.content.split(b"\r\n\r\n") if e]
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == (
        data["candidates"][0]["content"]["parts"][0]["text"])


def test_vertex_auth_errors(server: _Server, http: httpx.Client) -> None:
    body = {"contents": _contents("hi")}
    for headers in ({}, {"authorization": "Bearer ya29.never-issued"}):
        reply = http.post(f"{VERTEX_PATH}:generateContent", json=body, headers=headers)
        assert reply.status_code == 401
        assert reply.json()["error"]["status"] == "UNAUTHENTICATED"
        assert reply.json()["error"]["message"] == mock_cloud._VERTEX_401
    token = _vertex_token(server)
    server.app[mock_cloud.TOKENS_KEY][token] = time.time() - 1  # expired
    assert http.post(f"{VERTEX_PATH}:generateContent", json=body,
                     headers={"authorization": f"Bearer {token}"}).status_code == 401
    token = _vertex_token(server)
    auth = {"authorization": f"Bearer {token}"}
    project = http.post(VERTEX_PATH.replace(PROJECT, "other-project") + ":generateContent", json=body, headers=auth)
    assert project.status_code == 403 and project.json()["error"]["status"] == "PERMISSION_DENIED"
    location = http.post(VERTEX_PATH.replace(LOCATION, "europe-west4") + ":generateContent", json=body, headers=auth)
    assert location.status_code == 404 and location.json()["error"]["status"] == "NOT_FOUND"
    fault = http.post(f"{VERTEX_PATH}:generateContent", json=body, headers={**auth, "x-mock-status": "503"})
    assert fault.status_code == 503 and fault.json()["error"]["status"] == "UNAVAILABLE"


def test_token_endpoint_refuses_a_bad_signature(server: _Server, http: httpx.Client) -> None:
    other_private, _ = _rsa_pair()
    credentials = _service_account(server, other_private)
    with pytest.raises(google.auth.exceptions.RefreshError) as caught:
        credentials.refresh(google.auth.transport.requests.Request())
    assert "invalid_grant" in str(caught.value) and "Invalid JWT Signature." in str(caught.value)
    garbage = http.post("/token", data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                        "assertion": "not.a.jwt"})
    assert garbage.status_code == 400
    assert garbage.json() == {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
    wrong_grant = http.post("/token", data={"grant_type": "client_credentials"})
    assert wrong_grant.status_code == 400 and wrong_grant.json()["error"] == "unsupported_grant_type"


def test_token_endpoint_checks_audience_and_expiry(server: _Server, http: httpx.Client) -> None:
    from google.auth import crypt, jwt

    signer = crypt.RSASigner.from_string(PRIVATE_PEM)
    now = int(time.time())

    def assertion(**claims: Any) -> str:
        payload = {"iss": "mock@x", "scope": "s", "aud": f"{server.url}/token", "iat": now, "exp": now + 3600}
        encoded: bytes = jwt.encode(signer, {**payload, **claims})
        return encoded.decode()

    def post(jwt_assertion: str) -> httpx.Response:
        return http.post("/token", data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                         "assertion": jwt_assertion})

    assert post(assertion()).status_code == 200
    assert "audience" in post(assertion(aud="https://oauth2.googleapis.com/elsewhere")).json()["error_description"]
    expired = post(assertion(iat=now - 7200, exp=now - 3600)).json()
    assert expired["error"] == "invalid_grant" and "short-lived" in expired["error_description"]
    header = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    unsigned = header + "." + assertion().split(".", 1)[1]
    assert post(unsigned).json()["error_description"] == "Invalid JWT Signature."


# ---------------------------------------------------------------------------------------------------
# configuration


def test_command_line_flags(tmp_path: Any) -> None:
    key_file = tmp_path / "google.pem"
    key_file.write_text(PUBLIC_PEM)
    host, port, config = mock_provider.parse_args([
        "--port", "9", "--azure-key", "k", "--azure-token", "t", "--azure-deployments", "a=gpt-4o, b",
        "--aws-access-key-id", "AKID", "--aws-secret-access-key", "s", "--aws-session-token", "st",
        "--aws-region", "eu-west-1", "--gemini-key", "g", "--google-public-key-file", str(key_file),
        "--vertex-project", "p", "--vertex-location", "l",
    ])
    assert (host, port) == ("127.0.0.1", 9)
    assert config.azure_key == "k" and config.azure_token == "t"
    assert dict(config.azure_deployments) == {"a": "gpt-4o", "b": "b"}
    assert (config.aws_access_key_id, config.aws_secret_access_key, config.aws_session_token, config.aws_region) == (
        "AKID", "s", "st", "eu-west-1")
    assert config.gemini_key == "g" and config.google_public_key_pem == PUBLIC_PEM
    assert (config.vertex_project, config.vertex_location) == ("p", "l")


def test_without_cloud_credentials_nothing_is_checked() -> None:
    with _Server(MockConfig(name="open")) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.post(f"/model/{BEDROCK_MODEL}/converse", json={"messages": [_user("hi")]}).status_code == 200
        assert client.post(f"{GEMINI_PATH}:generateContent", json={"contents": _contents("hi")}).status_code == 200
        reply = client.post("/openai/deployments/anything/chat/completions?api-version=2024-10-21",
                            json={"messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200 and reply.json()["model"] == "anything"
