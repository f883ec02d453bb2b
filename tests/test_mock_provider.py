"""Proves the mock provider speaks the real wire formats by driving it with the official SDKs.

The SDKs are used unmodified (only `base_url`, `api_key` and `max_retries=0`), so any drift in JSON
shape, SSE framing, status codes or headers shows up as an SDK parse error or a wrong exception class.
Raw `httpx` is used alongside where the SDKs hide wire details (absent vs null keys, SSE event names).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import re
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from aiohttp import web

from devtools.mock_provider import MockConfig, build_app, serve

OPENAI_KEY = "sk-mock-openai-0123456789"
ANTHROPIC_KEY = "sk-ant-mock-0123456789"
USER_TEXT = "one two three four five six seven eight nine ten"
EIGHT_WORDS = "one two three four five six seven eight"


class _MockServer:
    """Runs the app on its own loop in a thread, because the SDKs under test are synchronous."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mock-provider", daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _start(self) -> int:
        self.runner = web.AppRunner(build_app(self.config), access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return int(self.runner.addresses[0][1])

    def start(self) -> _MockServer:
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def server() -> Iterator[_MockServer]:
    mock = _MockServer(
        MockConfig(openai_key=OPENAI_KEY, anthropic_key=ANTHROPIC_KEY, name="mock-test")
    ).start()
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def defaults_server() -> Iterator[_MockServer]:
    mock = _MockServer(
        MockConfig(name="mock-defaults", latency_ms=200, fault_status=503, record_limit=2)
    ).start()
    yield mock
    mock.stop()


@pytest.fixture
def oai(server: _MockServer) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=OPENAI_KEY, max_retries=0)
    yield client
    client.close()


@pytest.fixture
def claude(server: _MockServer) -> Iterator[anthropic.Anthropic]:
    client = anthropic.Anthropic(base_url=server.url, api_key=ANTHROPIC_KEY, max_retries=0)
    yield client
    client.close()


@pytest.fixture
def raw(server: _MockServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


OPENAI_AUTH = {"authorization": f"Bearer {OPENAI_KEY}"}
ANTHROPIC_HEADERS = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}


def _chat_messages() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "an earlier question"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": [{"type": "text", "text": USER_TEXT}]},
    ]


def _expected_prompt_tokens(*texts: str) -> int:
    return max(1, math.ceil(sum(len(t) for t in texts) / 4))


def _sse_data(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def _aiohttp_problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("aiohttp") and r.levelno >= logging.WARNING
    ]


def _exception_chain(exc: BaseException) -> str:
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        parts.append(repr(seen))
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(parts)


# ---------------------------------------------------------------------------------------------------
# plumbing


def test_health_and_unknown_path(raw: httpx.Client, oai: openai.OpenAI) -> None:
    health = raw.get("/_mock/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}

    missing = raw.post("/v1/completions-that-do-not-exist", json={})
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {
            "message": "Invalid URL (POST /v1/completions-that-do-not-exist)",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    # The SDK must classify the envelope as a 404 rather than failing to parse it (the mock has no files API).
    with pytest.raises(openai.NotFoundError) as info:
        oai.files.list()
    assert info.value.type == "invalid_request_error"


# ---------------------------------------------------------------------------------------------------
# OpenAI chat completions


def test_chat_json(oai: openai.OpenAI) -> None:
    raw_response = oai.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=_chat_messages(), extra_headers={"x-request-id": "rid-chat-1"}
    )
    completion = raw_response.parse()

    reply = f"mock reply from gpt-4o-mini: {EIGHT_WORDS}"
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert abs(completion.created - time.time()) < 60
    assert completion.system_fingerprint
    choice = completion.choices[0]
    assert (choice.index, choice.finish_reason, choice.logprobs) == (0, "stop", None)
    assert choice.message.role == "assistant"
    assert choice.message.content == reply
    assert choice.message.refusal is None

    prompt = _expected_prompt_tokens("You are terse.", "an earlier question", "an earlier answer", USER_TEXT)
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, len(reply.split()))
    assert usage.total_tokens == prompt + len(reply.split())
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0

    headers = raw_response.headers
    assert headers["x-mock-provider"] == "mock-test"
    assert headers["x-mock-received-model"] == "gpt-4o-mini"
    assert headers["x-request-id"] == "rid-chat-1"
    assert int(headers["openai-processing-ms"]) >= 0
    assert headers["content-type"].startswith("application/json")


