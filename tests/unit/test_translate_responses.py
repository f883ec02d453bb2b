"""OpenAI Responses API caller ⇄ Anthropic Messages provider (``responses_to_anthropic``), checked by the SDK.

Requests: an exact expected Messages body for a request using every mapped field, every refusal with its
exact message, wrong-typed fields named, and a property test replacing every value at every path of a
few valid requests by a value of every JSON type (each result a Messages body the mock provider's
real-shaped validation accepts, or a clean TranslationError).

Answers: Responses objects validated by the installed SDK's ``Response`` model, every stream event by
its ``ResponseStreamEvent`` union, and the unmodified ``openai`` client's own stream accumulator
(``client.responses.stream(...).get_final_response()``) fed the translated bytes through an httpx
MockTransport. Cut, failed and broken streams must make the SDK raise, never end cleanly. Fuzz tests
feed seeded mutations of real Anthropic answers to ``ResponseTranslator("openai_responses", ...)`` and
the stream translator directly (they must agree byte for byte), in random chunkings. The whole path is
exercised last: SDK → ``request`` → the mock Anthropic provider over HTTP → ``ResponseTranslator`` → SDK,
a function call round trip included.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import httpx2
import openai
import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from devtools import mock_provider as mock
from extproc.translate import TranslationError
from extproc.translate import responses_to_anthropic as r2a
from extproc.translate.response import ResponseTranslator
from tests.chunking import CHUNKINGS, split
from tests.unit.test_translate import (
    ANTHROPIC_TOOL_MESSAGE,
    PDF_B64,
    PNG_B64,
    WEATHER_SCHEMA,
    anthropic_text_stream,
    anthropic_tool_stream,
    openai_client,
    serve,
    sse,
)
from tests.unit.test_translate_request import _DELETE, VALUES, outcome, paths, replaced
from tests.unit.test_translate_response import (
    ANTHROPIC_ERROR,
    BROKEN_ANTHROPIC_EVENTS,
    BROKEN_ANTHROPIC_JSON,
    BROKEN_FOR_BOTH,
    EXTRA_EVENTS,
    ODD_DOCUMENTS,
    chunked,
    dumps,
    mutate_bytes,
    mutate_value,
)

EVENT = TypeAdapter(ResponseStreamEvent)
UNTRANSLATABLE = {
    "error": {
        "message": r2a._UNTRANSLATABLE_MESSAGE,
        "type": "server_error",
        "param": None,
        "code": "provider_response_untranslatable",
    }
}
USER = {"role": "user", "content": "Hello"}


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Responses objects carry the translation time; fixed, so separate translations compare equal."""
    monkeypatch.setattr(r2a, "time", SimpleNamespace(time=lambda: 1.0))


def to_anthropic(body: Any) -> dict[str, Any]:
    return r2a.request(body, model="claude-3")


def validated_by_mock_anthropic(body: dict[str, Any]) -> None:
    mock._anthropic_body(body, {"request-id": "req_test"})  # raises if the real-shaped validation fails


def through(translator: Any, chunks: list[bytes]) -> bytes:
    return b"".join(translator.feed(chunk) for chunk in chunks) + translator.finish()


def stream_of(source: bytes, how: str = "whole", **kwargs: Any) -> bytes:
    return through(r2a.StreamTranslator(requested_model="m", **kwargs), split(source, how))


# ---------------------------------------------------------------------------------------------------
# requests

RESPONSES_FULL: dict[str, Any] = {
    "model": "auth_assistant",
    "instructions": "Be terse.",
    "input": [
        {"role": "developer", "content": [{"type": "input_text", "text": "Rule one."}]},
        {"role": "system", "content": "You are kind."},
        {"role": "user", "content": "Weather in Paris and the time?"},
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_a",
            "status": "completed",
            "content": [
                {"type": "output_text", "text": "Checking.", "annotations": []},
                {"type": "refusal", "refusal": "No."},
            ],
        },
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "weather",
            "arguments": '{"city": "P"}',
            "status": "completed",
        },
        {"type": "function_call", "call_id": "call_2", "name": "time", "arguments": ""},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "09:00"}]},
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "And these?"},
                {"type": "input_image", "image_url": f"data:image/png;base64,{PNG_B64}", "detail": "low"},
                {"type": "input_image", "image_url": "https://example.com/cat.jpg", "detail": "auto"},
                {"type": "input_file", "filename": "a.pdf", "file_data": f"data:application/pdf;base64,{PDF_B64}"},
            ],
        },
    ],
    "tools": [
        {"type": "function", "name": "weather", "description": "Weather", "parameters": WEATHER_SCHEMA, "strict": True},
        {"type": "function", "name": "time", "parameters": None, "strict": False},
    ],
    "tool_choice": {"type": "function", "name": "weather"},
    "parallel_tool_calls": False,
    "max_output_tokens": 300,
    "temperature": 1.5,
    "top_p": 0.9,
    "user": "user-42",
    "stream": True,
    "store": True,
    "metadata": {"k": "v"},
    "text": {"format": {"type": "text"}, "verbosity": "low"},
    "reasoning": {"effort": None},
    "truncation": "auto",
    "service_tier": "auto",
    "prompt_cache_key": "pk",
    "include": ["message.input_image.image_url"],
    "background": False,
    "top_logprobs": 0,
    "stream_options": {"include_obfuscation": False},
    "max_tool_calls": 3,
}

ANTHROPIC_OF_FULL: dict[str, Any] = {
    "model": "claude-3",
    "system": [
        {"type": "text", "text": "Be terse."},
        {"type": "text", "text": "Rule one."},
        {"type": "text", "text": "You are kind."},
    ],
    "messages": [
        {"role": "user", "content": "Weather in Paris and the time?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "text", "text": "No."},
                {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "P"}},
                {"type": "tool_use", "id": "call_2", "name": "time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "09:00"}]},
                {"type": "text", "text": "And these?"},
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
    "temperature": 1.0,
    "top_p": 0.9,
    "stream": True,
    "metadata": {"user_id": "user-42"},
    "tools": [
        {"name": "weather", "description": "Weather", "input_schema": WEATHER_SCHEMA},
        {"name": "time", "input_schema": {"type": "object", "properties": {}}},
    ],
    "tool_choice": {"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
}

RESPONSES_MINIMAL: dict[str, Any] = {"model": "m", "input": "Hello"}
RESPONSES_TOOLS: dict[str, Any] = {
    "model": "m",
    "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "use weather"}]},
        {"type": "function_call", "call_id": "toolu_1", "name": "weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "toolu_1", "output": "18C"},
    ],
    "tools": [{"type": "function", "name": "weather", "parameters": WEATHER_SCHEMA}],
    "tool_choice": {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "weather"}]},
}


def test_one_format_name_everywhere() -> None:
    from extproc.base import apis
    from extproc.core import usage

    assert r2a.CALLER_FORMAT == usage.RESPONSES == apis.RESPONSES_FORMAT == "openai_responses"


def test_every_mapped_field() -> None:
    translated = to_anthropic(RESPONSES_FULL)
    assert translated == ANTHROPIC_OF_FULL
    validated_by_mock_anthropic(translated)


def test_the_simplest_requests() -> None:
    assert to_anthropic(RESPONSES_MINIMAL) == {
        "model": "claude-3",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 4096,
    }
    # One plain string of instructions stays a plain system string; the default max_tokens is the caller's.
    assert r2a.request({"input": [USER], "instructions": "Be brief."}, model="c", default_max_tokens=77) == {
        "model": "c",
        "system": "Be brief.",
        "messages": [USER],
        "max_tokens": 77,
    }
    # A developer message alone is the system prompt too; safety_identifier is the user id when user is absent.
    assert to_anthropic({"input": [{"role": "developer", "content": "D"}, USER], "safety_identifier": "s"}) == {
        "model": "claude-3",
        "system": "D",
        "messages": [USER],
        "max_tokens": 4096,
        "metadata": {"user_id": "s"},
    }


def test_tool_results_lead_the_user_turn_whatever_the_item_order() -> None:
    body = {
        "input": [
            USER,
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"role": "user", "content": "meanwhile"},
            {"type": "function_call_output", "call_id": "c1", "output": "done"},
        ]
    }
    assert to_anthropic(body)["messages"][-1] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "done"},
            {"type": "text", "text": "meanwhile"},
        ],
    }


