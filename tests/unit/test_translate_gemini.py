"""Canonical (Anthropic Messages) ⇄ Gemini API / Vertex AI generateContent translation.

Exact expected dicts for requests and answers (so a wrong mapping fails with a readable diff), and
translated streams checked twice: parsed back with our SSE parser as a valid Anthropic event sequence,
then served to the unmodified `anthropic` SDK through an httpx MockTransport (no socket), whose own
stream accumulator must rebuild the text, tool calls, thinking signatures, stop reason and usage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest
from anthropic.types import MessageParam

from extproc.translate import TranslationError, anthropic_to_openai, openai_to_anthropic
from extproc.translate import gemini as g
from extproc.translate.sse import SseParser
from tests.chunking import CHUNKINGS, split

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
PDF_B64 = "JVBERi0xLjQKJcfsj6IKMSAwIG9iago8PD4+CmVuZG9iagp0cmFpbGVyCjw8Pj4KJSVFT0YK"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"name": "weather", "description": "Weather in a city", "input_schema": WEATHER_SCHEMA}
USER: MessageParam = {"role": "user", "content": "hi"}


def canonical(**fields: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [USER]} | fields


def user_blocks(*blocks: dict[str, Any]) -> dict[str, Any]:
    """Request fields: one user turn holding ``blocks``."""
    return {"messages": [{"role": "user", "content": list(blocks)}]}


def refusal_message(fields: dict[str, Any]) -> str:
    with pytest.raises(TranslationError) as caught:
        g.request(canonical(**fields), model="gemini-2.5-flash")
    return caught.value.message


# ---------------------------------------------------------------------------------------------------
# SDK plumbing: an Anthropic client whose HTTP goes to a handler in this process


Handler = Callable[[httpx2.Request], httpx2.Response]


def anthropic_client(handler: Handler) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="sk-ant-test",
        base_url="http://provider.test",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )


def serve(body: bytes, *, status: int = 200, sse: bool = False) -> Handler:
    content_type = "text/event-stream" if sse else "application/json"

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, headers={"content-type": content_type}, content=body)

    return handler


def final_message(stream_bytes: bytes) -> anthropic.types.Message:
    client = anthropic_client(serve(stream_bytes, sse=True))
    with client.messages.stream(model="fallback", max_tokens=50, messages=[USER]) as stream:
        return stream.get_final_message()


# ---------------------------------------------------------------------------------------------------
# request


def test_text_request_becomes_generate_content_request() -> None:
    body = canonical(
        system="You are terse.",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=300,
        temperature=0.3,
        top_p=0.9,
        top_k=40,
        stop_sequences=["END", "STOP"],
        stream=True,
        metadata={"user_id": "user-42"},
        service_tier="auto",
        cache_control={"type": "ephemeral"},
    )
    assert g.request(body, model="gemini-2.5-flash") == {
        "contents": [{"role": "user", "parts": [{"text": "Hello"}]}],
        "systemInstruction": {"parts": [{"text": "You are terse."}]},
        "generationConfig": {
            "maxOutputTokens": 300,
            "temperature": 0.3,
            "topP": 0.9,
            "topK": 40,
            "stopSequences": ["END", "STOP"],
        },
    }


def test_system_blocks_become_system_instruction_parts() -> None:
    system = [{"type": "text", "text": "Be terse."}, {"type": "text", "text": "Cite.", "cache_control": {}}]
    out = g.request(canonical(system=system), model="m")
    assert out["systemInstruction"] == {"parts": [{"text": "Be terse."}, {"text": "Cite."}]}
    assert "systemInstruction" not in g.request(canonical(system=""), model="m")


def test_tools_become_function_declarations_with_json_schema() -> None:
    tools = [WEATHER_TOOL, {"name": "time", "input_schema": {"type": "object"}, "cache_control": {}}]
    out = g.request(canonical(tools=tools), model="m")
    assert out["tools"] == [
        {
            "functionDeclarations": [
                {"name": "weather", "description": "Weather in a city", "parametersJsonSchema": WEATHER_SCHEMA},
                {"name": "time", "parametersJsonSchema": {"type": "object"}},
            ]
        }
    ]
    assert "toolConfig" not in out


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"mode": "AUTO"}),
        ({"type": "any"}, {"mode": "ANY"}),
        ({"type": "tool", "name": "weather"}, {"mode": "ANY", "allowedFunctionNames": ["weather"]}),
        ({"type": "none"}, {"mode": "NONE"}),
        ({"type": "auto", "disable_parallel_tool_use": False}, {"mode": "AUTO"}),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    out = g.request(canonical(tools=[WEATHER_TOOL], tool_choice=choice), model="m")
    assert out["toolConfig"] == {"functionCallingConfig": expected}


def test_tool_choice_without_tools_is_left_out() -> None:
    assert "toolConfig" not in g.request(canonical(tool_choice={"type": "auto"}), model="m")


def test_tool_use_and_tool_result_round_trip_with_the_function_name() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris and the time?"},
        {
            "role": "assistant",
            "content": [
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
                    "content": [{"type": "text", "text": "clock"}, {"type": "text", "text": "broken"}],
                    "is_error": True,
                },
                {"type": "text", "text": "Thanks."},
            ],
        },
    ]
    out = g.request(canonical(messages=messages), model="m")
    assert out["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Paris and the time?"}]},
        {
            "role": "model",
            "parts": [
                {"text": "Checking."},
                {"functionCall": {"id": "toolu_1", "name": "weather", "args": {"city": "Paris"}}},
                {"functionCall": {"id": "toolu_2", "name": "time", "args": {}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"id": "toolu_1", "name": "weather", "response": {"output": "18C"}}},
                {"functionResponse": {"id": "toolu_2", "name": "time", "response": {"error": ["clock", "broken"]}}},
                {"text": "Thanks."},
            ],
        },
    ]


def test_vertex_requests_leave_tool_call_ids_out() -> None:
    messages = [
        USER,
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"}]},
    ]
    body = canonical(messages=messages)
    contents = g.request(body, model="gemini-2.5-pro", vertex=True)["contents"]
    assert contents[1:] == [
        {"role": "model", "parts": [{"functionCall": {"name": "weather", "args": {}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "weather", "response": {"output": "18C"}}}]},
    ]
    assert body["messages"][1]["content"][0]["id"] == "toolu_1"  # the caller's body is left as it was


def test_images_and_pdfs_become_inline_data() -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
        {
            "type": "document",
            "title": "a.pdf",
            "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
        },
    ]
    out = g.request(canonical(messages=[{"role": "user", "content": content}]), model="m")
    assert out["contents"][0]["parts"] == [
        {"text": "What is this?"},
        {"inlineData": {"mimeType": "image/png", "data": PNG_B64}},
        {"inlineData": {"mimeType": "application/pdf", "data": PDF_B64}},
    ]


def test_consecutive_turns_of_one_role_are_merged() -> None:
    messages = [
        {"role": "user", "content": "one"},
        {"role": "user", "content": [{"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "three"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "five"},
    ]
    assert g.request(canonical(messages=messages), model="m")["contents"] == [
        {"role": "user", "parts": [{"text": "one"}, {"text": "two"}]},
        {"role": "model", "parts": [{"text": "three"}, {"text": "four"}]},
        {"role": "user", "parts": [{"text": "five"}]},
    ]


@pytest.mark.parametrize(
    ("thinking", "expected"),
    [
        ({"type": "enabled", "budget_tokens": 2048}, {"includeThoughts": True, "thinkingBudget": 2048}),
        (
            {"type": "enabled", "budget_tokens": 1024, "display": "omitted"},
            {"includeThoughts": False, "thinkingBudget": 1024},
        ),
        ({"type": "adaptive"}, {"includeThoughts": True}),
        ({"type": "disabled"}, None),
    ],
)
def test_thinking(thinking: dict[str, Any], expected: dict[str, Any] | None) -> None:
    config = g.request(canonical(thinking=thinking), model="m")["generationConfig"]
    assert config.get("thinkingConfig") == expected


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (
            user_blocks({"type": "image", "source": {"type": "url", "url": "https://x/c.png"}}),
            "'messages.0.content.0' image source 'url' cannot be translated to Gemini (only base64)",
        ),
        (
            user_blocks({"type": "image", "source": {"type": "file", "file_id": "file_1"}}),
            "image source 'file' cannot be translated",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
                        ],
                    }
                ]
            },
            "document source 'text' cannot be translated",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "document",
                                "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
                                "citations": {"enabled": True},
                            }
                        ],
                    }
                ]
            },
            "document context and citations cannot be translated",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x"}]}]},
            "'messages.0.content.0.tool_use_id' 'toolu_x' names no earlier tool_use",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}],
                    },
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t1",
                                "content": [{"type": "image", "source": {"type": "base64"}}],
                            }
                        ],
                    },
                ]
            },
            "block type 'image' cannot be sent to Gemini in a tool result",
        ),
        ({"messages": [USER, {"role": "assistant", "content": "The answer is"}]}, "prefill"),
        ({"messages": [{"role": "system", "content": "x"}]}, "'messages.0.role' 'system' cannot be translated"),
        ({"messages": [{"role": "user", "content": ""}]}, "'messages.0' has no content"),
        ({"messages": []}, "'messages' must be a non-empty array"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "'messages.0.content.0.text' must be a string",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "search_result"}]}]},
            "block type 'search_result' cannot be translated",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
        ({"tools": [WEATHER_TOOL | {"strict": True}]}, "'tools.0.strict' cannot be translated"),
        (
            {"tools": [WEATHER_TOOL], "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}},
            "'tool_choice.disable_parallel_tool_use' cannot be translated",
        ),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "sometimes"}}, "'tool_choice' type 'sometimes'"),
        ({"stop_sequences": ["a", "b", "c", "d", "e", "f"]}, "at most 5 stop sequences"),
        ({"thinking": {"type": "between_tools"}}, "'thinking' type 'between_tools' cannot be translated"),
        ({"thinking": {"type": "enabled"}}, "'thinking.budget_tokens' must be an integer"),
        ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "'mcp_servers' cannot be translated"),
        ({"container": "c_1"}, "'container' cannot be translated"),
        ({"context_management": {"edits": []}}, "'context_management' cannot be translated"),
        ({"output_config": {"effort": "low"}}, "'output_config' cannot be translated"),
        ({"inference_geo": "us"}, "'inference_geo' cannot be translated"),
        ({"temperature": "hot"}, "'temperature' must be a number"),
        ({"top_k": 0}, "'top_k' must be a positive integer"),
        ({"max_tokens": 0}, "'max_tokens' must be an integer"),
    ],
)
def test_what_gemini_cannot_express_is_refused_by_name(fields: dict[str, Any], match: str) -> None:
    assert match in refusal_message(fields)


def test_a_non_object_body_is_refused() -> None:
    with pytest.raises(TranslationError, match="must be a JSON object"):
        g.request([], model="m")  # type: ignore[arg-type]


def test_claude_thinking_in_history_is_dropped() -> None:
    messages = [
        USER,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "EqQBCkgIARABGAIiQ"},
                {"type": "redacted_thinking", "data": "EmwKAhgBEgy"},
                {"type": "text", "text": "Hi."},
            ],
        },
        {"role": "user", "content": "more"},
    ]
    contents = g.request(canonical(messages=messages), model="m")["contents"]
    assert contents[1] == {"role": "model", "parts": [{"text": "Hi."}]}


# ---------------------------------------------------------------------------------------------------
# response


def gemini_answer(parts: list[dict[str, Any]], finish: str = "STOP", **fields: Any) -> dict[str, Any]:
    return {
        "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15},
        "modelVersion": "gemini-2.5-flash",
        "responseId": "abc123",
    } | fields


def test_answer_with_text_and_function_calls() -> None:
    body = gemini_answer(
        [
            {"text": "Let me "},
            {"text": "check."},
            {"functionCall": {"name": "weather", "args": {"city": "Paris"}}},
            {"functionCall": {"id": "call-9", "name": "time"}},
        ],
        usageMetadata={
            "promptTokenCount": 100,
            "cachedContentTokenCount": 30,
            "candidatesTokenCount": 20,
            "thoughtsTokenCount": 7,
            "totalTokenCount": 127,
        },
    )
    assert g.response(body, requested_model="claude-sonnet-4-5") == {
        "id": "msg_abc123",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_abc123_0", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call-9", "name": "time", "input": {}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 70,
            "output_tokens": 27,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 30,
        },
    }


@pytest.mark.parametrize(
    ("finish", "stop"),
    [
        ("STOP", "end_turn"),
        ("MAX_TOKENS", "max_tokens"),
        ("SAFETY", "refusal"),
        ("RECITATION", "refusal"),
        ("BLOCKLIST", "refusal"),
        ("PROHIBITED_CONTENT", "refusal"),
        ("SPII", "refusal"),
        ("IMAGE_SAFETY", "refusal"),
        ("MALFORMED_FUNCTION_CALL", "end_turn"),
        ("OTHER", "end_turn"),
        (None, "end_turn"),
    ],
)
def test_finish_reason_to_stop_reason(finish: str | None, stop: str) -> None:
    body = gemini_answer([{"text": "x"}])
    body["candidates"][0]["finishReason"] = finish
    assert g.response(body, requested_model="m")["stop_reason"] == stop


def test_a_safety_stop_without_content_is_an_empty_refusal() -> None:
    body = gemini_answer([])
    body["candidates"][0] = {"finishReason": "SAFETY", "index": 0}
    answer = g.response(body, requested_model="m")
    assert (answer["content"], answer["stop_reason"]) == ([], "refusal")


def test_blocked_prompt_is_an_empty_refusal() -> None:
    body = {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
        "responseId": "blk",
    }
    answer = g.response(body, requested_model="m")
    assert answer["content"] == []
    assert answer["stop_reason"] == "refusal"
    assert answer["usage"]["input_tokens"] == 8
    assert answer["id"] == "msg_blk"


def test_ids_without_response_id_are_generated_in_anthropic_alphabet() -> None:
    body = gemini_answer([{"functionCall": {"name": "f", "args": {}}}])
    del body["responseId"]
    answer = g.response(body, requested_model="m")
    assert answer["id"].startswith("msg_") and len(answer["id"]) > 10
    assert answer["content"][0]["id"] == "toolu_" + answer["id"].removeprefix("msg_") + "_0"
    odd = g.response(gemini_answer([{"text": "x"}], responseId="a/b+c="), requested_model="m")
    assert odd["id"] == "msg_a_b_c_"


def test_thoughts_and_signatures_become_thinking_blocks_and_go_back_as_they_came() -> None:
    parts: list[dict[str, Any]] = [
        {"text": "Weighing ", "thought": True},
        {"text": "options.", "thought": True, "thoughtSignature": "c2lnLTE="},
        {"text": "Calling.", "thoughtSignature": "dGV4dA=="},
        {"functionCall": {"name": "weather", "args": {"city": "Oslo"}}, "thoughtSignature": "c2lnLTI="},
    ]
    answer = g.response(gemini_answer(parts), requested_model="m")
    assert answer["content"] == [
        {"type": "thinking", "thinking": "Weighing options.", "signature": "gemini:c2lnLTE="},
        {"type": "text", "text": "Calling."},  # a text part's signature is optional to Gemini: dropped
        {"type": "thinking", "thinking": "", "signature": "gemini:c2lnLTI="},
        {"type": "tool_use", "id": "toolu_abc123_0", "name": "weather", "input": {"city": "Oslo"}},
    ]
    history = [USER, {"role": "assistant", "content": answer["content"]}, {"role": "user", "content": "go"}]
    contents = g.request(canonical(messages=history), model="m")["contents"]
    assert contents[1]["parts"] == [
        {"text": "Weighing options.", "thought": True, "thoughtSignature": "c2lnLTE="},
        {"text": "Calling."},
        {
            "functionCall": {"id": "toolu_abc123_0", "name": "weather", "args": {"city": "Oslo"}},
            "thoughtSignature": "c2lnLTI=",
        },
    ]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ([], "not a JSON object"),
        ({"candidates": "x"}, "'candidates' is not an array"),
        ({"candidates": [5]}, "'candidates.0' is not an object"),
        ({}, "no candidates and no block reason"),
        ({"candidates": [{"content": []}]}, "'candidates.0.content' is not an object"),
        ({"candidates": [{"content": {"parts": {}}}]}, "'candidates.0.content.parts' is not an array"),
        ({"candidates": [{"content": {"parts": [{"text": 5}]}}]}, "'candidates.0.content.parts.0.text'"),
        (
            {"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": "x"}}]}}]},
            "is a part of kind 'inlineData'",
        ),
        (
            {"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": [1]}}]}}]},
            "'candidates.0.content.parts.0.functionCall.args' is not an object",
        ),
        ({"candidates": [{"content": {"parts": [{"functionCall": {"args": {}}}]}}]}, "has no string name"),
    ],
)
def test_answers_of_the_wrong_shape_raise(body: Any, match: str) -> None:
    with pytest.raises(TranslationError, match=match):
        g.response(body, requested_model="m")


def test_anthropic_sdk_parses_translated_answer() -> None:
    body = gemini_answer(
        [{"text": "Sure."}, {"functionCall": {"id": "c1", "name": "weather", "args": {"city": "Rome"}}}],
        usageMetadata={"promptTokenCount": 50, "cachedContentTokenCount": 20, "candidatesTokenCount": 9},
    )
    client = anthropic_client(serve(orjson.dumps(g.response(body, requested_model="fallback"))))
    message = client.messages.create(model="fallback", max_tokens=5, messages=[USER])
    assert message.model == "fallback"
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[1].type == "tool_use" and message.content[1].input == {"city": "Rome"}
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (
        30,
        20,
        9,
    )


# ---------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("status", "google_status", "anthropic_type", "sdk_error"),
    [
        (400, "INVALID_ARGUMENT", "invalid_request_error", anthropic.BadRequestError),
        (401, "UNAUTHENTICATED", "authentication_error", anthropic.AuthenticationError),
        (403, "PERMISSION_DENIED", "permission_error", anthropic.PermissionDeniedError),
        (404, "NOT_FOUND", "not_found_error", anthropic.NotFoundError),
        (429, "RESOURCE_EXHAUSTED", "rate_limit_error", anthropic.RateLimitError),
        (500, "INTERNAL", "api_error", anthropic.InternalServerError),
        (503, "UNAVAILABLE", "overloaded_error", anthropic.InternalServerError),
        (502, "UNKNOWN", "api_error", anthropic.InternalServerError),
        (409, "ABORTED", "invalid_request_error", anthropic.ConflictError),
    ],
)
def test_google_errors_reach_the_anthropic_sdk_as_its_own(
    status: int, google_status: str, anthropic_type: str, sdk_error: type[anthropic.APIStatusError]
) -> None:
    google = {"error": {"code": status, "message": "Something specific.", "status": google_status}}
    for body in (google, [google]):  # the Gemini API sends the object; some endpoints a one-element list
        translated = g.error(status, orjson.dumps(body))
        assert orjson.loads(translated) == {
            "type": "error",
            "error": {"type": anthropic_type, "message": "Something specific."},
        }
    client = anthropic_client(serve(g.error(status, orjson.dumps(google)), status=status))
    with pytest.raises(sdk_error) as caught:
        client.messages.create(model="m", max_tokens=5, messages=[USER])
    assert caught.value.body == {"type": "error", "error": {"type": anthropic_type, "message": "Something specific."}}


@pytest.mark.parametrize("body", [b"<html>Bad Gateway</html>", b"", b"[]", b'{"error": "x"}', b'{"error": {}}'])
def test_unreadable_error_bodies_still_translate(body: bytes) -> None:
    assert orjson.loads(g.error(502, body)) == {
        "type": "error",
        "error": {"type": "api_error", "message": "Upstream provider error (HTTP 502)"},
    }
    assert orjson.loads(g.error(400, body))["error"]["type"] == "invalid_request_error"


def test_untranslatable_replacements_are_anthropic_errors() -> None:
    assert orjson.loads(g.untranslatable_body()) == {
        "type": "error",
        "error": {"type": "api_error", "message": g._UNTRANSLATABLE_MESSAGE},
    }
    assert g.untranslatable_event() == b"event: error\ndata: " + g.untranslatable_body() + b"\n\n"


# ---------------------------------------------------------------------------------------------------
# streaming


def chunk(parts: list[dict[str, Any]] | None = None, *, finish: str | None = None, **fields: Any) -> bytes:
    """One Gemini SSE event, as Google frames it (CRLF line ends)."""
    candidate: dict[str, Any] = {"index": 0}
    if parts is not None:
        candidate["content"] = {"role": "model", "parts": parts}
    if finish is not None:
        candidate["finishReason"] = finish
    payload = {"candidates": [candidate], "modelVersion": "gemini-2.5-flash", "responseId": "r-1"} | fields
    return b"data: " + orjson.dumps(payload) + b"\r\n\r\n"


FINAL_USAGE = {
    "promptTokenCount": 120,
    "cachedContentTokenCount": 64,
    "candidatesTokenCount": 15,
    "thoughtsTokenCount": 10,
    "totalTokenCount": 145,
}


def gemini_stream_events() -> list[bytes]:
    """Text in pieces, then a function call; the final usage on the last chunk, with the finish reason."""
    early = {"promptTokenCount": 120, "cachedContentTokenCount": 64, "totalTokenCount": 120}
    return [
        chunk([{"text": "Let me "}], usageMetadata=early),
        chunk([{"text": "chéck 🎉."}], usageMetadata=early),
        chunk(
            [{"functionCall": {"name": "weather", "args": {"city": "Paris", "unit": None}}}],
            finish="STOP",
            usageMetadata=FINAL_USAGE,
        ),
    ]


def gemini_stream() -> bytes:
    return b"".join(gemini_stream_events())


def run(source: list[bytes]) -> tuple[bytes, g.StreamTranslator]:
    translator = g.StreamTranslator(requested_model="fallback")
    return b"".join(translator.feed(piece) for piece in source) + translator.finish(), translator


def events_of(stream: bytes) -> list[tuple[str | None, Any]]:
    return [(event.event, orjson.loads(event.data or b"")) for event in SseParser().feed(stream)]


def test_stream_becomes_a_valid_anthropic_stream() -> None:
    out, translator = run([gemini_stream()])
    events = events_of(out)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(name == data["type"] for name, data in events)  # the name repeats the type, as Anthropic's
    assert translator.failure is None and translator.complete
    start = events[0][1]["message"]
    assert (start["id"], start["model"], start["usage"]["input_tokens"]) == ("msg_r-1", "fallback", 56)
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "toolu_r-1_0", "name": "weather", "input": {}}
    assert events[6][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"city":"Paris","unit":null}'}
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {
            "input_tokens": 56,
            "output_tokens": 25,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 64,
        },
    }


def test_anthropic_sdk_accumulates_the_translated_stream() -> None:
    out, _ = run([gemini_stream()])
    message = final_message(out)
    assert message.id == "msg_r-1" and message.model == "fallback"
    assert message.content[0].type == "text" and message.content[0].text == "Let me chéck 🎉."
    assert message.content[1].type == "tool_use"
    assert (message.content[1].id, message.content[1].name, message.content[1].input) == (
        "toolu_r-1_0",
        "weather",
        {"city": "Paris", "unit": None},
    )
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (
        56,
        64,
        25,
    )


def test_stream_translation_does_not_depend_on_chunking() -> None:
    source = gemini_stream()
    whole, _ = run([source])
    for cut in range(1, len(source)):
        assert run([source[:cut], source[cut:]])[0] == whole, cut
    for how in CHUNKINGS:
        assert run(split(source, how))[0] == whole, how
        assert run(split(source.replace(b"\r\n", b"\n"), how))[0] == whole, how


def test_stream_and_answer_agree() -> None:
    """The same parts streamed or answered at once give the same message."""
    parts: list[dict[str, Any]] = [
        {"text": "Pondering", "thought": True},
        {"text": "…", "thought": True, "thoughtSignature": "c2ln"},
        {"text": "Hello "},
        {"text": "there."},
        {"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": "Zm4="},
    ]
    body = gemini_answer(parts, responseId="r-1", usageMetadata=FINAL_USAGE)
    answer = g.response(body, requested_model="fallback")
    source = [chunk([part]) for part in parts[:-1]]
    source.append(chunk(parts[-1:], finish="STOP", usageMetadata=FINAL_USAGE))
    message = final_message(run(source)[0])
    assert [block.model_dump(exclude_none=True) for block in message.content] == answer["content"]
    assert (message.id, message.stop_reason, message.stop_sequence) == (answer["id"], "tool_use", None)
    assert {key: getattr(message.usage, key) for key in answer["usage"]} == answer["usage"]
    assert answer["content"][0] == {"type": "thinking", "thinking": "Pondering…", "signature": "gemini:c2ln"}


def test_thinking_streams_as_a_thinking_block_with_its_signature() -> None:
    source = [
        chunk([{"text": "Step one. ", "thought": True}]),
        chunk([{"text": "Step two.", "thought": True}]),
        chunk([{"text": "", "thought": True, "thoughtSignature": "c2ln"}]),
        chunk([{"text": "Done."}], finish="STOP", usageMetadata=FINAL_USAGE),
    ]
    out, _ = run(source)
    deltas = [data["delta"] for name, data in events_of(out) if name == "content_block_delta"]
    assert deltas == [
        {"type": "thinking_delta", "thinking": "Step one. "},
        {"type": "thinking_delta", "thinking": "Step two."},
        {"type": "signature_delta", "signature": "gemini:c2ln"},
        {"type": "text_delta", "text": "Done."},
    ]
    message = final_message(out)
    assert message.content[0].type == "thinking"
    assert (message.content[0].thinking, message.content[0].signature) == ("Step one. Step two.", "gemini:c2ln")
    assert message.content[1].type == "text" and message.content[1].text == "Done."
    assert message.stop_reason == "end_turn"


def test_blocked_prompt_streams_as_an_empty_refusal() -> None:
    blocked = {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": {"promptTokenCount": 9}}
    out, _ = run([b"data: " + orjson.dumps(blocked) + b"\r\n\r\n"])
    message = final_message(out)
    assert (message.content, message.stop_reason, message.usage.input_tokens) == ([], "refusal", 9)


def test_max_tokens_stream_stops_with_max_tokens() -> None:
    out, _ = run([chunk([{"text": "Once upon"}], finish="MAX_TOKENS", usageMetadata=FINAL_USAGE)])
    message = final_message(out)
    assert message.stop_reason == "max_tokens"
    assert message.content[0].type == "text" and message.content[0].text == "Once upon"


CUT_ERROR = ("error", {"type": "error", "error": {"type": "api_error", "message": g._CUT_MESSAGE}})


def test_cut_stream_ends_with_an_error_event_never_silently() -> None:
    events = gemini_stream_events()
    for cut in range(len(events)):  # every prefix without the finishing chunk, and half an event after it
        for tail in (b"", events[cut][: len(events[cut]) // 2]):
            out, translator = run([*events[:cut], tail])
            parsed = events_of(out)
            assert "message_stop" not in [name for name, _ in parsed]
            assert parsed[-1] == CUT_ERROR
            assert translator.failure is None
            client = anthropic_client(serve(out, sse=True))
            with (
                pytest.raises(anthropic.APIStatusError) as caught,
                client.messages.stream(model="m", max_tokens=5, messages=[USER]) as stream,
            ):
                stream.get_final_message()
            assert caught.value.body == CUT_ERROR[1]


def test_error_chunk_mid_stream_becomes_an_error_event() -> None:
    events = gemini_stream_events()
    error = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}
    out, translator = run([events[0], b"data: " + orjson.dumps(error) + b"\r\n\r\n", *events[1:]])
    parsed = events_of(out)
    assert [name for name, _ in parsed] == ["message_start", "content_block_start", "content_block_delta", "error"]
    overloaded = {"type": "overloaded_error", "message": "The model is overloaded."}
    assert parsed[-1][1] == {"type": "error", "error": overloaded}
    assert translator.failure is None  # Gemini's own error, not a failure to translate
    assert translator.finish() == b""
    with pytest.raises(anthropic.APIStatusError):
        final_message(out)


@pytest.mark.parametrize(
    ("bad", "failure"),
    [
        (b"data: not json\r\n\r\n", "a chunk is not JSON"),
        (b"data: [1]\r\n\r\n", "a chunk is not a JSON object"),
        (chunk([{"executableCode": {"language": "PYTHON", "code": "1"}}]), "is a part of kind 'executableCode'"),
        (chunk([{"functionCall": {"name": "f", "args": "x"}}]), "'candidates.0.content.parts.0.functionCall.args'"),
    ],
)
def test_untranslatable_chunk_ends_the_stream(bad: bytes, failure: str) -> None:
    events = gemini_stream_events()
    out, translator = run([events[0], bad, *events[1:]])
    assert translator.failure is not None and failure in translator.failure
    assert out.endswith(g.untranslatable_event())
    names = [name for name, _ in events_of(out)]
    assert names == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert translator.feed(events[1]) == b"" and translator.finish() == b""


def test_usage_after_the_finish_reason_still_counts() -> None:
    usage_only = b"data: " + orjson.dumps({"usageMetadata": FINAL_USAGE}) + b"\n\n"
    source = [chunk([{"text": "Hi"}], finish="STOP"), usage_only]
    out, _ = run(source)
    assert events_of(out)[-2][1]["usage"]["output_tokens"] == 25


# ---------------------------------------------------------------------------------------------------
# reading a Gemini request back (a fallback hop after Gemini)


def read_back(body: dict[str, Any], *, vertex: bool = False, stream: bool = False) -> dict[str, Any]:
    """``body`` (canonical) sent to Gemini, then read back as the next hop would."""
    sent = g.request(body, model="gemini-2.5-pro", vertex=vertex)
    sent = orjson.loads(orjson.dumps(sent))  # as Envoy re-sends it: JSON, nothing shared with ``body``
    return g.canonical_request(sent, model=body["model"], stream=stream, default_max_tokens=4096)


def read(body: dict[str, Any], **options: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"model": "m", "stream": False, "default_max_tokens": 4096} | options
    return g.canonical_request(body, **settings)


SIGNED_HISTORY: list[MessageParam] = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Weighing options.", "signature": "gemini:c2lnLTE="},
            {"type": "text", "text": "Calling."},
            {"type": "thinking", "thinking": "", "signature": "gemini:c2lnLTI="},
            {"type": "tool_use", "id": "toolu_abc_0", "name": "weather", "input": {"city": "Oslo"}},
        ],
    },
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_abc_0", "content": "-3C"}]},
    {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "", "signature": "gemini:dGV4dA=="},
            {"type": "text", "text": "Cold."},
        ],
    },
    {"role": "user", "content": "Thanks."},
]
TOOL_HISTORY: list[MessageParam] = [
    {"role": "user", "content": "Weather in Paris and the time?"},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris", "unit": None}},
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
                "content": [{"type": "text", "text": "clock"}, {"type": "text", "text": "broken"}],
                "is_error": True,
            },
            {"type": "text", "text": "And tomorrow?"},
        ],
    },
    {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_3", "name": "weather", "input": {"city": "Paris"}}],
    },
    {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_3", "content": "no forecast", "is_error": True}],
    },
]
TIME_TOOL = {"name": "time", "input_schema": {"type": "object", "properties": {}}}

ROUND_TRIPS: dict[str, dict[str, Any]] = {
    "text": canonical(messages=[{"role": "user", "content": "Hello"}]),
    "system string": canonical(system="You are terse."),
    "system blocks": canonical(system=[{"type": "text", "text": "Be terse."}, {"type": "text", "text": "Cite."}]),
    "image and pdf": canonical(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What are these?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                    {
                        "type": "document",
                        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
                    },
                ],
            }
        ]
    ),
    "tools": canonical(tools=[WEATHER_TOOL, TIME_TOOL]),
    "tool choice auto": canonical(tools=[WEATHER_TOOL], tool_choice={"type": "auto"}),
    "tool choice any": canonical(tools=[WEATHER_TOOL], tool_choice={"type": "any"}),
    "tool choice tool": canonical(tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "weather"}),
    "tool choice none": canonical(tools=[WEATHER_TOOL], tool_choice={"type": "none"}),
    "tool use, results and errors": canonical(messages=TOOL_HISTORY, tools=[WEATHER_TOOL, TIME_TOOL]),
    "thinking with signatures": canonical(
        messages=SIGNED_HISTORY, tools=[WEATHER_TOOL], thinking={"type": "enabled", "budget_tokens": 2048}
    ),
    "thinking omitted": canonical(thinking={"type": "enabled", "budget_tokens": 1024, "display": "omitted"}),
    "adaptive thinking": canonical(thinking={"type": "adaptive"}),
    "adaptive thinking omitted": canonical(thinking={"type": "adaptive", "display": "omitted"}),
    "stop sequences": canonical(stop_sequences=["END", "STOP", "\n\nHuman:"]),
    "sampling": canonical(max_tokens=321, temperature=0.25, top_p=0.9, top_k=40),
    "multi-turn text": canonical(
        system="Be brief.",
        messages=[
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": [{"type": "text", "text": "three"}, {"type": "text", "text": "four"}]},
        ],
    ),
}


@pytest.mark.parametrize("body", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_a_gemini_request_reads_back_as_the_canonical_request_it_came_from(body: dict[str, Any]) -> None:
    assert read_back(body) == body
    again = g.request(read_back(body), model="gemini-2.5-pro")
    assert again == g.request(body, model="gemini-2.5-pro")  # and goes to Gemini again the same


def test_stream_flag_and_default_max_tokens() -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    assert read(body, model="gpt-4o", default_max_tokens=777) == {
        "model": "gpt-4o",
        "max_tokens": 777,
        "messages": [{"role": "user", "content": "hi"}],
    }
    streamed = read(body | {"generationConfig": {"maxOutputTokens": 50}}, stream=True)
    assert (streamed["stream"], streamed["max_tokens"]) == (True, 50)
    assert read_back(canonical(stream=True), stream=True) == canonical(stream=True)
    assert "stream" not in read_back(canonical(stream=True))  # the call's flag, not the body's, decides


def test_what_request_drops_or_reshapes_reads_back_as_its_equivalent() -> None:
    body = canonical(
        system=[{"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "one", "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": "two"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Claude's", "signature": "EqQBCkgIARAB"},
                    {"type": "redacted_thinking", "data": "EmwKAhgBEgy"},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Rome"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "time"},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Here:"},
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "20C"}]},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": False},
                    {
                        "type": "document",
                        "title": "a.pdf",
                        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
                    },
                ],
            },
        ],
        metadata={"user_id": "u-1"},
        service_tier="auto",
        thinking={"type": "enabled", "budget_tokens": 2048, "display": "summarized"},
        tool_choice={"type": "auto"},  # without tools
    )
    assert read_back(body) == canonical(
        system="Be terse.",
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Rome"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "20C"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": ""},
                    {"type": "text", "text": "Here:"},
                    {
                        "type": "document",
                        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
                    },
                ],
            },
        ],
        thinking={"type": "enabled", "budget_tokens": 2048},
    )
    assert "thinking" not in read_back(canonical(thinking={"type": "disabled"}))


def test_vertex_calls_get_ids_by_position_and_their_results_the_same_ids() -> None:
    messages: list[MessageParam] = [
        {"role": "user", "content": "Paris, Rome, and the time?"},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "a", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "b", "name": "time", "input": {}},
                {"type": "tool_use", "id": "c", "name": "weather", "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "b", "content": "noon"},
                {"type": "tool_result", "tool_use_id": "a", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "c", "content": "25C", "is_error": True},
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "d", "name": "weather", "input": {"city": "Oslo"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "d", "content": "-3C"}]},
    ]
    body = canonical(messages=messages, tools=[WEATHER_TOOL, TIME_TOOL])
    renamed = {"a": "toolu_gem_1_0", "b": "toolu_gem_1_1", "c": "toolu_gem_1_2", "d": "toolu_gem_3_0"}
    expected = orjson.loads(orjson.dumps(body))
    for message in expected["messages"][1:]:
        for block in message["content"]:
            for key in ("id", "tool_use_id"):
                if key in block:
                    block[key] = renamed[block[key]]
    assert read_back(body, vertex=True) == expected
    assert read_back(body, vertex=True) == read_back(body, vertex=True)  # deterministic


def test_an_openai_request_through_gemini_and_back_is_the_same_openai_request() -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(orjson.loads(request.content))
        return httpx2.Response(400, json={"error": {"message": "recorded", "type": "invalid_request_error"}})

    client = openai.OpenAI(
        api_key="sk-test",
        base_url="http://provider.test/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )
    weather: dict[str, Any] = {
        "type": "function",
        "function": {"name": "weather", "description": "Weather in a city", "parameters": WEATHER_SCHEMA},
    }
    chat: dict[str, Any] = dict(
        model="gpt-4o",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [{"type": "text", "text": "25C,"}, {"type": "text", "text": "sunny"}],
            },
            {"role": "user", "content": [{"type": "text", "text": "Which is warmer?"}]},
            {"role": "assistant", "content": "Rome."},
            {"role": "user", "content": "Thanks."},
        ],
        tools=[weather],
        tool_choice="required",
        max_completion_tokens=200,
        temperature=0.5,
        top_p=0.9,
        stop=["END"],
    )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**chat)
    (original,) = sent
    canonical_body = openai_to_anthropic.request(original, model="claude-sonnet-4-5")
    gemini_body = orjson.loads(orjson.dumps(g.request(canonical_body, model="gemini-2.5-pro")))
    back = g.canonical_request(gemini_body, model="claude-sonnet-4-5", stream=False, default_max_tokens=4096)
    assert orjson.loads(orjson.dumps(g.request(back, model="gemini-2.5-pro"))) == gemini_body
    assert anthropic_to_openai.request(back, model="gpt-4o") == original

    # Through Vertex AI the call ids are gone: the calls and their results still pair up.
    vertex_body = orjson.loads(orjson.dumps(g.request(canonical_body, model="gemini-2.5-pro", vertex=True)))
    again = anthropic_to_openai.request(
        g.canonical_request(vertex_body, model="m", stream=False, default_max_tokens=1), model="gpt-4o"
    )
    ids = [call["id"] for call in again["messages"][2]["tool_calls"]]
    assert ids == ["toolu_gem_1_1", "toolu_gem_1_2"]
    assert [message.get("tool_call_id") for message in again["messages"][3:5]] == ids
    assert again["messages"][3]["content"] == "18C"


def test_gemini_shapes_request_never_writes_are_read_too() -> None:
    body: dict[str, Any] = {
        "contents": [
            {"role": "user", "parts": [{"text": "hi", "thought": None}]},
            {"role": "model", "parts": [{"functionCall": {"name": "f"}}, {"text": "done", "thought": False}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"output": "ok"}}}]},
        ],
        "systemInstruction": {"role": "system", "parts": []},
        "generationConfig": {"thinkingConfig": {"thinkingBudget": -1}, "stopSequences": [], "topK": None},
        "tools": [
            {
                "functionDeclarations": [
                    {
                        "name": "f",
                        "parameters": {
                            "type": "OBJECT",
                            "properties": {
                                "city": {"type": "STRING", "nullable": True},
                                "days": {"type": "ARRAY", "items": {"type": "INTEGER"}},
                                "type": {"anyOf": [{"type": "NUMBER"}, {"type": "BOOLEAN"}]},
                            },
                            "required": ["city"],
                        },
                    },
                    {"name": "g"},
                ]
            }
        ],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["f"]}},
    }
    assert read(body) == {
        "model": "m",
        "max_tokens": 4096,
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "toolu_gem_1_0", "name": "f", "input": {}},
                    {"type": "text", "text": "done"},
                ],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_gem_1_0", "content": "ok"}]},
        ],
        "thinking": {"type": "adaptive", "display": "omitted"},
        "tools": [
            {
                "name": "f",
                "input_schema": {
                    "type": "object",
                    "properties": {
                        "city": {"type": ["string", "null"]},
                        "days": {"type": "array", "items": {"type": "integer"}},
                        "type": {"anyOf": [{"type": "number"}, {"type": "boolean"}]},
                    },
                    "required": ["city"],
                },
            },
            {"name": "g", "input_schema": {"type": "object", "properties": {}}},
        ],
        "tool_choice": {"type": "tool", "name": "f"},
    }
    no_thinking = {"contents": body["contents"][:1], "generationConfig": {"thinkingConfig": {"thinkingBudget": 0}}}
    assert "thinking" not in read(no_thinking)
    choice_without_tools = {"contents": body["contents"][:1], "toolConfig": {"functionCallingConfig": {"mode": "NONE"}}}
    assert "tool_choice" not in read(choice_without_tools)


HI = [{"role": "user", "parts": [{"text": "hi"}]}]


def model_turn(*parts: dict[str, Any]) -> dict[str, Any]:
    """A body whose second content is a model turn of ``parts``."""
    return {"contents": [*HI, {"role": "model", "parts": list(parts)}, *HI]}


def answer(*parts: dict[str, Any], call: dict[str, Any] | None = None) -> dict[str, Any]:
    """A body: a call to ``f`` (id ``c1``, or ``call``), then a user turn of ``parts``."""
    made = {"functionCall": call or {"id": "c1", "name": "f", "args": {}}}
    return {"contents": [*HI, {"role": "model", "parts": [made]}, {"role": "user", "parts": list(parts)}]}


def response_part(**fields: Any) -> dict[str, Any]:
    return {"functionResponse": {"name": "f", "response": {"output": "ok"}} | fields}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "the request body must be a JSON object"),
        ({"contents": HI, "safetySettings": []}, "'safetySettings' cannot be translated from a Gemini request"),
        ({"contents": HI, "cachedContent": "c/1"}, "'cachedContent' cannot be translated"),
        ({"contents": HI, "generationConfig": []}, "'generationConfig' must be an object"),
        ({"contents": HI, "generationConfig": {"candidateCount": 2}}, "'generationConfig.candidateCount' cannot"),
        (
            {"contents": HI, "generationConfig": {"responseMimeType": "application/json"}},
            "'generationConfig.responseMimeType'",
        ),
        (
            {"contents": HI, "generationConfig": {"maxOutputTokens": 0}},
            "'generationConfig.maxOutputTokens' must be an integer",
        ),
        (
            {"contents": HI, "generationConfig": {"temperature": "hot"}},
            "'generationConfig.temperature' must be a number",
        ),
        ({"contents": HI, "generationConfig": {"topP": True}}, "'generationConfig.topP' must be a number"),
        ({"contents": HI, "generationConfig": {"topK": 0}}, "'generationConfig.topK' must be a positive integer"),
        ({"contents": HI, "generationConfig": {"stopSequences": "END"}}, "'generationConfig.stopSequences' must be"),
        (
            {"contents": HI, "generationConfig": {"thinkingConfig": {"thinkingLevel": "low"}}},
            "'generationConfig.thinkingConfig.thinkingLevel' cannot be translated",
        ),
        (
            {"contents": HI, "generationConfig": {"thinkingConfig": {"includeThoughts": "yes"}}},
            "'generationConfig.thinkingConfig.includeThoughts' must be a boolean",
        ),
        (
            {"contents": HI, "generationConfig": {"thinkingConfig": {"thinkingBudget": "lots"}}},
            "'generationConfig.thinkingConfig.thinkingBudget' must be an integer",
        ),
        ({"contents": HI, "systemInstruction": "Be terse."}, "'systemInstruction' must be an object"),
        ({"contents": HI, "systemInstruction": {"parts": {"text": "x"}}}, "'systemInstruction.parts' must be an array"),
        (
            {"contents": HI, "systemInstruction": {"parts": [{"inlineData": {}}]}},
            "'systemInstruction.parts.0' is a part of kind 'inlineData'",
        ),
        ({}, "'contents' must be a non-empty array"),
        ({"contents": []}, "'contents' must be a non-empty array"),
        ({"contents": ["hi"]}, "'contents.0' must be an object"),
        ({"contents": [{"parts": [{"text": "hi"}]}]}, "'contents.0.role' must be a string"),
        ({"contents": [{"role": "function", "parts": [{"text": "hi"}]}]}, "'contents.0.role' 'function' cannot"),
        ({"contents": [{"role": "user", "parts": []}]}, "'contents.0.parts' must be a non-empty array"),
        ({"contents": [{"role": "user", "parts": [{"text": 5}]}]}, "'contents.0.parts.0.text' must be a string"),
        ({"contents": [{"role": "user", "parts": ["hi"]}]}, "'contents.0.parts.0' must be an object"),
        (
            {"contents": [{"role": "user", "parts": [{"fileData": {"fileUri": "gs://b/o"}}]}]},
            "'contents.0.parts.0' is a part of kind 'fileData' that cannot be translated back",
        ),
        (
            {"contents": [{"role": "user", "parts": [{"text": "hi", "videoMetadata": {}}]}]},
            "'contents.0.parts.0.videoMetadata' cannot be translated",
        ),
        (
            {"contents": [{"role": "user", "parts": [{"inlineData": {"mimeType": "audio/wav", "data": "UklG"}}]}]},
            "'contents.0.parts.0.inlineData.mimeType' 'audio/wav' is neither an image nor a PDF",
        ),
        (
            {"contents": [{"role": "user", "parts": [{"inlineData": {"mimeType": "image/png"}}]}]},
            "'contents.0.parts.0.inlineData.data' must be a string",
        ),
        (
            {"contents": [{"role": "user", "parts": [{"text": "hi", "thought": True}]}]},
            "'contents.0.parts.0.thought' cannot be translated",
        ),
        (
            model_turn({"inlineData": {"mimeType": "image/png", "data": PNG_B64}}),
            "'contents.1.parts.0' is a part of kind 'inlineData'",
        ),
        (model_turn({"executableCode": {"code": "1"}}), "'contents.1.parts.0' is a part of kind 'executableCode'"),
        (model_turn({"functionResponse": {}}), "'contents.1.parts.0' is a part of kind 'functionResponse'"),
        (model_turn({"text": "hmm", "thought": True}), "'contents.1.parts.0' is a thought without a thoughtSignature"),
        (model_turn({"text": "hmm", "thought": "yes"}), "'contents.1.parts.0.thought' must be a boolean"),
        (model_turn({"text": "x", "thoughtSignature": 5}), "'contents.1.parts.0.thoughtSignature' must be a string"),
        (model_turn({"functionCall": "f"}), "'contents.1.parts.0.functionCall' must be an object"),
        (model_turn({"functionCall": {"args": {}}}), "'contents.1.parts.0.functionCall.name' must be a string"),
        (
            model_turn({"functionCall": {"name": "f", "args": [1]}}),
            "'contents.1.parts.0.functionCall.args' must be an object",
        ),
        (model_turn({"functionCall": {"name": "f", "id": 7}}), "'contents.1.parts.0.functionCall.id' must be a string"),
        (
            model_turn({"functionCall": {"name": "f", "willContinue": True}}),
            "'contents.1.parts.0.functionCall.willContinue'",
        ),
        (
            {"contents": [{"role": "user", "parts": [response_part()]}]},
            "'contents.0.parts.0.functionResponse' answers no earlier functionCall 'f'",
        ),
        (
            answer(response_part(id="c2")),
            "'contents.2.parts.0.functionResponse' answers no earlier functionCall 'c2' of 'f'",
        ),
        (answer(response_part(), response_part()), "'contents.2.parts.1.functionResponse' answers no earlier"),
        (answer(response_part(name="g")), "answers no earlier functionCall 'g'"),
        (
            answer(response_part(response={"result": 1})),
            "'contents.2.parts.0.functionResponse.response' must be an object holding only",
        ),
        (
            answer(response_part(response={"output": "a", "error": "b"})),
            "functionResponse.response' must be an object holding only",
        ),
        (answer(response_part(response="ok")), "functionResponse.response' must be an object holding only"),
        (
            answer(response_part(response={"output": {"temp": 18}})),
            "functionResponse.response.output' must be a string or an array of strings",
        ),
        (
            answer(response_part(response={"error": [1]})),
            "'contents.2.parts.0.functionResponse.response.error' must be",
        ),
        (answer(response_part(scheduling="SILENT")), "'contents.2.parts.0.functionResponse.scheduling' cannot"),
        ({"contents": HI, "tools": {}}, "'tools' must be an array"),
        ({"contents": HI, "tools": [{"googleSearch": {}}]}, "'tools.0.googleSearch' cannot be translated"),
        ({"contents": HI, "tools": [{"codeExecution": {}}]}, "'tools.0.codeExecution' cannot be translated"),
        ({"contents": HI, "tools": [{}]}, "'tools.0.functionDeclarations' must be an array"),
        (
            {"contents": HI, "tools": [{"functionDeclarations": [{"name": "f", "response": {}}]}]},
            "'tools.0.functionDeclarations.0.response' cannot be translated",
        ),
        (
            {"contents": HI, "tools": [{"functionDeclarations": [{"description": "f"}]}]},
            "'tools.0.functionDeclarations.0.name' must be a string",
        ),
        (
            {"contents": HI, "tools": [{"functionDeclarations": [{"name": "f", "parametersJsonSchema": "x"}]}]},
            "'tools.0.functionDeclarations.0.parametersJsonSchema' must be an object",
        ),
        (
            {
                "contents": HI,
                "tools": [{"functionDeclarations": [{"name": "f", "parameters": {}, "parametersJsonSchema": {}}]}],
            },
            "'tools.0.functionDeclarations.0' has both parametersJsonSchema and parameters",
        ),
        (
            {"contents": HI, "tools": [{"functionDeclarations": [{"name": "f", "parameters": {"items": 5}}]}]},
            None,  # not a subschema Google would take, but nothing to convert: passed on
        ),
        ({"contents": HI, "toolConfig": {"retrievalConfig": {}}}, "'toolConfig.retrievalConfig' cannot be translated"),
        (
            {"contents": HI, "toolConfig": {"functionCallingConfig": {"mode": "VALIDATED"}}},
            "'toolConfig.functionCallingConfig.mode' 'VALIDATED' cannot be translated back",
        ),
        (
            {"contents": HI, "toolConfig": {"functionCallingConfig": {"allowedFunctionNames": ["f"]}}},
            "'toolConfig.functionCallingConfig.mode' must be a string",
        ),
        (
            {
                "contents": HI,
                "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["f", "g"]}},
            },
            "'toolConfig.functionCallingConfig.allowedFunctionNames' can be read back only as ANY's one name",
        ),
        (
            {"contents": HI, "toolConfig": {"functionCallingConfig": {"mode": "AUTO", "allowedFunctionNames": ["f"]}}},
            "'toolConfig.functionCallingConfig.allowedFunctionNames' can be read back only",
        ),
        (
            {"contents": HI, "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": "f"}}},
            "'toolConfig.functionCallingConfig.allowedFunctionNames' must be an array of strings",
        ),
    ],
)
def test_what_cannot_be_read_back_is_refused_by_name(body: Any, message: str | None) -> None:
    if message is None:
        read(body)
        return
    with pytest.raises(TranslationError) as caught:
        read(body)
    assert message in caught.value.message


def test_nulls_are_absent_fields() -> None:
    body = {
        "contents": [{"role": "user", "parts": [{"text": "hi", "inlineData": None}], "extra": None}],
        "systemInstruction": None,
        "generationConfig": {"temperature": None, "maxOutputTokens": None, "thinkingConfig": None},
        "tools": None,
        "toolConfig": None,
        "safetySettings": None,
    }
    assert read(body) == {"model": "m", "max_tokens": 4096, "messages": [{"role": "user", "content": "hi"}]}