def test_chat_under_provider_base_path(server: _MockServer, raw: httpx.Client) -> None:
    raw.delete("/_mock/requests")
    with openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key=OPENAI_KEY, max_retries=0) as client:
        completion = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "mock reply from m1: hi"
    assert raw.get("/_mock/requests").json()[-1]["path"] == "/openai/v1/chat/completions"


def test_chat_stream_without_usage(oai: openai.OpenAI, raw: httpx.Client) -> None:
    expected = oai.chat.completions.create(model="gpt-4o", messages=_chat_messages())
    chunks = list(oai.chat.completions.create(model="gpt-4o", messages=_chat_messages(), stream=True))

    first, *content, last = chunks
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert all(len(c.choices) == 1 and c.choices[0].finish_reason is None for c in content)
    assert last.choices[0].finish_reason == "stop"
    assert last.choices[0].delta.content is None
    assert "".join(c.choices[0].delta.content or "" for c in content) == expected.choices[0].message.content
    # One delta per word, so a buffering proxy that re-chunks the body would still be detectable.
    assert len(content) == len(expected.choices[0].message.content.split())
    assert len({c.id for c in chunks}) == 1
    assert all(c.usage is None for c in chunks)

    # On the wire OpenAI omits the usage key entirely unless usage was requested.
    with raw.stream(
        "POST",
        "/v1/chat/completions",
        headers=OPENAI_AUTH,
        json={"model": "gpt-4o", "messages": _chat_messages(), "stream": True},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "transfer-encoding" in response.headers
        lines = list(response.iter_lines())
    data = _sse_data(lines)
    assert data[-1] == "[DONE]"
    assert all("usage" not in orjson.loads(d) for d in data[:-1])
    # Events are separated by blank lines exactly as `data: ...\n\n`.
    assert lines.count("") == len(data)


def test_chat_stream_with_usage(oai: openai.OpenAI, raw: httpx.Client) -> None:
    expected = oai.chat.completions.create(model="gpt-4o", messages=_chat_messages())
    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o", messages=_chat_messages(), stream=True, stream_options={"include_usage": True}
        )
    )

    *body, usage_chunk = chunks
    assert usage_chunk.choices == []
    assert usage_chunk.usage == expected.usage
    assert all(c.usage is None for c in body)
    assert body[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in body) == expected.choices[0].message.content

    with raw.stream(
        "POST",
        "/v1/chat/completions",
        headers=OPENAI_AUTH,
        json={
            "model": "gpt-4o",
            "messages": _chat_messages(),
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        data = _sse_data(list(response.iter_lines()))
    events = [orjson.loads(d) for d in data[:-1]]
    assert data[-1] == "[DONE]"
    assert all("usage" in e and e["usage"] is None for e in events[:-1])
    assert expected.usage is not None
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["total_tokens"] == expected.usage.total_tokens


def test_chat_stream_is_not_buffered(oai: openai.OpenAI) -> None:
    delay = 0.05
    arrivals: list[float] = []
    stream = oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": USER_TEXT}],
        stream=True,
        extra_headers={"x-mock-event-delay-ms": str(int(delay * 1000))},
    )
    for _chunk in stream:
        arrivals.append(time.monotonic())
    # A buffered response would deliver every chunk at (nearly) the same instant.
    assert len(arrivals) > 5
    assert arrivals[-1] - arrivals[0] >= delay * (len(arrivals) - 1) * 0.8
    assert arrivals[1] - arrivals[0] >= delay * 0.8


def test_chat_stream_options_without_stream_is_rejected(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream_options={"include_usage": True}
        )
    assert info.value.param == "stream_options"


# ---------------------------------------------------------------------------------------------------
# OpenAI embeddings


def test_embeddings_sdk_default_base64_matches_float(oai: openai.OpenAI, raw: httpx.Client) -> None:
    raw.delete("/_mock/requests")
    default = oai.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta gamma"])
    assert raw.get("/_mock/requests").json()[-1]["body"]["encoding_format"] == "base64"
    explicit = oai.embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta gamma"], encoding_format="float"
    )

    assert [d.embedding for d in default.data] == [d.embedding for d in explicit.data]
    assert [d.index for d in explicit.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in explicit.data)
    assert all(abs(math.sqrt(sum(v * v for v in d.embedding)) - 1.0) < 1e-5 for d in explicit.data)
    assert explicit.data[0].embedding != explicit.data[1].embedding
    assert explicit.model == "text-embedding-3-small"
    tokens = _expected_prompt_tokens("alpha") + _expected_prompt_tokens("beta gamma")
    assert (explicit.usage.prompt_tokens, explicit.usage.total_tokens) == (tokens, tokens)

    # The wire value must be little-endian float32, which is what the SDK decodes.
    wire = raw.post(
        "/v1/embeddings",
        headers=OPENAI_AUTH,
        json={"model": "text-embedding-3-small", "input": "alpha", "encoding_format": "base64"},
    ).json()
    encoded = wire["data"][0]["embedding"]
    assert isinstance(encoded, str)
    assert list(struct.unpack("<8f", base64.b64decode(encoded))) == explicit.data[0].embedding