BOTH = ["weather", "time"]


@pytest.mark.parametrize(
    ("choice", "parallel", "tools", "expected"),
    [
        (None, None, BOTH, None),
        (None, False, BOTH, {"type": "auto", "disable_parallel_tool_use": True}),
        ("auto", None, BOTH, {"type": "auto"}),
        ("auto", False, BOTH, {"type": "auto", "disable_parallel_tool_use": True}),
        ("none", False, BOTH, {"type": "none"}),
        ("required", None, BOTH, {"type": "any"}),
        ({"type": "function", "name": "time"}, None, BOTH, {"type": "tool", "name": "time"}),
        (
            {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "time"}]},
            None,
            ["time"],
            {"type": "auto"},
        ),
        (
            {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "weather"}]},
            False,
            ["weather"],
            {"type": "any", "disable_parallel_tool_use": True},
        ),
        (
            {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "other"}]},
            None,
            [],
            None,  # no tool left to offer: no tools and no tool_choice, which is "none" for Anthropic
        ),
    ],
)
def test_tool_choice(choice: Any, parallel: bool | None, tools: list[str], expected: dict[str, Any] | None) -> None:
    body: dict[str, Any] = {
        "input": "hi",
        "tools": [
            {"type": "function", "name": "weather", "parameters": WEATHER_SCHEMA},
            {"type": "function", "name": "time"},
        ],
        "tool_choice": choice,
        "parallel_tool_calls": parallel,
    }
    translated = to_anthropic(body)
    assert translated.get("tool_choice") == expected
    assert [tool["name"] for tool in translated.get("tools", [])] == tools  # allowed_tools offers only those


def test_an_empty_assistant_message_is_left_out() -> None:
    body = {"input": [USER, {"role": "assistant", "content": ""}, {"role": "user", "content": "again"}]}
    assert to_anthropic(body)["messages"] == [USER, {"role": "user", "content": "again"}]


def test_a_tool_choice_without_tools_is_left_out() -> None:
    for choice in ("auto", "none", {"type": "allowed_tools", "mode": "auto", "tools": []}):
        assert "tool_choice" not in to_anthropic({**RESPONSES_MINIMAL, "tool_choice": choice, "tools": []})


def test_dropped_fields_change_nothing() -> None:
    dropped = {
        "store": False,
        "metadata": {"a": "b"},
        "service_tier": "flex",
        "prompt_cache_key": "k",
        "prompt_cache_retention": "24h",
        "stream_options": {"include_obfuscation": True},
        "truncation": "disabled",
        "max_tool_calls": 2,
        "text": {"format": {"type": "text"}, "verbosity": "high"},
        "reasoning": {"effort": "none", "summary": "auto"},
        "include": [],
        "background": False,
        "top_logprobs": 0,
        "previous_response_id": None,  # null means "not given" for every field
        "conversation": None,
    }
    assert to_anthropic({**RESPONSES_MINIMAL, **dropped}) == to_anthropic(RESPONSES_MINIMAL)


def test_temperature_is_clamped_and_top_p_kept() -> None:
    assert to_anthropic({**RESPONSES_MINIMAL, "temperature": 2, "top_p": 0.5})["temperature"] == 1.0
    assert to_anthropic({**RESPONSES_MINIMAL, "temperature": 0.2})["temperature"] == 0.2


BUILT_IN = ["web_search", "web_search_preview", "file_search", "computer_use_preview", "code_interpreter",
            "image_generation", "mcp", "local_shell"]

