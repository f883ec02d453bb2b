"""OpenAI Chat Completions ⇄ Anthropic Messages translation, checked against the official SDKs.

Three kinds of evidence: exact expected dicts for requests and responses (so a wrong mapping fails
with a readable diff), seeded random conversations that must survive a round trip through the other
format, and the unmodified `openai` / `anthropic` SDKs parsing translated bytes served through an
httpx MockTransport (no socket): their own stream parsers and accumulators must rebuild the text, tool
calls with arguments, stop reason and usage. Provider output comes from the mock provider's event
generators (the same real-format bytes the end-to-end tests see) and from hand-written tool-call and
error fixtures.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest

from devtools import mock_provider as mock
from extproc.translate import TranslationError
from extproc.translate import anthropic_to_openai as a2o
from extproc.translate import openai_to_anthropic as o2a
from extproc.translate.sse import SseParser
from tests.chunking import CHUNKINGS, split

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
PDF_B64 = "JVBERi0xLjQKJcfsj6IKMSAwIG9iago8PD4+CmVuZG9iagp0cmFpbGVyCjw8Pj4KJSVFT0YK"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"],
}
TIME_SCHEMA = {"type": "object", "properties": {"tz": {"type": "string"}}}

def run(translator: o2a.StreamTranslator | a2o.StreamTranslator, chunks: list[bytes]) -> bytes:
    return b"".join(translator.feed(chunk) for chunk in chunks) + translator.finish()


def events_of(stream: bytes) -> list[tuple[str | None, Any]]:
    """Parsed (event name, JSON data or the raw `[DONE]`) of a translated stream."""
    parsed = SseParser().feed(stream)
    return [(e.event, e.data.decode() if e.data == b"[DONE]" else orjson.loads(e.data)) for e in parsed]


# ---------------------------------------------------------------------------------------------------
# SDK plumbing: clients whose HTTP goes to a handler in this process


Handler = Callable[[httpx2.Request], httpx2.Response]


def openai_client(handler: Handler) -> openai.OpenAI:
    transport = httpx2.MockTransport(handler)
    return openai.OpenAI(
        api_key="sk-test",
        base_url="http://provider.test/v1",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def anthropic_client(handler: Handler) -> anthropic.Anthropic:
    transport = httpx2.MockTransport(handler)
    return anthropic.Anthropic(
        api_key="sk-ant-test",
        base_url="http://provider.test",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def serve(body: bytes, *, status: int = 200, sse: bool = False) -> Handler:
    content_type = "text/event-stream" if sse else "application/json"

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, headers={"content-type": content_type}, content=body)

    return handler


# ---------------------------------------------------------------------------------------------------
# OpenAI request → Anthropic request


def test_openai_request_becomes_anthropic_request() -> None:
    body = {
        "model": "auth_assistant",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Weather in Paris and the time?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    },
                    {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": ""}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "09:00"}]},
            {"role": "user", "content": "And this picture?"},
            {"role": "assistant", "content": "Which one?"},
            {
                "role": "user",
                "name": "alice",
                "content": [
                    {"type": "text", "text": "These:"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}", "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    {
                        "type": "file",
                        "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{PDF_B64}"},
                    },
                ],
            },
        ],
        "tools": [
            {
                "type": "function",
                "function": {"name": "weather", "description": "Weather", "parameters": WEATHER_SCHEMA},
            },
            {"type": "function", "function": {"name": "time", "strict": True}},
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_completion_tokens": 300,
        "temperature": 0.3,
        "top_p": 0.9,
        "stop": "END",
        "user": "user-42",
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 7,
        "presence_penalty": 0.5,
    }
    assert o2a.request(body, model="claude-3") == {
        "model": "claude-3",
        "system": "You are terse.",
        "messages": [
            {"role": "user", "content": "Weather in Paris and the time?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking both."},
                    {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "time", "input": {}},
                ],
            },
            {
                # Both results and the user message after them: one user turn, results first.
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "09:00"}]},
                    {"type": "text", "text": "And this picture?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Which one?"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "These:"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                    {
                        "type": "document",
                        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
                        "title": "a.pdf",
                    },
                ],
            },
        ],
        "max_tokens": 300,
        "stop_sequences": ["END"],
        "temperature": 0.3,
        "top_p": 0.9,
        "stream": True,
        "metadata": {"user_id": "user-42"},
        "tools": [
            {"name": "weather", "description": "Weather", "input_schema": WEATHER_SCHEMA},
            {"name": "time", "input_schema": {"type": "object", "properties": {}}},
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }


def test_system_and_developer_messages_become_system_blocks_in_order() -> None:
    body = {
        "messages": [
            {"role": "developer", "content": "Rule one."},
            {"role": "system", "content": [{"type": "text", "text": "Rule two."}, {"type": "text", "text": "Three."}]},
            {"role": "user", "content": "hi"},
        ]
    }
    translated = o2a.request(body, model="m")
    assert translated["system"] == [
        {"type": "text", "text": "Rule one."},
        {"type": "text", "text": "Rule two."},
        {"type": "text", "text": "Three."},
    ]
    assert translated["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, 4096),
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 60}, 60),
        ({"max_tokens": 50, "max_completion_tokens": 60}, 60),
        ({"max_tokens": None}, 4096),
    ],
)
def test_max_tokens_is_always_set(fields: dict[str, Any], expected: int) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    assert o2a.request(body, model="m")["max_tokens"] == expected
    assert o2a.request(body, model="m", default_max_tokens=7)["max_tokens"] == (7 if expected == 4096 else expected)


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "weather"}}, None, {"type": "tool", "name": "weather"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        (
            {"type": "function", "function": {"name": "weather"}},
            False,
            {"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
        ),
        (None, None, None),
        (None, True, None),
    ],
)
def test_openai_tool_choice(choice: Any, parallel: bool | None, expected: dict[str, Any] | None) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": WEATHER_SCHEMA}}],
        "tool_choice": choice,
        "parallel_tool_calls": parallel,
    }
    assert o2a.request(body, model="m").get("tool_choice") == expected


def test_temperature_is_clamped_to_anthropic_range() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 1.7}
    assert o2a.request(body, model="m")["temperature"] == 1.0


def test_harmless_openai_fields_are_dropped() -> None:
    base = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
    harmless = {
        "seed": 1,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "service_tier": "auto",
        "store": False,
        "metadata": {"k": "v"},
        "reasoning_effort": "low",
        "n": 1,
        "logprobs": False,
        "response_format": {"type": "text"},
        "modalities": ["text"],
        "logit_bias": {},
    }
    assert o2a.request({**base, **harmless}, model="m") == o2a.request(base, model="m")


USER = {"role": "user", "content": "hi"}
TOOL_RESULT = {"role": "tool", "tool_call_id": "c", "content": "done"}


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"n": 2}, "'n'"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "json_schema"),
        ({"modalities": ["text", "audio"]}, "audio"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"frobnicate": True}, "frobnicate"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "custom"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "input_audio"),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]}, "PDF"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AA"}}],
                    }
                ]
            },
            "bmp",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]},
            "URL",
        ),
        (
            {
                "messages": [
                    USER,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                        ],
                    },
                    TOOL_RESULT,
                ]
            },
            "JSON",
        ),
        (
            {
                "messages": [
                    USER,
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
                    },
                    TOOL_RESULT,
                ]
            },
            "object",
        ),
        ({"messages": [USER, {"role": "function", "name": "f", "content": "x"}]}, "role"),
        ({"messages": []}, "messages"),
        ({"messages": [USER, {"role": "assistant", "content": "The answer is"}]}, "prefill"),
        ({"response_format": "json"}, "response_format"),
    ],
)
def test_openai_features_anthropic_cannot_express_raise(fields: dict[str, Any], match: str) -> None:
    body = {"model": "x", "messages": [USER], **fields}
    with pytest.raises(TranslationError, match=match):
        o2a.request(body, model="m")


# ---------------------------------------------------------------------------------------------------
# Anthropic request → OpenAI request


def test_anthropic_request_becomes_openai_request() -> None:
    body = {
        "model": "fraud_detector",
        "max_tokens": 256,
        "system": "You are terse.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather here?", "cache_control": {"type": "ephemeral"}},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                    {
                        "type": "document",
                        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": [{"type": "text", "text": "09:00"}],
                        "is_error": False,
                    },
                    {"type": "text", "text": "Thanks, and tomorrow?"},
                ],
            },
        ],
        "tools": [
            {"name": "weather", "description": "Weather", "input_schema": WEATHER_SCHEMA},
            {"name": "time", "input_schema": TIME_SCHEMA, "cache_control": {"type": "ephemeral"}},
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END", "STOP"],
        "temperature": 0.2,
        "top_p": 0.8,
        "top_k": 40,
        "metadata": {"user_id": "user-42"},
        "stream": True,
    }
    assert a2o.request(body, model="gpt-4o") == {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather here?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PDF_B64}"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    },
                    {"id": "toolu_2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "09:00"}]},
            {"role": "user", "content": [{"type": "text", "text": "Thanks, and tomorrow?"}]},
        ],
        "max_completion_tokens": 256,
        "temperature": 0.2,
        "top_p": 0.8,
        "stop": ["END", "STOP"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "user-42",
        "tools": [
            {
                "type": "function",
                "function": {"name": "weather", "description": "Weather", "parameters": WEATHER_SCHEMA},
            },
            {"type": "function", "function": {"name": "time", "parameters": TIME_SCHEMA}},
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }


def test_anthropic_system_blocks_become_one_system_message_with_parts() -> None:
    body = {
        "max_tokens": 5,
        "system": [
            {"type": "text", "text": "A."},
            {"type": "text", "text": "B.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert a2o.request(body, model="m")["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "A."}, {"type": "text", "text": "B."}]},
        {"role": "user", "content": "hi"},
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "tool", "name": "weather"}, {"tool_choice": {"type": "function", "function": {"name": "weather"}}}),
        ({"type": "auto", "disable_parallel_tool_use": True}, {"tool_choice": "auto", "parallel_tool_calls": False}),
    ],
)
def test_anthropic_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    body = {
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "weather", "input_schema": WEATHER_SCHEMA}],
        "tool_choice": choice,
    }
    translated = a2o.request(body, model="m")
    assert {k: translated[k] for k in ("tool_choice", "parallel_tool_calls") if k in translated} == expected


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}]}, "server tool"),
        ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
        ({"container": "c_1"}, "container"),
        ({"output_format": {"type": "json_schema", "schema": {}}}, "output_format"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [USER, {"role": "assistant", "content": "The answer is"}]}, "prefill"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}],
                            }
                        ],
                    }
                ]
            },
            "text blocks",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}}],
                    }
                ]
            },
            "PDF",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "search_result", "source": "x"}]}]}, "search_result"),
    ],
)
def test_anthropic_features_openai_cannot_express_raise(fields: dict[str, Any], match: str) -> None:
    body = {"model": "x", "max_tokens": 5, "messages": [USER], **fields}
    with pytest.raises(TranslationError, match=match):
        a2o.request(body, model="m")


def test_harmless_anthropic_fields_are_dropped() -> None:
    base = {"model": "x", "max_tokens": 5, "messages": [USER]}
    harmless = {"top_k": 5, "service_tier": "auto", "thinking": {"type": "disabled"}}
    assert a2o.request({**base, **harmless}, model="m") == a2o.request(base, model="m")


# ---------------------------------------------------------------------------------------------------
# round trips over seeded random conversations


def _random_anthropic_request(rng: random.Random) -> dict[str, Any]:
    """A valid Anthropic conversation: alternating turns, tool results answering the previous calls."""
    words = ["alpha", "beta", "gamma", "delta", "ünïcode", "emoji 🎉", 'quote "x"', "new\nline"]

    def text() -> str:
        return " ".join(rng.choices(words, k=rng.randint(1, 4)))

    def image() -> dict[str, Any]:
        if rng.random() < 0.5:
            return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}}
        return {"type": "image", "source": {"type": "url", "url": f"https://example.com/{rng.randint(1, 99)}.jpg"}}

    messages: list[dict[str, Any]] = []
    pending: list[str] = []
    for turn in range(rng.randint(0, 3) * 2 + 1):
        if turn % 2 == 0:
            blocks: list[dict[str, Any]] = [
                {
                    "type": "tool_result",
                    "tool_use_id": call,
                    "content": text() if rng.random() < 0.5 else [{"type": "text", "text": text()}],
                }
                for call in pending
            ]
            blocks += [
                rng.choice([{"type": "text", "text": text()}, image()])
                for _ in range(rng.randint(0 if pending else 1, 2))
            ]
            only_text = len(blocks) == 1 and blocks[0]["type"] == "text"
            messages.append(
                {"role": "user", "content": blocks[0]["text"] if only_text and rng.random() < 0.5 else blocks}
            )
            pending = []
        else:
            blocks = [{"type": "text", "text": text()}] if rng.random() < 0.7 else []
            for _ in range(rng.randint(0 if blocks else 1, 2)):
                call = f"toolu_{turn}_{len(pending)}"
                pending.append(call)
                tool_input = {"city": text(), "n": rng.randint(0, 9), "nested": {"list": [1, "two", None, True]}}
                blocks.append(
                    {"type": "tool_use", "id": call, "name": rng.choice(["weather", "time"]), "input": tool_input}
                )
            messages.append({"role": "assistant", "content": blocks})
    body: dict[str, Any] = {"model": "claude-3", "max_tokens": rng.randint(1, 4096), "messages": messages}
    if rng.random() < 0.5:
        body["system"] = (
            text() if rng.random() < 0.5 else [{"type": "text", "text": text()}, {"type": "text", "text": text()}]
        )
    if rng.random() < 0.5:
        body["tools"] = [
            {"name": "weather", "description": "Weather", "input_schema": WEATHER_SCHEMA},
            {"name": "time", "input_schema": TIME_SCHEMA},
        ]
        body["tool_choice"] = rng.choice(
            [
                {"type": "auto"},
                {"type": "any"},
                {"type": "tool", "name": "time"},
                {"type": "any", "disable_parallel_tool_use": True},
            ]
        )
    if rng.random() < 0.5:
        body["stop_sequences"] = ["END"]
        body["temperature"] = 0.5
        body["top_p"] = 0.9
        body["metadata"] = {"user_id": "u-1"}
    if rng.random() < 0.5:
        body["stream"] = True
    return body


@pytest.mark.parametrize("seed", range(60))
def test_anthropic_request_survives_round_trip_through_openai(seed: int) -> None:
    body = _random_anthropic_request(random.Random(seed))
    assert o2a.request(a2o.request(body, model="gpt-4o"), model="claude-3") == body


def _canonical_openai(body: dict[str, Any]) -> dict[str, Any]:
    """Equivalence, not identity: a string content equals one text part, and arguments compare as JSON."""

    def content(value: Any) -> Any:
        return [{"type": "text", "text": value}] if isinstance(value, str) else value

    messages = []
    for message in body["messages"]:
        message = {**message, "content": content(message.get("content"))}
        if "tool_calls" in message:
            message["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": orjson.loads(c["function"]["arguments"])}}
                for c in message["tool_calls"]
            ]
        messages.append(message)
    return {**body, "messages": messages}


@pytest.mark.parametrize("seed", range(60))
def test_openai_request_survives_round_trip_through_anthropic(seed: int) -> None:
    # Generated via the Anthropic generator (whose output is valid for both APIs), then read as OpenAI.
    openai_body = a2o.request(_random_anthropic_request(random.Random(seed)), model="gpt-4o")
    back = a2o.request(o2a.request(openai_body, model="claude-3"), model="gpt-4o")
    assert _canonical_openai(back) == _canonical_openai(openai_body)


# ---------------------------------------------------------------------------------------------------
# JSON responses


ANTHROPIC_TOOL_MESSAGE = {
    "id": "msg_01XYZ",
    "type": "message",
    "role": "assistant",
    "model": "claude-3-5-sonnet-20241022",
    "content": [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_01A", "name": "weather", "input": {"city": "Paris", "unit": "c"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 100,
        "output_tokens": 20,
        "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": 30,
    },
}

OPENAI_TOOL_COMPLETION = {
    "id": "chatcmpl-ABC",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Let me check.",
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    },
                    {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {
        "prompt_tokens": 135,
        "completion_tokens": 20,
        "total_tokens": 155,
        "prompt_tokens_details": {"cached_tokens": 30},
    },
}


def test_anthropic_message_becomes_chat_completion() -> None:
    assert o2a.response(ANTHROPIC_TOOL_MESSAGE, requested_model="fraud_detector", created=123) == {
        "id": "chatcmpl-01XYZ",
        "object": "chat.completion",
        "created": 123,
        "model": "fraud_detector",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me check.",
                    "refusal": None,
                    "annotations": [],
                    "tool_calls": [
                        {
                            "id": "toolu_01A",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Paris","unit":"c"}'},
                        }
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        # Anthropic's input_tokens exclude cache reads and writes; OpenAI's prompt_tokens include them.
        "usage": {
            "prompt_tokens": 135,
            "completion_tokens": 20,
            "total_tokens": 155,
            "prompt_tokens_details": {"cached_tokens": 30},
        },
        "system_fingerprint": None,
    }


def test_chat_completion_becomes_anthropic_message() -> None:
    assert a2o.response(OPENAI_TOOL_COMPLETION, requested_model="fraud_detector") == {
        "id": "msg_ABC",
        "type": "message",
        "role": "assistant",
        "model": "fraud_detector",
        "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "time", "input": {}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 105,
            "output_tokens": 20,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 30,
        },
    }


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        (None, "stop"),
    ],
)
def test_stop_reason_to_finish_reason(stop_reason: str | None, finish_reason: str) -> None:
    message = {**ANTHROPIC_TOOL_MESSAGE, "content": [{"type": "text", "text": "x"}], "stop_reason": stop_reason}
    assert o2a.response(message, requested_model="m")["choices"][0]["finish_reason"] == finish_reason


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal")],
)
def test_finish_reason_to_stop_reason(finish_reason: str, stop_reason: str) -> None:
    choice = {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": finish_reason}
    assert (
        a2o.response({**OPENAI_TOOL_COMPLETION, "choices": [choice]}, requested_model="m")["stop_reason"] == stop_reason
    )


def test_openai_refusal_becomes_refusal_text() -> None:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": None, "refusal": "I can't help."},
        "finish_reason": "stop",
    }
    message = a2o.response({**OPENAI_TOOL_COMPLETION, "choices": [choice]}, requested_model="m")
    assert message["content"] == [{"type": "text", "text": "I can't help."}]
    assert message["stop_reason"] == "refusal"


def test_invalid_tool_arguments_from_openai_raise() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"city": "Par'}}
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": None, "tool_calls": [call]},
        "finish_reason": "length",
    }
    with pytest.raises(TranslationError):
        a2o.response({**OPENAI_TOOL_COMPLETION, "choices": [choice]}, requested_model="m")


def test_ids_round_trip() -> None:
    assert o2a.completion_id("msg_01abc") == "chatcmpl-01abc"
    assert a2o.message_id("chatcmpl-01abc") == "msg_01abc"
    assert a2o.message_id(o2a.completion_id("msg_01abc")) == "msg_01abc"


def test_openai_sdk_parses_translated_completion() -> None:
    body = orjson.dumps(o2a.response(ANTHROPIC_TOOL_MESSAGE, requested_model="fraud_detector"))
    completion = openai_client(serve(body)).chat.completions.create(
        model="fraud_detector", messages=[{"role": "user", "content": "x"}]
    )
    assert completion.model == "fraud_detector"
    assert completion.id == "chatcmpl-01XYZ"
    [call] = completion.choices[0].message.tool_calls or []
    assert call.function.name == "weather"
    assert orjson.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}
    assert completion.usage is not None and completion.usage.prompt_tokens == 135
    assert (
        completion.usage.prompt_tokens_details is not None
        and completion.usage.prompt_tokens_details.cached_tokens == 30
    )


def test_anthropic_sdk_parses_translated_message() -> None:
    body = orjson.dumps(a2o.response(OPENAI_TOOL_COMPLETION, requested_model="fraud_detector"))
    message = anthropic_client(serve(body)).messages.create(model="fraud_detector", max_tokens=5, messages=[USER])
    assert message.model == "fraud_detector"
    assert [block.type for block in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[1].input == {"city": "Paris"}
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (
        105,
        30,
        20,
    )


# ---------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("status", "anthropic_type", "sdk_error", "openai_type"),
    [
        (400, "invalid_request_error", openai.BadRequestError, "invalid_request_error"),
        (401, "authentication_error", openai.AuthenticationError, "invalid_request_error"),
        (404, "not_found_error", openai.NotFoundError, "invalid_request_error"),
        (429, "rate_limit_error", openai.RateLimitError, "requests"),
        (500, "api_error", openai.InternalServerError, "server_error"),
        (529, "overloaded_error", openai.InternalServerError, "server_error"),
    ],
)
def test_anthropic_error_reaches_openai_sdk_as_its_own_error(
    status: int, anthropic_type: str, sdk_error: type[openai.APIStatusError], openai_type: str
) -> None:
    source = orjson.dumps(
        {"type": "error", "error": {"type": anthropic_type, "message": f"boom {status}"}, "request_id": "req_1"}
    )
    body = o2a.error(status, source)
    assert orjson.loads(body)["error"]["type"] == openai_type
    with pytest.raises(sdk_error) as caught:
        openai_client(serve(body, status=status)).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.message == f"Error code: {status} - boom {status}"
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == openai_type


@pytest.mark.parametrize(
    ("status", "anthropic_type", "sdk_error"),
    [
        (400, "invalid_request_error", anthropic.BadRequestError),
        (401, "authentication_error", anthropic.AuthenticationError),
        (404, "not_found_error", anthropic.NotFoundError),
        (429, "rate_limit_error", anthropic.RateLimitError),
        (500, "api_error", anthropic.InternalServerError),
        (503, "overloaded_error", anthropic.InternalServerError),
    ],
)
def test_openai_error_reaches_anthropic_sdk_as_its_own_error(
    status: int, anthropic_type: str, sdk_error: type[anthropic.APIStatusError]
) -> None:
    source = orjson.dumps({"error": {"message": f"boom {status}", "type": "server_error", "param": None, "code": None}})
    body = a2o.error(status, source)
    assert orjson.loads(body) == {"type": "error", "error": {"type": anthropic_type, "message": f"boom {status}"}}
    with pytest.raises(sdk_error) as caught:
        anthropic_client(serve(body, status=status)).messages.create(model="m", max_tokens=5, messages=[USER])
    assert caught.value.body == {"type": "error", "error": {"type": anthropic_type, "message": f"boom {status}"}}


def test_unreadable_error_bodies_still_translate() -> None:
    assert orjson.loads(o2a.error(502, b"<html>bad gateway</html>")) == {
        "error": {"message": "Upstream provider error (HTTP 502)", "type": "server_error", "param": None, "code": None}
    }
    assert orjson.loads(a2o.error(502, b"")) == {
        "type": "error",
        "error": {"type": "api_error", "message": "Upstream provider error (HTTP 502)"},
    }


# ---------------------------------------------------------------------------------------------------
# streams: Anthropic SSE → OpenAI SSE

REPLY = "mock reply from claude-3: one two three four five six seven eight"


def anthropic_text_stream() -> bytes:
    return b"".join(mock._message_events("msg_01fixed", "claude-3", REPLY, 17))


def sse(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def anthropic_tool_stream() -> bytes:
    """A text block then two tool_use blocks whose JSON arrives in awkward fragments, as Claude sends it."""
    start = {
        "id": "msg_01tools",
        "type": "message",
        "role": "assistant",
        "model": "claude-3",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 50,
            "output_tokens": 1,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 40,
        },
    }
    events = [
        sse("message_start", {"type": "message_start", "message": start}),
        sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        sse("ping", {"type": "ping"}),
        sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me "}},
        ),
        sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "chéck 🎉."}},
        ),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ]
    for index, (tool_id, name, fragments) in enumerate(
        [("toolu_01A", "weather", ['{"ci', 'ty": "Pa', 'ris", "unit"', ': "c"}']), ("toolu_01B", "time", [])], start=1
    ):
        block = {"type": "tool_use", "id": tool_id, "name": name, "input": {}}
        events.append(
            sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
        )
        for fragment in ["", *fragments]:
            delta = {"type": "input_json_delta", "partial_json": fragment}
            events.append(sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        events.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    events += [
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 33},
            },
        ),
        sse("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(events)


@pytest.mark.parametrize("how", CHUNKINGS)
def test_anthropic_stream_translation_does_not_depend_on_chunking(how: str) -> None:
    source = anthropic_tool_stream()
    whole = run(o2a.StreamTranslator(requested_model="m", include_usage=True, created=1), [source])
    assert run(o2a.StreamTranslator(requested_model="m", include_usage=True, created=1), split(source, how)) == whole
    crlf = source.replace(b"\n", b"\r\n")
    assert run(o2a.StreamTranslator(requested_model="m", include_usage=True, created=1), split(crlf, how)) == whole


def test_anthropic_stream_events_go_out_as_soon_as_complete() -> None:
    translator = o2a.StreamTranslator(requested_model="m", include_usage=False)
    events = SseParser().feed(anthropic_text_stream())
    raw = anthropic_text_stream().split(b"\n\n")
    assert len(raw) - 1 == len(events)
    # Feeding the first delta's event minus its final newline emits nothing for it; the newline emits it.
    head = b"\n\n".join(raw[:3]) + b"\n\n" + raw[3] + b"\n"
    assert b'"content":"mock"' not in translator.feed(head)
    assert b'"content":"mock"' in translator.feed(b"\n")


def test_anthropic_text_stream_as_openai_chunks() -> None:
    out = run(
        o2a.StreamTranslator(requested_model="fraud_detector", include_usage=True, created=5), [anthropic_text_stream()]
    )
    events = events_of(out)
    assert events[-1] == (None, "[DONE]")
    chunks = [data for _, data in events[:-1]]
    assert {c["id"] for c in chunks} == {"chatcmpl-01fixed"}
    assert {c["model"] for c in chunks} == {"fraud_detector"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == REPLY
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 17,
        "completion_tokens": 12,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert all(c["usage"] is None for c in chunks[:-1])


def test_anthropic_stream_without_include_usage_has_no_usage() -> None:
    out = run(o2a.StreamTranslator(requested_model="m", include_usage=False), [anthropic_text_stream()])
    assert b"usage" not in out
    assert out.endswith(b"data: [DONE]\n\n")


def test_openai_sdk_iterates_translated_text_stream() -> None:
    out = run(o2a.StreamTranslator(requested_model="fraud_detector", include_usage=True), [anthropic_text_stream()])
    client = openai_client(serve(out, sse=True))
    stream = client.chat.completions.create(
        model="fraud_detector",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (17, 12)
    assert {c.model for c in chunks} == {"fraud_detector"}


def test_openai_sdk_accumulates_translated_tool_calls() -> None:
    out = run(o2a.StreamTranslator(requested_model="fraud_detector", include_usage=True), [anthropic_tool_stream()])
    client = openai_client(serve(out, sse=True))
    tools = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER_SCHEMA}}]
    with client.chat.completions.stream(
        model="fraud_detector", messages=[{"role": "user", "content": "x"}], tools=tools
    ) as stream:
        completion = stream.get_final_completion()
    choice = completion.choices[0]
    assert choice.message.content == "Let me chéck 🎉."
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    # A tool_use block with no input streams no JSON; OpenAI clients json.loads the arguments, so "{}".
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("toolu_01A", "weather", '{"city": "Paris", "unit": "c"}'),
        ("toolu_01B", "time", "{}"),
    ]
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (90, 33)
    assert (
        completion.usage.prompt_tokens_details is not None
        and completion.usage.prompt_tokens_details.cached_tokens == 40
    )


def _anthropic_events(stream: bytes) -> list[bytes]:
    return [event + b"\n\n" for event in stream.split(b"\n\n") if event]


@pytest.mark.parametrize("source", ["text", "tools"])
def test_cut_anthropic_stream_never_ends_cleanly(source: str) -> None:
    events = _anthropic_events(anthropic_text_stream() if source == "text" else anthropic_tool_stream())
    for cut in range(len(events)):  # every prefix that lacks message_stop, and a half event after it
        for tail in (b"", events[cut][: len(events[cut]) // 2]):
            translator = o2a.StreamTranslator(requested_model="m", include_usage=True)
            out = run(translator, [*events[:cut], tail])
            assert b"[DONE]" not in out
            assert events_of(out)[-1][1]["error"]["type"] == "server_error"
            with pytest.raises(openai.APIError, match="ended before the response was complete"):
                list(
                    openai_client(serve(out, sse=True)).chat.completions.create(
                        model="m", messages=[{"role": "user", "content": "x"}], stream=True
                    )
                )


def test_anthropic_error_event_mid_stream_becomes_openai_error() -> None:
    events = _anthropic_events(anthropic_text_stream())
    error = sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    translator = o2a.StreamTranslator(requested_model="m", include_usage=False)
    out = b"".join(translator.feed(e) for e in [*events[:5], error, *events[5:]]) + translator.finish()
    assert b"[DONE]" not in out
    assert events_of(out)[-1] == (
        None,
        {"error": {"message": "Overloaded", "type": "server_error", "param": None, "code": "overloaded"}},
    )
    with pytest.raises(openai.APIError, match="Overloaded"):
        list(
            openai_client(serve(out, sse=True)).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )


# ---------------------------------------------------------------------------------------------------
# streams: OpenAI SSE → Anthropic SSE

OPENAI_REPLY = "mock reply from gpt-4o: one two three four five six seven eight"


def openai_text_stream(include_usage: bool = True) -> bytes:
    usage = mock._chat_usage(21, 12)
    return b"".join(mock._chat_events("chatcmpl-fixed", 1_700_000_000, "gpt-4o", OPENAI_REPLY, usage, include_usage))


def openai_tool_stream() -> bytes:
    """Text, then two tool calls whose arguments arrive in fragments, finish_reason, usage, [DONE]."""
    base = {
        "id": "chatcmpl-tools",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "system_fingerprint": "fp",
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps({**base, "choices": [choice], "usage": None}) + b"\n\n"

    def call(index: int, arguments: str, **first: str) -> dict[str, Any]:
        function: dict[str, Any] = {"arguments": arguments}
        if first:
            function["name"] = first["name"]
            return {"tool_calls": [{"index": index, "id": first["id"], "type": "function", "function": function}]}
        return {"tool_calls": [{"index": index, "function": function}]}

    usage = {
        "prompt_tokens": 80,
        "completion_tokens": 25,
        "total_tokens": 105,
        "prompt_tokens_details": {"cached_tokens": 64},
    }
    return b"".join(
        [
            chunk({"role": "assistant", "content": "", "refusal": None}),
            chunk({"content": "Let me "}),
            chunk({"content": "chéck 🎉."}),
            chunk(call(0, "", id="call_A", name="weather")),
            chunk(call(0, '{"ci')),
            chunk(call(0, 'ty": "Par')),
            chunk(call(0, 'is"}')),
            chunk(call(1, "", id="call_B", name="time")),
            chunk(call(1, "{}")),
            chunk({}, "tool_calls"),
            b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n",
            b"data: [DONE]\n\n",
        ]
    )


@pytest.mark.parametrize("how", CHUNKINGS)
def test_openai_stream_translation_does_not_depend_on_chunking(how: str) -> None:
    source = openai_tool_stream()
    whole = run(a2o.StreamTranslator(requested_model="m"), [source])
    assert run(a2o.StreamTranslator(requested_model="m"), split(source, how)) == whole
    crlf = source.replace(b"\n", b"\r\n")
    assert run(a2o.StreamTranslator(requested_model="m"), split(crlf, how)) == whole


def test_openai_tool_stream_as_anthropic_events() -> None:
    out = run(a2o.StreamTranslator(requested_model="fraud_detector"), [openai_tool_stream()])
    events = events_of(out)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    # The event name always repeats the payload's type, as Anthropic sends it.
    assert all(name == data["type"] for name, data in events)
    assert events[0][1]["message"]["id"] == "msg_tools"
    assert events[0][1]["message"]["model"] == "fraud_detector"
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "call_A", "name": "weather", "input": {}}
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {
            "input_tokens": 16,
            "output_tokens": 25,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 64,
        },
    }


def test_anthropic_sdk_accumulates_translated_tool_stream() -> None:
    out = run(a2o.StreamTranslator(requested_model="fraud_detector"), [openai_tool_stream()])
    client = anthropic_client(serve(out, sse=True))
    with client.messages.stream(model="fraud_detector", max_tokens=50, messages=[USER]) as stream:
        message = stream.get_final_message()
    assert message.model == "fraud_detector"
    assert message.id == "msg_tools"
    assert message.content[0].type == "text" and message.content[0].text == "Let me chéck 🎉."
    assert [(b.id, b.name, b.input) for b in message.content[1:] if b.type == "tool_use"] == [
        ("call_A", "weather", {"city": "Paris"}),
        ("call_B", "time", {}),
    ]
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (
        16,
        64,
        25,
    )


def test_anthropic_sdk_reads_translated_mock_text_stream() -> None:
    out = run(a2o.StreamTranslator(requested_model="fraud_detector"), split(openai_text_stream(), "seed-4"))
    client = anthropic_client(serve(out, sse=True))
    with client.messages.stream(model="fraud_detector", max_tokens=50, messages=[USER]) as stream:
        streamed = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert streamed == OPENAI_REPLY
    assert message.content[0].type == "text" and message.content[0].text == OPENAI_REPLY
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (21, 12)


def test_openai_refusal_stream_becomes_refusal() -> None:
    base = {"id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
    source = (
        b"".join(
            b"data: "
            + orjson.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            + b"\n\n"
            for delta, finish in [
                ({"role": "assistant", "refusal": ""}, None),
                ({"refusal": "I can't"}, None),
                ({}, "stop"),
            ]
        )
        + b"data: [DONE]\n\n"
    )
    out = run(a2o.StreamTranslator(requested_model="m"), [source])
    message = anthropic_client(serve(out, sse=True)).messages.stream(model="m", max_tokens=5, messages=[USER])
    with message as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "refusal"
    assert final.content[0].type == "text" and final.content[0].text == "I can't"


@pytest.mark.parametrize("source", ["text", "tools"])
def test_cut_openai_stream_ends_with_anthropic_error_event(source: str) -> None:
    events = _anthropic_events(openai_text_stream() if source == "text" else openai_tool_stream())
    assert events[-1] == b"data: [DONE]\n\n"
    for cut in range(len(events)):  # every prefix without [DONE], and a half event after it
        for tail in (b"", events[cut][: len(events[cut]) // 2]):
            out = run(a2o.StreamTranslator(requested_model="m"), [*events[:cut], tail])
            parsed = events_of(out)
            assert "message_stop" not in [name for name, _ in parsed]
            assert parsed[-1] == (
                "error",
                {"type": "error", "error": {"type": "api_error", "message": a2o._CUT_MESSAGE}},
            )
            client = anthropic_client(serve(out, sse=True))
            with (
                pytest.raises(anthropic.APIStatusError) as caught,
                client.messages.stream(model="m", max_tokens=5, messages=[USER]) as stream,
            ):
                stream.get_final_message()
            assert caught.value.body == {"type": "error", "error": {"type": "api_error", "message": a2o._CUT_MESSAGE}}


def test_openai_error_chunk_mid_stream_becomes_anthropic_error_event() -> None:
    events = _anthropic_events(openai_text_stream())
    error = b'data: {"error":{"message":"The server had an error","type":"server_error","param":null,"code":null}}\n\n'
    out = run(a2o.StreamTranslator(requested_model="m"), [*events[:4], error, *events[4:]])
    parsed = events_of(out)
    assert "message_stop" not in [name for name, _ in parsed]
    assert parsed[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": "The server had an error"}},
    )


def test_nothing_after_the_terminator_is_forwarded() -> None:
    translator = a2o.StreamTranslator(requested_model="m")
    translator.feed(openai_text_stream())
    assert translator.complete
    assert translator.feed(b"data: {}\n\n") == b""
    assert translator.finish() == b""
    other = o2a.StreamTranslator(requested_model="m", include_usage=False)
    other.feed(anthropic_text_stream())
    assert other.complete and other.finish() == b""


# ---------------------------------------------------------------------------------------------------
# the whole fallback path: an unmodified SDK client answered by the other provider's (mock) output


def _validated_by_mock_anthropic(body: dict[str, Any]) -> None:
    mock._anthropic_body(body, {"request-id": "req_test"})  # raises if the real-shaped validation fails


def openai_client_served_by_anthropic() -> tuple[openai.OpenAI, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = orjson.loads(request.content)
        translated = o2a.request(body, model="claude-3")
        _validated_by_mock_anthropic(translated)
        seen.append(translated)
        reply = mock._reply_for("claude-3", translated["messages"])
        if translated.get("stream"):
            options = body.get("stream_options") or {}
            translator = o2a.StreamTranslator(
                requested_model=body["model"], include_usage=bool(options.get("include_usage"))
            )
            source = b"".join(mock._message_events("msg_01chain", "claude-3", reply, 9))
            out = run(translator, split(source, "seed-2"))
            return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=out)
        message = {
            "id": "msg_01chain",
            "type": "message",
            "role": "assistant",
            "model": "claude-3",
            "content": [{"type": "text", "text": reply}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": mock._anthropic_usage(9, len(reply.split())),
        }
        return httpx2.Response(200, json=o2a.response(message, requested_model=body["model"]))

    return openai_client(handler), seen


def anthropic_client_served_by_openai() -> tuple[anthropic.Anthropic, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = orjson.loads(request.content)
        translated = a2o.request(body, model="gpt-4o")
        mock._validate_chat(translated, {})
        seen.append(translated)
        reply = mock._reply_for("gpt-4o", translated["messages"])
        usage = mock._chat_usage(9, len(reply.split()))
        if translated.get("stream"):
            include = translated["stream_options"]["include_usage"]
            source = b"".join(mock._chat_events("chatcmpl-chain", 1, "gpt-4o", reply, usage, include))
            out = run(a2o.StreamTranslator(requested_model=body["model"]), split(source, "seed-3"))
            return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=out)
        completion = {
            "id": "chatcmpl-chain",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": usage,
        }
        return httpx2.Response(200, json=a2o.response(completion, requested_model=body["model"]))

    return anthropic_client(handler), seen


CONVERSATION_OPENAI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the weather?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_9", "content": "cold"},
    {"role": "user", "content": "so wear a coat today"},
]


@pytest.mark.parametrize("stream", [False, True])
def test_openai_sdk_call_answered_by_anthropic(stream: bool) -> None:
    client, seen = openai_client_served_by_anthropic()
    # The mock replies with the last user turn's text, which now starts with the merged tool result.
    expected = "mock reply from claude-3: cold so wear a coat today"
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="fraud_detector",
                messages=CONVERSATION_OPENAI,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 9
    else:
        completion = client.chat.completions.create(model="fraud_detector", messages=CONVERSATION_OPENAI)
        assert completion.choices[0].message.content == expected
        assert completion.model == "fraud_detector"
        assert completion.id == "chatcmpl-01chain"
    assert seen[0]["system"] == "Be brief."
    assert seen[0]["messages"][-1]["content"][0] == {"type": "tool_result", "tool_use_id": "call_9", "content": "cold"}


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_sdk_call_answered_by_openai(stream: bool) -> None:
    client, seen = anthropic_client_served_by_openai()
    messages: Any = [
        {"role": "user", "content": "What is the weather?"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_9", "name": "weather", "input": {"city": "Oslo"}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_9", "content": "cold"},
                {"type": "text", "text": "so wear a coat today"},
            ],
        },
    ]
    expected = "mock reply from gpt-4o: so wear a coat today"
    if stream:
        with client.messages.stream(
            model="fraud_detector", max_tokens=64, system="Be brief.", messages=messages
        ) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(model="fraud_detector", max_tokens=64, system="Be brief.", messages=messages)
    assert message.content[0].type == "text" and message.content[0].text == expected
    assert message.model == "fraud_detector"
    assert message.id == "msg_chain"
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (9, len(expected.split()))
    assert seen[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert seen[0]["messages"][3] == {"role": "tool", "tool_call_id": "toolu_9", "content": "cold"}