def test_embeddings_dimensions_and_token_inputs(oai: openai.OpenAI) -> None:
    wide = oai.embeddings.create(model="e", input="alpha", dimensions=16, encoding_format="float")
    assert len(wide.data[0].embedding) == 16

    again = oai.embeddings.create(model="e", input="alpha", dimensions=16)
    assert again.data[0].embedding == wide.data[0].embedding

    tokens = oai.embeddings.create(model="e", input=[1, 2, 3], encoding_format="float")
    assert len(tokens.data) == 1 and tokens.usage.prompt_tokens == 3

    batches = oai.embeddings.create(model="e", input=[[1, 2], [3, 4, 5]], encoding_format="float")
    assert [d.index for d in batches.data] == [0, 1]
    assert batches.usage.total_tokens == 5
    assert batches.data[0].embedding != batches.data[1].embedding


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "e", "input": []}, "input"),
        ({"model": "e", "input": ["ok", 3]}, "input"),
        ({"model": "e"}, "input"),
        ({"model": "e", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "e", "input": "x", "dimensions": 0}, "dimensions"),
    ],
)
def test_embeddings_invalid_requests(raw: httpx.Client, body: dict[str, Any], param: str) -> None:
    response = raw.post("/v1/embeddings", headers=OPENAI_AUTH, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


# ---------------------------------------------------------------------------------------------------
# Anthropic messages

SYSTEM_BLOCKS = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]


def _anthropic_messages() -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": [{"type": "text", "text": "first answer"}]},
        {"role": "user", "content": [{"type": "text", "text": USER_TEXT}]},
    ]


def test_anthropic_json(claude: anthropic.Anthropic) -> None:
    raw_response = claude.messages.with_raw_response.create(
        model="claude-test-model",
        max_tokens=64,
        system=SYSTEM_BLOCKS,
        messages=_anthropic_messages(),
        extra_headers={"x-request-id": "rid-msg-1"},
    )
    message = raw_response.parse()

    reply = f"mock reply from claude-test-model: {EIGHT_WORDS}"
    assert message.id.startswith("msg_")
    assert (message.type, message.role, message.model) == ("message", "assistant", "claude-test-model")
    assert len(message.content) == 1
    block = message.content[0]
    assert block.type == "text" and block.text == reply
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    # The system prompt counts towards input tokens (joined blocks: "Be brief. Be kind.").
    expected_input = _expected_prompt_tokens(
        "Be brief. Be kind.", "first question", "first answer", USER_TEXT
    )
    assert message.usage.input_tokens == expected_input
    assert message.usage.output_tokens == len(reply.split())
    assert message.usage.cache_creation_input_tokens == 0
    assert message.usage.cache_read_input_tokens == 0

    headers = raw_response.headers
    assert headers["request-id"].startswith("req_")
    assert headers["x-mock-provider"] == "mock-test"
    assert headers["x-mock-received-model"] == "claude-test-model"
    assert headers["x-request-id"] == "rid-msg-1"
    assert "openai-processing-ms" not in headers