REFUSALS: list[tuple[dict[str, Any], str]] = [
    (
        {"previous_response_id": "resp_1"},
        "'previous_response_id' continues a response stored by OpenAI, which the Anthropic Messages API cannot "
        "read; send the whole conversation in 'input' instead",
    ),
    (
        {"conversation": {"id": "conv_1"}},
        "'conversation' continues a conversation stored by OpenAI, which the Anthropic Messages API cannot read; "
        "send the whole conversation in 'input' instead",
    ),
    ({"prompt": {"id": "pmpt_1"}}, "'prompt' refers to a prompt template stored by OpenAI, which the Anthropic "
                                   "Messages API cannot read"),
    ({"context_management": [{"type": "compaction"}]},
     "'context_management' (compaction by OpenAI) cannot be served by the Anthropic Messages API"),
    ({"background": True}, "'background': true cannot be served by the Anthropic Messages API"),
    (
        {"store": True, "input": [USER, {"type": "item_reference", "id": "msg_1"}]},
        "'input[1]' is an item_reference to an item stored by OpenAI, which the Anthropic Messages API cannot "
        "read; send the item itself instead",
    ),
    *[
        (
            {"tools": [{"type": kind}]},
            f"'tools[0]' is OpenAI's built-in '{kind}' tool, which the Anthropic Messages API cannot run",
        )
        for kind in BUILT_IN
    ],
    (
        {"tools": [{"type": "function", "name": "f"}, {"type": "custom", "name": "g"}]},
        "'tools[1]' type 'custom' cannot be translated (only function tools)",
    ),
    *[
        (
            {"include": [value]},
            f"'include' value '{value}' asks for output only OpenAI produces; the Anthropic Messages API cannot "
            "serve it",
        )
        for value in ["reasoning.encrypted_content", "message.output_text.logprobs", "file_search_call.results",
                      "web_search_call.results", "web_search_call.action.sources", "code_interpreter_call.outputs",
                      "computer_call_output.output.image_url"]
    ],
    (
        {"text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}},
        "'text.format' type 'json_schema' cannot be served by the Anthropic Messages API",
    ),
    ({"text": {"format": {"type": "json_object"}}},
     "'text.format' type 'json_object' cannot be served by the Anthropic Messages API"),
    ({"reasoning": {"effort": "high"}}, "'reasoning.effort' 'high' cannot be served by the Anthropic Messages API"),
    ({"reasoning": {"summary": "auto"}}, "'reasoning.summary' cannot be served by the Anthropic Messages API"),
    ({"top_logprobs": 3}, "'top_logprobs' cannot be served by the Anthropic Messages API"),
    ({"frobnicate": 1}, "'frobnicate' cannot be translated to the Anthropic Messages API"),
    (
        {"input": [USER, {"type": "web_search_call", "id": "ws", "status": "completed"}]},
        "'input[1]' item type 'web_search_call' cannot be translated",
    ),
    (
        {"input": [USER, {"role": "assistant", "content": "Sure, "}]},
        "a final assistant message would be continued (prefill) by the Anthropic API",
    ),
    (
        {"input": [USER, {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]},
        "'input' ends with a function_call without its function_call_output",
    ),
    (
        {"input": [USER, {"type": "function_call_output", "call_id": "call_9", "output": "x"}]},
        "'input[1].call_id' 'call_9' answers no function_call in 'input'",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
        "'input[0].content[0].file_id' refers to a file stored by OpenAI, which Anthropic cannot read",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
        "'input[0].content[0]' only inline PDF files (file_data as a data: URL) can be translated",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "https://x/a.pdf"}]}]},
        "'input[0].content[0]' only inline PDF files (file_data as a data: URL) can be translated",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        "'input[0].content[0]' part type 'input_audio' cannot be translated",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/bmp;base64,AA"}]}]},
        "'input[0].content[0]' image type 'image/bmp' is not supported by Anthropic",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "ftp://x/cat.png"}]}]},
        "'input[0].content[0].image_url' must be a data: or http(s) URL",
    ),
    ({"tool_choice": {"type": "web_search_preview"}}, "'tool_choice' type 'web_search_preview' cannot be translated"),
    ({"tool_choice": "sometimes"}, "'tool_choice' 'sometimes' cannot be translated"),
    (
        {"tools": [{"type": "function", "name": "f"}],
         "tool_choice": {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "g"}]}},
        "'tool_choice' requires a call but allows none of the function tools in 'tools'",
    ),
    (
        {"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "mcp", "server_label": "s"}]}},
        "'tool_choice.tools[0]' type 'mcp' cannot be translated (only function tools)",
    ),
    ({"tool_choice": "required"}, "'tool_choice' requires a function call but 'tools' offers no function"),
    ({"tool_choice": {"type": "function", "name": "f"}, "tools": []},
     "'tool_choice' requires a function call but 'tools' offers no function"),
    ({"input": []}, "'input' must hold at least one user message to be served by the Anthropic Messages API"),
    ({"input": [{"role": "system", "content": "S"}]},
     "'input' must hold at least one user message to be served by the Anthropic Messages API"),
    ({"input": None}, "'input' is required to be served by the Anthropic Messages API"),
    ({"input": [{"role": "tool", "content": "x"}]}, "'input[0].role' 'tool' cannot be translated"),
    (
        {"input": [USER, {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]},
        "'input[1].arguments' are not valid JSON",
    ),
    (
        {"input": [USER, {"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"},
                   {"type": "function_call_output", "call_id": "c", "output": "x"}]},
        "'input[1].arguments' must be a JSON object",
    ),
]


@pytest.mark.parametrize(("fields", "message"), REFUSALS, ids=[m[:50] for _, m in REFUSALS])
def test_what_cannot_be_served_is_refused_with_a_precise_message(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(TranslationError) as info:
        to_anthropic({**RESPONSES_MINIMAL, **fields})
    assert info.value.message == message


WRONG_TYPES: list[tuple[dict[str, Any], str]] = [
    ({"input": 5}, "'input' must be a string or an array"),
    ({"input": [5]}, "'input[0]' must be an object"),
    ({"input": [{"type": 5}]}, "'input[0].type' must be a string"),
    ({"input": [{"type": "message", "role": 5}]}, "'input[0].role' must be a string"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]},
     "'input[0].content[0].text' must be a string"),
    ({"input": [{"role": "user", "content": [{"type": 5}]}]}, "'input[0].content[0].type' must be a string"),
    ({"input": [{"role": "user", "content": 5}]}, "'input[0].content' must be a string or an array"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": 5}]}]},
     "'input[0].content[0].image_url' must be a string"),
    ({"input": [{"role": "system", "content": [{"type": "input_image"}]}, USER]},
     "'input[0].content' may only hold input_text parts here"),
    ({"input": [USER, {"type": "function_call", "call_id": 5, "name": "f", "arguments": "{}"}]},
     "'input[1].call_id' must be a string"),
    ({"input": [USER, {"type": "function_call", "call_id": "c", "name": "f", "arguments": 5}]},
     "'input[1].arguments' must be a string"),
    ({"input": [USER, {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": 5}]},
     "'input[2].output' must be a string or an array"),
    ({"instructions": 5}, "'instructions' must be a string"),
    ({"max_output_tokens": "5"}, "'max_output_tokens' must be an integer from 1 to 2147483647"),
    ({"max_output_tokens": 0}, "'max_output_tokens' must be an integer from 1 to 2147483647"),
    ({"temperature": "hot"}, "'temperature' must be a number"),
    ({"top_p": []}, "'top_p' must be a number"),
    ({"stream": 1}, "'stream' must be a boolean"),
    ({"user": 5}, "'user' must be a string"),
    ({"safety_identifier": {}}, "'safety_identifier' must be a string"),
    ({"tools": {}}, "'tools' must be an array"),
    ({"tools": [5]}, "'tools[0]' must be an object"),
    ({"tools": [{"name": "f"}]}, "'tools[0].type' must be a string"),
    ({"tools": [{"type": "function", "name": 5}]}, "'tools[0].name' must be a string"),
    ({"tools": [{"type": "function", "name": "f", "parameters": []}]}, "'tools[0].parameters' must be an object"),
    ({"tools": [{"type": "function", "name": "f", "description": 5}]}, "'tools[0].description' must be a string"),
    ({"tools": [{"type": "function", "name": "f", "strict": "yes"}]}, "'tools[0].strict' must be a boolean"),
    ({"tool_choice": 5}, "'tool_choice' must be \"auto\", \"none\", \"required\" or an object"),
    ({"tool_choice": {"type": "function"}}, "'tool_choice.name' must be a string"),
    ({"tool_choice": {"type": "allowed_tools", "mode": "maybe", "tools": []}},
     "'tool_choice.mode' must be \"auto\" or \"required\""),
    ({"parallel_tool_calls": "no"}, "'parallel_tool_calls' must be a boolean"),
    ({"metadata": 5}, "'metadata' must be an object"),
    ({"store": "yes"}, "'store' must be a boolean"),
    ({"truncation": 1}, "'truncation' must be a string"),
    ({"max_tool_calls": "2"}, "'max_tool_calls' must be an integer"),
    ({"include": "x"}, "'include' must be an array of strings"),
    ({"text": 5}, "'text' must be an object"),
    ({"text": {"format": 5}}, "'text.format' must be an object"),
    ({"text": {"format": {"type": None}}}, "'text.format.type' must be a string"),
    ({"reasoning": 5}, "'reasoning' must be an object"),
    ({"reasoning": {"effort": 5}}, "'reasoning.effort' must be a string"),
    ({"top_logprobs": "1"}, "'top_logprobs' must be an integer"),
    ({"background": "no"}, "'background' must be a boolean"),
]


@pytest.mark.parametrize(("fields", "message"), WRONG_TYPES, ids=[m for _, m in WRONG_TYPES])
def test_a_wrong_typed_field_is_named(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(TranslationError) as info:
        to_anthropic({**RESPONSES_MINIMAL, **fields})
    assert info.value.message == message


@pytest.mark.parametrize("body", [None, 5, "x", [], [RESPONSES_MINIMAL]])
def test_a_body_that_is_not_an_object_is_refused(body: Any) -> None:
    with pytest.raises(TranslationError, match="must be a JSON object"):
        to_anthropic(body)


def test_integers_beyond_64_bits_are_refused_where_they_would_be_written() -> None:
    huge = 2**70
    with pytest.raises(TranslationError, match=r"'tools\[0\].parameters' holds an integer beyond 64 bits"):
        to_anthropic({**RESPONSES_MINIMAL, "tools": [{"type": "function", "name": "f", "parameters": {"x": huge}}]})
    with pytest.raises(TranslationError, match="'max_output_tokens' must be an integer"):
        to_anthropic({**RESPONSES_MINIMAL, "max_output_tokens": huge})


def _mutations(bodies: list[dict[str, Any]]) -> Iterator[tuple[tuple[Any, ...], Any, Any]]:
    for body in bodies:
        for path in paths(body):
            for value in [*VALUES, _DELETE] if path else VALUES:
                yield path, value, replaced(body, path, value)


def test_any_value_at_any_path_translates_or_is_refused_cleanly() -> None:
    seen = {"translated": 0, "refused": 0}
    for path, value, body in _mutations([RESPONSES_FULL, RESPONSES_MINIMAL, RESPONSES_TOOLS]):
        try:
            result = outcome(to_anthropic, body)
            if result == "translated":
                # What is written is a Messages request the provider's own validation accepts.
                validated_by_mock_anthropic(to_anthropic(body))
        except AssertionError:
            raise
        except Exception as exc:  # the failure to report: which path, which value
            pytest.fail(f"{type(exc).__name__}: {exc} at {path!r} = {value!r}")
        seen[result] += 1
    # Both outcomes occur: the mutations reach fields that matter and fields that are passed over.
    assert seen["translated"] > 300 and seen["refused"] > 300, seen


@pytest.mark.parametrize("seed", range(4))
def test_several_odd_values_at_once_translate_or_are_refused_cleanly(seed: int) -> None:
    rng = random.Random(f"responses-request-{seed}")
    for _ in range(500):
        body: Any = rng.choice([RESPONSES_FULL, RESPONSES_MINIMAL, RESPONSES_TOOLS])
        for _ in range(rng.randint(2, 4)):
            candidates = [p for p in paths(body) if p]
            if not candidates:
                break
            body = replaced(body, rng.choice(candidates), rng.choice([*VALUES, _DELETE]))
        try:
            if outcome(to_anthropic, body) == "translated":
                validated_by_mock_anthropic(to_anthropic(body))
        except AssertionError:
            raise
        except Exception as exc:
            pytest.fail(f"{type(exc).__name__}: {exc} for {body!r}")


# ---------------------------------------------------------------------------------------------------
# JSON answers

EXPECTED_OF_TOOL_MESSAGE: dict[str, Any] = {
    "id": "resp_01XYZ",
    "object": "response",
    "created_at": 1,
    "status": "completed",
    "background": False,
    "completed_at": 1,
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "max_output_tokens": None,
    "max_tool_calls": None,
    "model": "fraud_detector",
    "output": [
        {
            "id": "msg_01XYZ",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Let me check.", "annotations": [], "logprobs": []}],
        },
        {
            "id": "fc_01A",
            "type": "function_call",
            "status": "completed",
            "call_id": "toolu_01A",
            "name": "weather",
            "arguments": '{"city":"Paris","unit":"c"}',
        },
    ],
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "prompt_cache_key": None,
    "reasoning": {"effort": None, "summary": None},
    "safety_identifier": None,
    "service_tier": "default",
    "store": False,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}, "verbosity": "medium"},
    "tool_choice": "auto",
    "tools": [],
    "top_logprobs": 0,
    "top_p": 1.0,
    "truncation": "disabled",
    "usage": {
        "input_tokens": 135,
        "input_tokens_details": {"cached_tokens": 30, "cache_write_tokens": 5},
        "output_tokens": 20,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 155,
    },
    "user": None,
    "metadata": {},
}


def test_anthropic_message_becomes_a_responses_object() -> None:
    translated = r2a.response(ANTHROPIC_TOOL_MESSAGE, requested_model="fraud_detector")
    assert translated == EXPECTED_OF_TOOL_MESSAGE
    parsed = Response.model_validate(translated)
    assert parsed.output_text == "Let me check."
    call = parsed.output[1]
    assert call.type == "function_call" and orjson.loads(call.arguments) == {"city": "Paris", "unit": "c"}
    assert parsed.usage is not None and parsed.usage.input_tokens_details.cached_tokens == 30


def test_the_sdk_reads_a_translated_json_answer() -> None:
    body = orjson.dumps(r2a.response(ANTHROPIC_TOOL_MESSAGE, requested_model="fraud_detector"))
    with openai_client(serve(body)) as client:
        answer = client.responses.create(model="fraud_detector", input="weather?")
    assert answer.id == "resp_01XYZ" and answer.model == "fraud_detector"
    assert answer.output_text == "Let me check."
    assert [item.type for item in answer.output] == ["message", "function_call"]


@pytest.mark.parametrize(
    ("stop_reason", "status", "reason"),
    [
        ("end_turn", "completed", None),
        ("stop_sequence", "completed", None),
        ("tool_use", "completed", None),
        ("pause_turn", "completed", None),
        ("max_tokens", "incomplete", "max_output_tokens"),
        ("model_context_window_exceeded", "incomplete", "max_output_tokens"),
        ("refusal", "incomplete", "content_filter"),
        (None, "completed", None),
        (5, "completed", None),
        ("some_new_reason", "completed", None),
    ],
)
def test_stop_reasons(stop_reason: Any, status: str, reason: str | None) -> None:
    message = {"id": "msg_1", "content": [{"type": "text", "text": "partial"}], "stop_reason": stop_reason}
    translated = r2a.response(message, requested_model="m")
    Response.model_validate(translated)
    assert translated["status"] == status
    assert translated["incomplete_details"] == (None if reason is None else {"reason": reason})
    assert translated["output"][0]["status"] == ("incomplete" if reason else "completed")
    assert translated["completed_at"] == (1 if status == "completed" else None)


def test_blocks_become_items_in_order_and_thinking_is_skipped() -> None:
    message = {
        "id": "msg_2",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "A"},
            {"type": "tool_use", "id": "toolu_x", "name": "f", "input": {}},
            {"type": "text", "text": "B"},
            {"type": "tool_use", "id": "toolu_y", "name": "g"},
        ],
        "stop_reason": "tool_use",
    }
    output = r2a.response(message, requested_model="m")["output"]
    assert [(item["type"], item["id"]) for item in output] == [
        ("message", "msg_2"), ("function_call", "fc_x"), ("message", "msg_2_1"), ("function_call", "fc_y")]
    assert output[3]["arguments"] == "{}"
    assert r2a.response({"content": []}, requested_model="m")["output"] == []