def test_anthropic_stream(claude: anthropic.Anthropic, raw: httpx.Client) -> None:
    expected = claude.messages.create(
        model="claude-haiku", max_tokens=64, system="Be brief.", messages=_anthropic_messages()
    )
    with claude.messages.stream(
        model="claude-haiku", max_tokens=64, system="Be brief.", messages=_anthropic_messages()
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()

    assert text == expected.content[0].text
    assert final.content[0].text == expected.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == expected.usage.input_tokens
    assert final.usage.output_tokens == expected.usage.output_tokens
    assert final.id.startswith("msg_")

    # The SDK tolerates some reordering, so check the exact event sequence on the wire.
    with raw.stream(
        "POST",
        "/v1/messages",
        headers=ANTHROPIC_HEADERS,
        json={"model": "claude-haiku", "max_tokens": 64, "messages": _anthropic_messages(), "stream": True},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = list(response.iter_lines())
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    payloads = [orjson.loads(d) for d in _sse_data(lines)]
    words = len(expected.content[0].text.split())
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * words,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [p["type"] for p in payloads] == names
    start = payloads[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["output_tokens"] == 1
    assert payloads[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert payloads[-2]["usage"] == {"output_tokens": words}
    assert all(p["delta"]["type"] == "text_delta" for p in payloads if p["type"] == "content_block_delta")


# ---------------------------------------------------------------------------------------------------
# tool calls: with function tools offered and the prompt naming one (or a call required), the mock calls it

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}}]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER_PARAMETERS}]


def test_chat_tool_call(oai: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "use get_weather for Paris"}]
    answer = oai.chat.completions.create(model="m", messages=messages, tools=CHAT_TOOLS)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"city": "mock", "unit": "c"}
    assert answer.usage is not None and answer.usage.completion_tokens >= 1

    chunks = list(oai.chat.completions.create(model="m", messages=messages, tools=CHAT_TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].tool_calls[0].id and deltas[0].tool_calls[0].function.name == "get_weather"
    arguments = "".join(d.tool_calls[0].function.arguments for d in deltas if d.tool_calls)
    assert orjson.loads(arguments) == {"city": "mock", "unit": "c"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The tool's result answers in text; so do tool_choice none and a prompt that names no tool.
    follow_up = [*messages, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "18C"}]
    assert oai.chat.completions.create(model="m", messages=follow_up, tools=CHAT_TOOLS).choices[0].message.content
    assert not oai.chat.completions.create(model="m", messages=messages, tools=CHAT_TOOLS,
                                           tool_choice="none").choices[0].message.tool_calls
    assert not oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                           tools=CHAT_TOOLS).choices[0].message.tool_calls
    forced = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], tools=CHAT_TOOLS,
                                         tool_choice="required")
    assert forced.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_anthropic_tool_use(claude: anthropic.Anthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": "use get_weather for Paris"}]
    answer = claude.messages.create(model="c", max_tokens=64, messages=messages, tools=ANTHROPIC_TOOLS)
    assert answer.stop_reason == "tool_use"
    block = answer.content[0]
    assert block.type == "tool_use" and block.id.startswith("toolu_") and block.input == {"city": "mock", "unit": "c"}

    with claude.messages.stream(model="c", max_tokens=64, messages=messages, tools=ANTHROPIC_TOOLS) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].input == {"city": "mock", "unit": "c"}
    assert final.usage.output_tokens >= 1

    follow_up = [*messages, {"role": "assistant", "content": [block.model_dump()]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "18C"}]}]
    text = claude.messages.create(model="c", max_tokens=64, messages=follow_up, tools=ANTHROPIC_TOOLS)
    assert text.stop_reason == "end_turn" and text.content[0].text == "mock reply from c: 18C"
    forced = claude.messages.create(model="c", max_tokens=64, messages=[{"role": "user", "content": "hi"}],
                                    tools=ANTHROPIC_TOOLS, tool_choice={"type": "any"})
    assert forced.content[0].type == "tool_use"
    none = claude.messages.create(model="c", max_tokens=64, messages=messages, tools=ANTHROPIC_TOOLS,
                                  tool_choice={"type": "none"})
    assert none.content[0].type == "text"


# ---------------------------------------------------------------------------------------------------
# authentication and validation


def test_openai_auth(server: _MockServer, raw: httpx.Client) -> None:
    with (
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong-key-000", max_retries=0) as client,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 401
    assert (info.value.type, info.value.code) == ("invalid_request_error", "invalid_api_key")
    # The key itself must not be echoed back in full.
    assert "sk-wrong-key-000" not in info.value.message

    missing = raw.post("/v1/embeddings", json={"model": "e", "input": "x"})
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"


def test_anthropic_auth(server: _MockServer, raw: httpx.Client) -> None:
    with (
        anthropic.Anthropic(base_url=server.url, api_key="sk-ant-wrong", max_retries=0) as client,
        pytest.raises(anthropic.AuthenticationError) as info,
    ):
        client.messages.create(model="c", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 401
    assert info.value.type == "authentication_error"
    assert info.value.request_id is not None and info.value.request_id.startswith("req_")
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "error"

    body = {"model": "c", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    # The classic `x-api-key` header (what proxies inject) must work as well as the SDK's Bearer form.
    assert raw.post("/v1/messages", headers=ANTHROPIC_HEADERS, json=body).status_code == 200
    no_key = raw.post("/v1/messages", headers={"anthropic-version": "2023-06-01"}, json=body)
    assert no_key.status_code == 401
    assert no_key.json()["error"]["type"] == "authentication_error"

    no_version = raw.post("/v1/messages", headers={"x-api-key": ANTHROPIC_KEY}, json=body)
    assert no_version.status_code == 400
    assert no_version.json()["error"] == {
        "type": "invalid_request_error",
        "message": "anthropic-version: header is required",
    }
    assert no_version.headers["request-id"].startswith("req_")


@pytest.mark.parametrize(
    ("content", "status", "param"),
    [
        (b"{not json", 400, None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, None),
        (b'{"model": "m"}', 400, "messages"),
        (b'{"model": "m", "messages": []}', 400, "messages"),
    ],
)
def test_openai_chat_validation(raw: httpx.Client, content: bytes, status: int, param: str | None) -> None:
    response = raw.post(
        "/v1/chat/completions", headers={**OPENAI_AUTH, "content-type": "application/json"}, content=content
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "c", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
        ({"model": "c", "max_tokens": 8}, "messages: Field required"),
        ({"max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}, "model: Field required"),
        (
            {"model": "c", "max_tokens": 8, "messages": [{"role": "system", "content": "x"}]},
            'messages.0.role: Input should be "user" or "assistant"',
        ),
    ],
)
def test_anthropic_validation(raw: httpx.Client, body: dict[str, Any], message: str) -> None:
    response = raw.post("/v1/messages", headers=ANTHROPIC_HEADERS, json=body)
    assert response.status_code == 400
    payload = response.json()
    assert payload["type"] == "error"
    assert payload["error"] == {"type": "invalid_request_error", "message": message}


# ---------------------------------------------------------------------------------------------------
# fault injection


def test_openai_rate_limit_fault(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], extra_headers={"x-mock-status": "429"}
        )
    error = info.value
    assert error.status_code == 429
    assert (error.type, error.code, error.param) == ("requests", "rate_limit_exceeded", None)
    assert error.response.headers["retry-after"] == "1"
    assert error.response.headers["x-mock-received-model"] == "m"


def test_openai_server_error_fault_on_stream(oai: openai.OpenAI) -> None:
    # Faults are answered before the stream starts, as a JSON error, like the real API does.
    with pytest.raises(openai.InternalServerError) as info:
        oai.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            extra_headers={"x-mock-status": "503"},
        )
    assert info.value.status_code == 503
    assert info.value.type == "server_error"
    assert "retry-after" not in info.value.response.headers


@pytest.mark.parametrize(
    ("status", "exc_type", "err_type"),
    [
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (529, anthropic.InternalServerError, "overloaded_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (503, anthropic.InternalServerError, "api_error"),
        (400, anthropic.BadRequestError, "invalid_request_error"),
    ],
)
def test_anthropic_faults(
    claude: anthropic.Anthropic, status: int, exc_type: type[anthropic.APIStatusError], err_type: str
) -> None:
    with pytest.raises(exc_type) as info:
        claude.messages.create(
            model="c",
            max_tokens=8,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-status": str(status)},
        )
    error = info.value
    assert error.status_code == status
    assert error.type == err_type
    assert isinstance(error.body, dict) and error.body["type"] == "error"
    assert error.request_id is not None and error.request_id.startswith("req_")
    assert (error.response.headers.get("retry-after") == "1") == (status == 429)


def test_reset_before_response(
    oai: openai.OpenAI,
    claude: anthropic.Anthropic,
    raw: httpx.Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    raw.delete("/_mock/requests")
    reset = {"x-mock-reset": "1"}
    with pytest.raises(openai.APIConnectionError) as oai_info:
        oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], extra_headers=reset
        )
    assert not isinstance(oai_info.value, openai.APITimeoutError)
    with pytest.raises(anthropic.APIConnectionError):
        claude.messages.create(
            model="c", max_tokens=8, messages=[{"role": "user", "content": "x"}], extra_headers=reset
        )
    # Below the SDKs: a transport error, never an HTTP response of any status.
    with pytest.raises(httpx.TransportError):
        raw.post(
            "/v1/chat/completions", headers={**OPENAI_AUTH, **reset}, json={"model": "m", "messages": []}
        )

    # The requests reached the mock (so this was a reset, not a refused connection).
    assert len(raw.get("/_mock/requests").json()) == 3
    # Pooled connections recover: the next request on the same client succeeds.
    assert oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "ok"}]).choices
    time.sleep(0.05)
    assert _aiohttp_problems(caplog) == []