def test_odd_metadata_is_defaulted_when_the_content_is_sound() -> None:
    message = {"id": 5, "content": [{"type": "text", "text": "hi"}], "stop_reason": [], "usage": "lots"}
    translated = r2a.response(message, requested_model="m")
    Response.model_validate(translated)
    assert translated["id"] == "resp_" and translated["usage"]["total_tokens"] == 0
    huge = r2a.response({"content": [], "usage": {"input_tokens": 2**70, "output_tokens": -1}}, requested_model="m")
    assert huge["usage"]["input_tokens"] == 0 and huge["usage"]["output_tokens"] == 0


DUPLICATE_CALL = orjson.dumps({"content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}},
                                           {"type": "tool_use", "id": "t", "name": "g", "input": {}}]})


@pytest.mark.parametrize("body", [*BROKEN_ANTHROPIC_JSON, DUPLICATE_CALL])
def test_content_of_the_wrong_shape_is_refused(body: bytes) -> None:
    with pytest.raises(TranslationError):
        r2a.response(orjson.loads(body), requested_model="m")


def test_echo_repeats_what_the_caller_asked_for() -> None:
    echoed = r2a.echo(RESPONSES_FULL)
    assert echoed == {
        "instructions": "Be terse.",
        "user": "user-42",
        "prompt_cache_key": "pk",
        "temperature": 1.5,
        "top_p": 0.9,
        "max_output_tokens": 300,
        "parallel_tool_calls": False,
        "metadata": {"k": "v"},
        "truncation": "auto",
        "tool_choice": {"type": "function", "name": "weather"},
        "tools": [
            {"type": "function", "name": "weather", "description": "Weather", "parameters": WEATHER_SCHEMA,
             "strict": True},
            {"type": "function", "name": "time", "description": None, "parameters": None, "strict": False},
        ],
        "text": {"format": {"type": "text"}, "verbosity": "low"},
    }
    translated = r2a.response(ANTHROPIC_TOOL_MESSAGE, requested_model="m", echo=echoed)
    parsed = Response.model_validate(translated)
    assert parsed.instructions == "Be terse." and parsed.parallel_tool_calls is False
    assert [tool.name for tool in parsed.tools] == ["weather", "time"]
    # Odd values are left out rather than raised on: the response must still validate.
    odd = r2a.echo({"tools": [{"type": "web_search"}], "metadata": {"a": 1}, "tool_choice": {"type": "x"},
                    "temperature": "hot", "text": {"verbosity": "loud"}})
    assert odd == {}
    assert r2a.echo(5) == {}