def test_openai_cut_stream(oai: openai.OpenAI, raw: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    received: list[openai.types.chat.ChatCompletionChunk] = []
    stream = oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": USER_TEXT}],
        stream=True,
        extra_headers={"x-mock-cut-after": "3"},
    )
    with pytest.raises(openai.APIConnectionError) as info:
        for chunk in stream:
            received.append(chunk)
    # The openai SDK wraps the transport's incomplete-chunked-body error in APIConnectionError.
    assert "incomplete chunked read" in _exception_chain(info.value)
    assert [c.choices[0].delta.content for c in received] == ["", "mock", " reply"]

    # Raw view: a 200 whose body stops after exactly three events without a chunked terminator.
    lines: list[str] = []
    with (
        raw.stream(
            "POST",
            "/v1/chat/completions",
            headers={**OPENAI_AUTH, "x-mock-cut-after": "3"},
            json={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True},
        ) as response,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            lines.append(line)
    assert len(_sse_data(lines)) == 3
    time.sleep(0.05)
    assert _aiohttp_problems(caplog) == []


def test_anthropic_cut_stream(claude: anthropic.Anthropic) -> None:
    texts: list[str] = []
    event_types: list[str] = []
    # anthropic 2.x does not wrap mid-stream transport errors: the transport's RemoteProtocolError
    # escapes as-is, so accept either form but insist on the truncated-body cause.
    with (
        pytest.raises(Exception) as info,  # the concrete class is asserted below
        claude.messages.stream(
            model="c",
            max_tokens=8,
            messages=[{"role": "user", "content": USER_TEXT}],
            extra_headers={"x-mock-cut-after": "4"},
        ) as stream,
    ):
        for event in stream:
            event_types.append(event.type)
            if event.type == "text":
                texts.append(event.text)
    error = info.value
    assert isinstance(error, anthropic.APIConnectionError) or type(error).__name__ == "RemoteProtocolError"
    assert not isinstance(error, anthropic.APIStatusError)
    assert "incomplete chunked read" in _exception_chain(info.value)
    # Four wire events: message_start, content_block_start, ping (hidden by the SDK), one delta.
    assert texts == ["mock"]
    assert "message_stop" not in event_types


def test_cut_after_beyond_stream_length_completes(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            extra_headers={"x-mock-cut-after": "1000"},
        )
    )
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_cut_after_zero_sends_headers_only(raw: httpx.Client) -> None:
    with (
        raw.stream(
            "POST",
            "/v1/messages",
            headers={**ANTHROPIC_HEADERS, "x-mock-cut-after": "0"},
            json={
                "model": "c",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
            },
        ) as response,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        assert response.status_code == 200
        response.read()


def test_latency_header(oai: openai.OpenAI) -> None:
    started = time.monotonic()
    response = oai.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "x"}], extra_headers={"x-mock-latency-ms": "300"}
    )
    assert time.monotonic() - started >= 0.3
    assert int(response.headers["openai-processing-ms"]) >= 300

    started = time.monotonic()
    oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert time.monotonic() - started < 0.3