def test_error_bodies_use_openais_envelope() -> None:
    out = orjson.loads(r2a.error(529, orjson.dumps(ANTHROPIC_ERROR)))
    assert out == {"error": {"message": "Overloaded", "type": "server_error", "param": None, "code": "overloaded"}}
    rate = orjson.loads(r2a.error(429, b'{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}'))
    assert rate["error"]["code"] == "rate_limit_exceeded"
    assert orjson.loads(r2a.error(502, b"<html>bad gateway</html>"))["error"]["message"] == (
        "Upstream provider error (HTTP 502)")
    assert orjson.loads(r2a.untranslatable_body()) == UNTRANSLATABLE


# ---------------------------------------------------------------------------------------------------
# streams


def events_of(out: bytes) -> list[dict[str, Any]]:
    return check_responses_stream(out)


_TERMINAL = ("response.completed", "response.incomplete", "error")


def check_responses_stream(out: bytes) -> list[dict[str, Any]]:
    """Well-formed Responses SSE: named events, each valid for the SDK, numbered 0.., one terminal at the end.

    Items are added before their deltas and done after them; response.failed only right before error.
    """
    assert out.endswith(b"\n\n"), out[-200:]
    payloads: list[dict[str, Any]] = []
    added: set[int] = set()
    done: set[int] = set()
    for number, raw in enumerate(out[:-2].split(b"\n\n")):
        lines = raw.split(b"\n")
        assert len(lines) == 2 and lines[0].startswith(b"event: ") and lines[1].startswith(b"data: "), raw
        payload = orjson.loads(lines[1][6:])
        assert isinstance(payload, dict) and payload["type"] == lines[0][7:].decode(), raw
        assert payload["sequence_number"] == number, raw
        EVENT.validate_python(payload)  # the installed SDK's own event models
        kind = payload["type"]
        if number == 0:
            assert kind in ("response.created", "error"), raw
        if kind == "response.output_item.added":
            assert payload["output_index"] == len(added), raw
            added.add(payload["output_index"])
        elif kind == "response.output_item.done":
            assert payload["output_index"] in added and payload["output_index"] not in done, raw
            done.add(payload["output_index"])
        elif "output_index" in payload:
            assert payload["output_index"] in added and payload["output_index"] not in done, raw
        if kind in ("response.completed", "response.incomplete"):
            assert done == added, raw  # every item finished before the response is
            Response.model_validate(payload["response"])
        if kind == "response.failed":
            Response.model_validate(payload["response"])
        payloads.append(payload)
    terminal = [i for i, p in enumerate(payloads) if p["type"] in _TERMINAL]
    assert terminal == [len(payloads) - 1], [p["type"] for p in payloads]
    failed = [i for i, p in enumerate(payloads) if p["type"] == "response.failed"]
    assert failed in ([], [len(payloads) - 2]) and (not failed or payloads[-1]["type"] == "error"), payloads
    return payloads


def anthropic_message_of(stream: bytes) -> dict[str, Any]:
    """The Anthropic message a stream describes, accumulated as Anthropic's own SDK would."""
    message: dict[str, Any] = {}
    blocks: dict[int, dict[str, Any]] = {}
    inputs: dict[int, str] = {}
    for raw in stream.split(b"\n\n"):
        data = raw.rpartition(b"data: ")[2]
        if not data:
            continue
        event = orjson.loads(data)
        if event["type"] == "message_start":
            message = dict(event["message"])
        elif event["type"] == "content_block_start":
            blocks[event["index"]] = dict(event["content_block"])
        elif event["type"] == "content_block_delta":
            delta = event["delta"]
            if delta["type"] == "text_delta":
                blocks[event["index"]]["text"] += delta["text"]
            elif delta["type"] == "input_json_delta":
                inputs[event["index"]] = inputs.get(event["index"], "") + delta["partial_json"]
        elif event["type"] == "message_delta":
            message.update(event["delta"])
            message["usage"] = {**message["usage"], **event["usage"]}
    for index, text in inputs.items():
        blocks[index]["input"] = orjson.loads(text) if text else {}
    message["content"] = [blocks[i] for i in sorted(blocks)]
    return message


@pytest.mark.parametrize("source", ["text", "tool"])
def test_a_stream_and_the_json_of_the_same_answer_give_the_same_response(source: str) -> None:
    stream = anthropic_text_stream() if source == "text" else anthropic_tool_stream()
    whole = stream_of(stream)
    for how in CHUNKINGS:
        assert stream_of(stream, how) == whole, how  # chunking never changes a byte
    events = check_responses_stream(whole)
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] == "response.completed"
    # Equal but for the arguments' spelling: streamed as Claude wrote them, re-serialised from the JSON answer.
    assert normalised(events[-1]["response"]) == normalised(
        r2a.response(anthropic_message_of(stream), requested_model="m"))


def normalised(response: dict[str, Any]) -> dict[str, Any]:
    output = [
        {**item, "arguments": orjson.loads(item["arguments"])} if item["type"] == "function_call" else item
        for item in response["output"]
    ]
    return {**response, "output": output}


def test_the_text_stream_event_by_event() -> None:
    source = b"".join(mock._message_events("msg_01abc", "claude-3", "hello big world", 9))
    events = check_responses_stream(stream_of(source))
    assert [(e["type"], e.get("delta")) for e in events] == [
        ("response.created", None),
        ("response.in_progress", None),
        ("response.output_item.added", None),
        ("response.content_part.added", None),
        ("response.output_text.delta", "hello"),
        ("response.output_text.delta", " big"),
        ("response.output_text.delta", " world"),
        ("response.output_text.done", None),
        ("response.content_part.done", None),
        ("response.output_item.done", None),
        ("response.completed", None),
    ]
    assert events[0]["response"]["id"] == "resp_01abc" and events[0]["response"]["status"] == "in_progress"
    assert events[2]["item"] == {"id": "msg_01abc", "type": "message", "status": "in_progress", "role": "assistant",
                                 "content": []}
    assert events[7]["text"] == "hello big world"
    assert events[-1]["response"]["usage"] == {
        "input_tokens": 9, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 12}


def test_the_sdk_accumulates_a_translated_stream() -> None:
    out = stream_of(anthropic_tool_stream(), "seed-1")
    with openai_client(serve(out, sse=True)) as client, client.responses.stream(model="m", input="x") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds.count("response.function_call_arguments.done") == 2 and kinds[-1] == "response.completed"
    assert final.output_text == "Let me chéck 🎉."
    calls = [item for item in final.output if item.type == "function_call"]
    expected = anthropic_message_of(anthropic_tool_stream())["content"][1:]
    assert [(c.call_id, c.name, orjson.loads(c.arguments)) for c in calls] == [
        (block["id"], block["name"], block["input"]) for block in expected]
    assert final.usage is not None and final.usage.input_tokens_details.cached_tokens == 40

    # The raw event iterator of responses.create(stream=True) too.
    with openai_client(serve(out, sse=True)) as client:
        raw = list(client.responses.create(model="m", input="x", stream=True))
    assert [event.sequence_number for event in raw] == list(range(len(raw)))


def test_max_tokens_ends_the_stream_incomplete() -> None:
    source = anthropic_text_stream().replace(b'"stop_reason":"end_turn"', b'"stop_reason":"max_tokens"')
    events = check_responses_stream(stream_of(source))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-1]["response"]["output"][0]["status"] == "incomplete"


_SERVED: dict[str, bytes] = {}
_SDK = openai_client(lambda request: httpx2.Response(200, headers={"content-type": "text/event-stream"},
                                                     content=_SERVED["body"]))


def _sdk_final(out: bytes) -> tuple[list[str], Exception | None]:
    """The event types the SDK's stream helper yields for ``out``, and what it raised, if anything."""
    _SERVED["body"] = out
    kinds: list[str] = []
    try:
        with _SDK.responses.stream(model="m", input="x") as stream:
            for event in stream:
                kinds.append(event.type)
            stream.get_final_response()
    except Exception as exc:
        return kinds, exc
    return kinds, None


def test_a_provider_error_mid_stream_fails_the_response_and_the_sdk_raises() -> None:
    events = [event + b"\n\n" for event in anthropic_text_stream().split(b"\n\n") if event]
    error = sse("error", ANTHROPIC_ERROR)
    translator = r2a.StreamTranslator(requested_model="m")
    out = through(translator, [*events[:5], error, *events[5:]])
    assert translator.complete and translator.failure is None  # the provider's error, not ours
    payloads = check_responses_stream(out)
    failed, last = payloads[-2], payloads[-1]
    assert failed["type"] == "response.failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": "Overloaded"}
    assert failed["response"]["output"][0]["status"] == "incomplete"
    assert last == {
        "type": "error", "sequence_number": last["sequence_number"], "code": "overloaded", "message": "Overloaded",
        "param": None, "error": {"type": "server_error", "code": "overloaded", "message": "Overloaded", "param": None}}
    kinds, raised = _sdk_final(out)
    assert isinstance(raised, openai.APIError) and raised.message == "Overloaded"
    assert "response.failed" in kinds and "response.output_text.delta" in kinds


def test_an_error_before_anything_is_one_error_event() -> None:
    out = stream_of(sse("error", {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}))
    assert check_responses_stream(out) == [{
        "type": "error", "sequence_number": 0, "code": "rate_limit_exceeded", "message": "slow down", "param": None,
        "error": {"type": "requests", "code": "rate_limit_exceeded", "message": "slow down", "param": None}}]
    _, raised = _sdk_final(out)
    assert isinstance(raised, openai.APIError) and raised.message == "slow down"


def test_a_cut_stream_never_ends_cleanly_wherever_it_is_cut() -> None:
    source = anthropic_tool_stream()
    events = [event + b"\n\n" for event in source.split(b"\n\n") if event]
    for cut in range(len(events)):
        translator = r2a.StreamTranslator(requested_model="m")
        out = through(translator, events[:cut])
        payloads = check_responses_stream(out)
        assert payloads[-1]["type"] == "error" and payloads[-1]["message"] == r2a._CUT_MESSAGE, cut
        assert translator.failure is None and translator.complete
        assert [p["type"] for p in payloads[-2:]] == (["response.failed", "error"] if cut else ["error"]), cut
        kinds, raised = _sdk_final(out)
        assert isinstance(raised, openai.APIError), (cut, kinds, raised)