# ---------------------------------------------------------------------------------------------------
# request recording and config defaults


def test_requests_are_recorded(oai: openai.OpenAI, claude: anthropic.Anthropic, raw: httpx.Client) -> None:
    assert raw.delete("/_mock/requests").status_code == 200
    oai.chat.completions.create(
        model="gpt-rec",
        messages=[{"role": "user", "content": "record me"}],
        extra_headers={"X-Trace-Id": "t-1"},
    )
    claude.messages.create(model="claude-rec", max_tokens=9, messages=[{"role": "user", "content": "me too"}])
    raw.post("/v1/chat/completions", headers=OPENAI_AUTH, content=b"{broken")

    records = raw.get("/_mock/requests").json()
    assert [r["provider_api"] for r in records] == ["openai", "anthropic", "openai"]
    chat, message, broken = records
    assert (chat["method"], chat["path"]) == ("POST", "/v1/chat/completions")
    assert chat["host"] == f"127.0.0.1:{raw.base_url.port}"
    assert chat["body"] == {"model": "gpt-rec", "messages": [{"role": "user", "content": "record me"}]}
    assert chat["headers"]["x-trace-id"] == "t-1"
    assert chat["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert all(name == name.lower() for name in chat["headers"])
    assert message["path"] == "/v1/messages"
    assert message["body"]["max_tokens"] == 9
    assert "anthropic-version" in message["headers"]
    assert broken["body"] is None

    raw.delete("/_mock/requests")
    assert raw.get("/_mock/requests").json() == []


def test_config_defaults(defaults_server: _MockServer) -> None:
    with (
        openai.OpenAI(base_url=f"{defaults_server.url}/v1", api_key="anything", max_retries=0) as client,
        httpx.Client(base_url=defaults_server.url) as raw,
    ):
        messages = [{"role": "user", "content": "x"}]
        started = time.monotonic()
        # No key configured, so any key is accepted and the default fault (503) applies.
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="m", messages=messages)
        assert time.monotonic() - started >= 0.2
        assert info.value.status_code == 503
        assert info.value.response.headers["x-mock-provider"] == "mock-defaults"

        # Headers override both defaults; a non-error status switches the default fault off.
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(
                model="m", messages=messages, extra_headers={"x-mock-status": "429", "x-mock-latency-ms": "0"}
            )
        started = time.monotonic()
        ok = client.chat.completions.create(
            model="m", messages=messages, extra_headers={"x-mock-status": "200", "x-mock-latency-ms": "0"}
        )
        assert time.monotonic() - started < 0.2
        assert ok.choices[0].message.content == "mock reply from m: x"

        # record_limit=2 keeps only the newest two of the three requests.
        records = raw.get("/_mock/requests").json()
        assert len(records) == 2
        assert records[-1]["headers"]["x-mock-status"] == "200"


def test_serve_prints_one_line_and_stops_on_cancel(capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario() -> str:
        task = asyncio.create_task(serve("127.0.0.1", 0, MockConfig(name="served")))
        output = ""
        for _ in range(200):
            output += capsys.readouterr().out
            if output:
                break
            await asyncio.sleep(0.01)
        match = re.fullmatch(r"mock-provider listening on 127\.0\.0\.1:(\d+)\n", output)
        assert match, output
        async with httpx.AsyncClient() as client:
            health = await client.get(f"http://127.0.0.1:{match.group(1)}/_mock/health")
            chat = await client.post(
                f"http://127.0.0.1:{match.group(1)}/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
            )
        assert health.json() == {"status": "ok"}
        assert chat.headers["x-mock-provider"] == "served"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()
        return output + capsys.readouterr().out

    output = asyncio.run(scenario())
    # Nothing else (no access log, no aiohttp banner) may reach stdout.
    assert output.count("\n") == 1