UNTRANSLATABLE_EVENTS = [
    *BROKEN_ANTHROPIC_EVENTS,
    sse("content_block_delta", {"type": "content_block_delta", "index": 7, "delta": {"type": "text_delta",
                                                                                     "text": "x"}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta",
                                                                                     "text": "x"}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta",
                                                                                     "partial_json": "{"}}),
    sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}),
    sse("message_start", {"type": "message_start", "message": {"id": "msg_again"}}),
    sse("content_block_start", {"type": "content_block_start", "index": 9,
                                "content_block": {"type": "tool_use", "id": "toolu_01A", "name": "weather"}}),
]


@pytest.mark.parametrize("broken", UNTRANSLATABLE_EVENTS)
def test_an_event_that_cannot_be_translated_ends_the_stream_after_what_was_sent(broken: bytes) -> None:
    events = [event + b"\n\n" for event in anthropic_tool_stream().split(b"\n\n") if event]
    at = 6  # after the text block's first delta and the tool block's start
    sent = stream_of(b"".join(events[:at]))
    translator = r2a.StreamTranslator(requested_model="m")
    out = through(translator, [*events[:at], broken, *events[at:]])
    assert translator.failure is not None
    prefix = sent[: sent.index(b"event: error")]
    prefix = prefix[: prefix.rindex(b"event: response.failed")] if b"response.failed" in prefix else prefix
    assert out.startswith(prefix)  # what went out before stays
    payloads = check_responses_stream(out)
    assert payloads[-1]["code"] == "provider_response_untranslatable"
    _, raised = _sdk_final(out)
    assert isinstance(raised, openai.APIError)


def test_unknown_events_pings_and_comments_are_skipped() -> None:
    noise = b': keep-alive\n\nevent: ping\ndata: {"type": "ping"}\n\nevent: future\ndata: {"type": "future"}\n\n'
    source = anthropic_text_stream()
    assert stream_of(noise + source.replace(b"\n\nevent: ", b"\n\n" + noise + b"event: ", 3)) == stream_of(source)


def test_nothing_follows_the_end() -> None:
    translator = r2a.StreamTranslator(requested_model="m")
    translator.feed(anthropic_text_stream())
    assert translator.complete
    assert translator.feed(anthropic_text_stream()) == b"" and translator.finish() == b""
    assert translator.untranslatable_events() == b""


# ---------------------------------------------------------------------------------------------------
# ResponseTranslator("openai_responses", ...)


def response_translator(status: int, streaming: bool, **kwargs: Any) -> ResponseTranslator:
    return ResponseTranslator(r2a.CALLER_FORMAT, status, streaming, requested_model="m", **kwargs)


def test_response_translator_uses_this_module() -> None:
    json_out = through(response_translator(200, False), split(orjson.dumps(ANTHROPIC_TOOL_MESSAGE), "seed-2"))
    assert orjson.loads(json_out) == r2a.response(ANTHROPIC_TOOL_MESSAGE, requested_model="m")
    stream_out = through(response_translator(200, True), split(anthropic_tool_stream(), "bytes"))
    assert stream_out == stream_of(anthropic_tool_stream())
    echoed = r2a.echo(RESPONSES_FULL)
    with_echo = orjson.loads(
        through(response_translator(200, False, echo=echoed), [orjson.dumps(ANTHROPIC_TOOL_MESSAGE)]))
    assert with_echo["instructions"] == "Be terse." and len(with_echo["tools"]) == 2
    streamed = check_responses_stream(through(response_translator(200, True, echo=echoed), [anthropic_text_stream()]))
    assert streamed[0]["response"]["instructions"] == streamed[-1]["response"]["instructions"] == "Be terse."


@pytest.mark.parametrize(("status", "error_class"), [
    (400, openai.BadRequestError), (401, openai.AuthenticationError), (404, openai.NotFoundError),
    (429, openai.RateLimitError), (500, openai.InternalServerError), (529, openai.InternalServerError),
])
def test_provider_errors_become_openai_errors_the_sdk_classifies(status: int, error_class: type) -> None:
    # Even a stream request's error arrives as JSON: the translator reads it as a body.
    for streaming in (False, True):
        out = through(response_translator(status, streaming), [orjson.dumps(ANTHROPIC_ERROR)])
        with openai_client(serve(out, status=status)) as client, pytest.raises(error_class) as info:
            client.responses.create(model="m", input="x")
        assert info.value.message.endswith("Overloaded")


@pytest.mark.parametrize("body", [*BROKEN_FOR_BOTH, *BROKEN_ANTHROPIC_JSON])
def test_an_untranslatable_json_answer_becomes_an_openai_error(body: bytes, caplog: pytest.LogCaptureFixture) -> None:
    translator = response_translator(200, False)
    assert orjson.loads(through(translator, [body])) == UNTRANSLATABLE
    assert translator.failed
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_an_unexpected_exception_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug")

    events = [event + b"\n\n" for event in anthropic_text_stream().split(b"\n\n") if event]
    translator = response_translator(200, True)
    first = translator.feed(b"".join(events[:3]))
    monkeypatch.setattr(r2a.StreamTranslator, "_event", broken)
    rest = through(translator, events[3:])
    payloads = check_responses_stream(first + rest)  # the numbering carries on, response.failed included
    assert [p["type"] for p in payloads[-2:]] == ["response.failed", "error"]
    assert payloads[-1]["code"] == "provider_response_untranslatable" and translator.failed

    monkeypatch.setattr(r2a, "response", broken)
    json_translator = response_translator(200, False)
    assert orjson.loads(through(json_translator, [orjson.dumps(ANTHROPIC_TOOL_MESSAGE)])) == UNTRANSLATABLE

    # Even the translator's own ending broken: the module's plain error event, numbered where it got to.
    monkeypatch.setattr(r2a.StreamTranslator, "untranslatable_events", broken)
    translator = response_translator(200, True)
    out = through(translator, [events[0]])
    assert orjson.loads(out.split(b"data: ")[-1])["type"] == "error"


# ---------------------------------------------------------------------------------------------------
# fuzz: seeded mutations of real Anthropic answers


JSON_SOURCES = [ANTHROPIC_TOOL_MESSAGE, orjson.loads(orjson.dumps(ANTHROPIC_ERROR)), {
    "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-3",
    "content": [{"type": "text", "text": "hello"}], "stop_reason": "max_tokens", "stop_sequence": None,
    "usage": mock._anthropic_usage(9, 1)}]
CASES_PER_SEED = 400
SEEDS = range(5)


def odd_anthropic_json(rng: random.Random) -> bytes:
    body = rng.choice(JSON_SOURCES)
    roll = rng.random()
    if roll < 0.05:
        return dumps(body)
    if roll < 0.6:
        return dumps(mutate_value(rng, body))
    if roll < 0.85:
        return mutate_bytes(rng, dumps(body))
    return mutate_bytes(rng, dumps(mutate_value(rng, body)))


def odd_anthropic_stream(rng: random.Random) -> bytes:
    source = rng.choice([anthropic_text_stream(), anthropic_tool_stream()])
    events = [event for event in source.split(b"\n\n") if event]
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(events)) if events else 0
        roll = rng.randrange(8)
        if not events or roll == 0:
            events.insert(at, rng.choice(EXTRA_EVENTS))
        elif roll in (1, 2, 3):
            head, _, data = events[at].rpartition(b"data: ")
            with contextlib.suppress(orjson.JSONDecodeError):
                events[at] = head + b"data: " + dumps(mutate_value(rng, orjson.loads(data)))
        elif roll == 4:
            events[at] = events[at].rpartition(b"data: ")[0] + b"data: " + rng.choice(ODD_DOCUMENTS)
        elif roll == 5:
            del events[at]
        elif roll == 6:
            events.insert(at, events[at])
        else:
            events[at] = mutate_bytes(rng, events[at])
    stream = b"".join(event + b"\n\n" for event in events)
    if rng.random() < 0.15:
        stream = stream[: rng.randint(0, len(stream))]
    return stream


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_json_answers_always_give_a_responses_object_or_an_openai_error(seed: int) -> None:
    rng = random.Random(f"responses-json-{seed}")
    outcomes = {"translated": 0, "untranslatable": 0, "error": 0}
    for case in range(CASES_PER_SEED):
        body = odd_anthropic_json(rng)
        status = rng.choice([200, 200, 200, 400, 429, 500, 529])
        context = f"case {case}: {status} {body[:300]!r}"
        translator = response_translator(status, rng.random() < 0.3 and status >= 400)
        try:
            out = through(translator, chunked(rng, body))
        except Exception as exc:
            pytest.fail(f"ResponseTranslator raised {type(exc).__name__}: {exc} for {context}")
        parsed = orjson.loads(out)
        if "error" in parsed and parsed.get("object") != "response":
            assert set(parsed["error"]) == {"message", "type", "param", "code"}, context
            outcomes["untranslatable" if translator.failed else "error"] += 1
        else:
            assert 200 <= status < 300, context
            Response.model_validate(parsed)
            outcomes["translated"] += 1
    assert min(outcomes.values()) > CASES_PER_SEED // 20, outcomes


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_streams_always_give_well_formed_events_and_one_end(seed: int) -> None:
    rng = random.Random(f"responses-sse-{seed}")
    ends = {"clean": 0, "untranslatable": 0, "other error": 0}
    for case in range(CASES_PER_SEED):
        stream = odd_anthropic_stream(rng)
        chunks = chunked(rng, stream)
        context = f"case {case}: {stream[:2000]!r}"
        try:
            expected = through(r2a.StreamTranslator(requested_model="m"), chunks)
        except Exception as exc:
            pytest.fail(f"StreamTranslator raised {type(exc).__name__}: {exc} for {context}")
        translator = response_translator(200, True)
        try:
            out = through(translator, chunks)
        except Exception as exc:
            pytest.fail(f"ResponseTranslator raised {type(exc).__name__}: {exc} for {context}")
        assert out == expected, context  # the last-resort handler was not needed
        try:
            payloads = check_responses_stream(out)
        except Exception as exc:
            pytest.fail(f"bad stream {out[-800:]!r} for {context}: {exc!r}")
        # The SDK's own accumulator: a final response, or an APIError at the error event; never another crash
        # (response.incomplete has no final response in the SDK, as with OpenAI itself).
        _, raised = _sdk_final(out)
        if payloads[-1]["type"] == "response.incomplete":
            assert isinstance(raised, RuntimeError) and "response.completed" in str(raised), context
        elif payloads[-1]["type"] == "error":
            assert isinstance(raised, openai.APIError), (context, raised)
        else:
            assert raised is None, (context, raised)
        if translator.failed:
            ends["untranslatable"] += 1
        elif payloads[-1]["type"] in ("response.completed", "response.incomplete"):
            ends["clean"] += 1
        else:
            ends["other error"] += 1
    assert min(ends.values()) > CASES_PER_SEED // 20, ends


# ---------------------------------------------------------------------------------------------------
# the whole path: an unmodified SDK client, answered by the mock Anthropic provider through translation


@pytest.fixture(scope="module")
def anthropic_url() -> Iterator[str]:
    from tests.test_mock_provider import _MockServer

    server = _MockServer(mock.MockConfig(name="claude")).start()
    yield server.url
    server.stop()


def responses_client_served_by_anthropic(url: str, seen: list[dict[str, Any]]) -> openai.OpenAI:
    def handler(request: httpx2.Request) -> httpx2.Response:
        body = orjson.loads(request.content)
        translated = r2a.request(body, model="claude-3")
        seen.append(translated)
        streaming = bool(translated.get("stream"))
        with httpx.Client(timeout=10) as http, http.stream(
            "POST", f"{url}/v1/messages", json=translated, headers={"anthropic-version": "2023-06-01"}
        ) as answer:
            translator = ResponseTranslator(r2a.CALLER_FORMAT, answer.status_code, streaming,
                                            requested_model=body["model"], echo=r2a.echo(body))
            out = b"".join(translator.feed(chunk) for chunk in answer.iter_raw()) + translator.finish()
        content_type = "text/event-stream" if streaming and answer.status_code == 200 else "application/json"
        return httpx2.Response(answer.status_code, headers={"content-type": content_type}, content=out)

    return openai_client(handler)


def test_the_whole_path_text_json_and_stream(anthropic_url: str) -> None:
    seen: list[dict[str, Any]] = []
    with responses_client_served_by_anthropic(anthropic_url, seen) as client:
        answer = client.responses.create(model="fraud_detector", instructions="Be brief.", input="is order 7 fraud")
        assert answer.model == "fraud_detector" and answer.status == "completed"
        assert answer.output_text == "mock reply from claude-3: is order 7 fraud"
        assert answer.instructions == "Be brief."
        with client.responses.stream(model="fraud_detector", input="is order 8 fraud") as stream:
            deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
            final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "mock reply from claude-3: is order 8 fraud"
    assert final.usage is not None and final.usage.output_tokens == len(final.output_text.split())
    assert seen[0]["system"] == "Be brief." and seen[1]["stream"] is True


def test_the_whole_path_function_call_round_trip(anthropic_url: str) -> None:
    tools = [{"type": "function", "name": "get_weather", "description": "Weather",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                             "additionalProperties": False}, "strict": True}]
    seen: list[dict[str, Any]] = []
    with responses_client_served_by_anthropic(anthropic_url, seen) as client:
        with client.responses.stream(model="m", input="use get_weather for Paris", tools=tools) as stream:
            first = stream.get_final_response()
        call = first.output[0]
        assert call.type == "function_call" and call.name == "get_weather"
        assert call.parsed_arguments == {"city": "mock"}  # the SDK parsed the strict tool's arguments
        follow_up = [
            {"role": "user", "content": "use get_weather for Paris"},
            *[item.model_dump(exclude_none=True, exclude={"parsed_arguments"}) for item in first.output],
            {"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"},
        ]
        second = client.responses.create(model="m", input=follow_up, tools=tools)
    assert second.output_text == "mock reply from claude-3: 18C and sunny"
    assert seen[-1]["messages"][-1] == {
        "role": "user", "content": [{"type": "tool_result", "tool_use_id": call.call_id, "content": "18C and sunny"}]}
