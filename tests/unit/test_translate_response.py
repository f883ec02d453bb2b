"""Response translation of odd provider answers: always a well-formed answer in the caller's format.

A provider behind a fallback can answer anything: non-object JSON, wrong types, invalid UTF-8, cut or
garbled SSE, unknown events, an error event mid-stream. ResponseTranslator must never raise; a JSON
answer it cannot translate becomes an error body in the caller's format, a stream it cannot translate
ends with an error event in the caller's format after whatever valid events already went out.

Targeted tests pin the exact shapes (and that the official SDKs raise on them); fuzz tests feed
seeded random mutations of the real provider bodies and streams of test_translate.py, in random
chunkings, to both directions and check every output's framing and shape. The fuzz tests drive the
stream translators and ``response``/``error`` directly as well as through ResponseTranslator, whose
last-resort handler would otherwise hide a crash: they must agree byte for byte.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import anthropic
import openai
import orjson
import pytest

from devtools import mock_provider as mock
from extproc.translate import TranslationError
from extproc.translate import anthropic_to_openai as a2o
from extproc.translate import openai_to_anthropic as o2a
from extproc.translate.response import ResponseTranslator
from tests.unit.test_translate import (
    ANTHROPIC_TOOL_MESSAGE,
    OPENAI_TOOL_COMPLETION,
    USER,
    anthropic_client,
    anthropic_text_stream,
    anthropic_tool_stream,
    openai_client,
    openai_text_stream,
    openai_tool_stream,
    serve,
    sse,
)
from tests.unit.test_translate_request import _DELETE, paths, replaced

OPENAI_UNTRANSLATABLE = {
    "error": {
        "message": o2a._UNTRANSLATABLE_MESSAGE,
        "type": "server_error",
        "param": None,
        "code": "provider_response_untranslatable",
    }
}
ANTHROPIC_UNTRANSLATABLE = {"type": "error", "error": {"type": "api_error", "message": a2o._UNTRANSLATABLE_MESSAGE}}

ANTHROPIC_ERROR = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}, "request_id": "r"}
OPENAI_ERROR = {"error": {"message": "Rate limit reached", "type": "requests", "param": None, "code": "rate_limit"}}

PROVIDER_JSON: dict[str, list[dict[str, Any]]] = {
    "anthropic": [
        ANTHROPIC_TOOL_MESSAGE,
        {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-3",
            "content": [{"type": "text", "text": "hello"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": mock._anthropic_usage(9, 1),
        },
        ANTHROPIC_ERROR,
    ],
    "openai": [
        OPENAI_TOOL_COMPLETION,
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
            "usage": mock._chat_usage(9, 1),
        },
        OPENAI_ERROR,
    ],
}


def _provider_streams() -> dict[str, list[bytes]]:
    return {
        "anthropic": [anthropic_text_stream(), anthropic_tool_stream()],
        "openai": [openai_text_stream(), openai_tool_stream(), openai_text_stream(include_usage=False)],
    }


# The caller's API → the module serving it (each module is named for the caller it serves).
MODULES = {"openai": o2a, "anthropic": a2o}
# The caller's API → the provider API whose answers it normally translates.
PROVIDER_OF = {"openai": "anthropic", "anthropic": "openai"}


def stream_translator(caller: str) -> o2a.StreamTranslator | a2o.StreamTranslator:
    if caller == "openai":
        return o2a.StreamTranslator(requested_model="m", include_usage=True, created=1)
    return a2o.StreamTranslator(requested_model="m")


def response_translator(caller: str, status: int, streaming: bool) -> ResponseTranslator:
    return ResponseTranslator(caller, status, streaming, requested_model="m", include_usage=True)


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI chunks carry the translation time; fixed, so outputs of separate translators compare equal."""
    monkeypatch.setattr(o2a, "time", SimpleNamespace(time=lambda: 1.0))


def through(translator: Any, chunks: list[bytes]) -> bytes:
    return b"".join(translator.feed(chunk) for chunk in chunks) + translator.finish()


# ---------------------------------------------------------------------------------------------------
# checks of what a caller receives


def check_json_answer(caller: str, status: int, out: bytes) -> dict[str, Any]:
    """A JSON body in the caller's format: a success only for a 2xx, an error otherwise."""
    parsed = orjson.loads(out)
    assert isinstance(parsed, dict), out
    if caller == "openai":
        if "error" in parsed:
            error = parsed["error"]
            assert set(error) == {"message", "type", "param", "code"}, out
            assert isinstance(error["message"], str) and error["message"], out
            assert isinstance(error["type"], str) and (error["code"] is None or isinstance(error["code"], str)), out
        else:
            assert 200 <= status < 300, out
            assert parsed["object"] == "chat.completion" and len(parsed["choices"]) == 1, out
            message = parsed["choices"][0]["message"]
            assert message["content"] is None or isinstance(message["content"], str), out
            for call in message.get("tool_calls", []):
                assert isinstance(call["id"], str) and isinstance(call["function"]["name"], str), out
                assert isinstance(orjson.loads(call["function"]["arguments"]), dict), out
    elif parsed.get("type") == "error":
        assert set(parsed) == {"type", "error"} and set(parsed["error"]) == {"type", "message"}, out
        assert isinstance(parsed["error"]["type"], str) and isinstance(parsed["error"]["message"], str), out
    else:
        assert 200 <= status < 300, out
        assert parsed["type"] == "message" and isinstance(parsed["content"], list), out
        for block in parsed["content"]:
            assert block["type"] in ("text", "tool_use"), out
            if block["type"] == "text":
                assert isinstance(block["text"], str), out
            else:
                assert isinstance(block["id"], str) and isinstance(block["name"], str), out
                assert isinstance(block["input"], dict), out
    return parsed


_ANTHROPIC_EVENTS = {
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "error",
}


def check_stream_answer(caller: str, out: bytes) -> list[Any]:
    """Well-formed SSE in the caller's format, ending with exactly one terminal event.

    OpenAI: ``data:`` lines only, chunk objects then ``[DONE]`` or an error object. Anthropic: an
    ``event:`` line naming the data's type, blocks started before their deltas and stop, then
    ``message_stop`` or ``error``.
    """
    assert out.endswith(b"\n\n"), out[-200:]
    payloads: list[Any] = []
    started: set[int] = set()
    open_block: set[int] = set()
    tool_indexes: set[int] = set()
    for raw in out[:-2].split(b"\n\n"):
        lines = raw.split(b"\n")
        if caller == "openai":
            assert len(lines) == 1 and lines[0].startswith(b"data: "), raw
            data = lines[0][6:]
            payload: Any = "[DONE]" if data == b"[DONE]" else orjson.loads(data)
            if isinstance(payload, dict) and "error" not in payload:
                assert payload["object"] == "chat.completion.chunk" and isinstance(payload["choices"], list), raw
                for choice in payload["choices"]:
                    for call in choice["delta"].get("tool_calls", []):
                        if call["index"] not in tool_indexes:  # the SDK needs id and name on a call's first chunk
                            assert isinstance(call["id"], str) and isinstance(call["function"]["name"], str), raw
                            tool_indexes.add(call["index"])
                        assert isinstance(call["function"]["arguments"], str), raw
            else:
                assert payload == "[DONE]" or isinstance(payload.get("error"), dict), raw
        else:
            assert len(lines) == 2 and lines[0].startswith(b"event: ") and lines[1].startswith(b"data: "), raw
            payload = orjson.loads(lines[1][6:])
            name = lines[0][7:].decode()
            assert isinstance(payload, dict) and payload.get("type") == name and name in _ANTHROPIC_EVENTS, raw
            assert payloads or name in ("message_start", "error"), raw  # message_start comes first
            if name == "content_block_start":
                assert payload["index"] not in started, raw
                started.add(payload["index"])
                open_block.add(payload["index"])
            elif name == "content_block_delta":
                assert payload["index"] in started, raw
            elif name == "content_block_stop":
                assert payload["index"] in open_block, raw
                open_block.discard(payload["index"])
        payloads.append(payload)
    terminal = [i for i, p in enumerate(payloads) if _terminal(caller, p)]
    assert terminal == [len(payloads) - 1], payloads  # one terminal event, and it is the last
    return payloads


def _terminal(caller: str, payload: Any) -> bool:
    if caller == "openai":
        return payload == "[DONE]" or "error" in payload
    return payload["type"] in ("message_stop", "error")


# ---------------------------------------------------------------------------------------------------
# targeted: JSON answers


BROKEN_FOR_BOTH = [
    b"",
    b"not json",
    b"\xff\xfe{}",
    b'{"id": "\xff"}',
    b"5",
    b'"x"',
    b"null",
    b"[]",
    b"[{}]",
    b'{"id": [',
]
BROKEN_ANTHROPIC_JSON = [
    b'{"content": 5}',
    b'{"content": [5]}',
    b'{"content": [{"type": 5}]}',
    b'{"content": [{"type": "text", "text": 5}]}',
    b'{"content": [{"type": "tool_use", "id": "t", "name": "f", "input": []}]}',
    b'{"content": [{"type": "tool_use", "id": 5, "name": "f", "input": {}}]}',
]
BROKEN_OPENAI_JSON = [
    b'{"choices": {}}',
    b'{"choices": [5]}',
    b'{"choices": [{"message": []}]}',
    b'{"choices": [{"message": {"content": 5}}]}',
    b'{"choices": [{"message": {"refusal": []}}]}',
    b'{"choices": [{"message": {"tool_calls": {}}}]}',
    b'{"choices": [{"message": {"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}}]}',
    b'{"choices": [{"message": {"tool_calls": [{"id": "c", "function": {"name": 5, "arguments": "{}"}}]}}]}',
]


@pytest.mark.parametrize(
    ("caller", "body"),
    [("openai", body) for body in BROKEN_FOR_BOTH + BROKEN_ANTHROPIC_JSON]
    + [("anthropic", body) for body in BROKEN_FOR_BOTH + BROKEN_OPENAI_JSON],
)
def test_untranslatable_json_answer_becomes_an_error_in_the_callers_format(caller: str, body: bytes) -> None:
    translator = response_translator(caller, 200, False)
    out = through(translator, [body[:5], body[5:]])
    assert orjson.loads(out) == (OPENAI_UNTRANSLATABLE if caller == "openai" else ANTHROPIC_UNTRANSLATABLE)
    assert translator.failed
    check_json_answer(caller, 200, out)


def test_the_untranslatable_message_says_what_happened_without_internals() -> None:
    for message in (o2a._UNTRANSLATABLE_MESSAGE, a2o._UNTRANSLATABLE_MESSAGE):
        assert "could not be translated" in message
        assert not any(word in message for word in ("Error", "orjson", "JSON", "Traceback", "line", "char"))


@pytest.mark.parametrize("caller", ["openai", "anthropic"])
@pytest.mark.parametrize("status", [400, 429, 500, 503])
@pytest.mark.parametrize(
    "body", [b"", b"\xff", b"[]", b'{"error": []}', b'{"error": {"type": [], "message": 5}}', b"5"]
)
def test_odd_error_bodies_still_become_the_callers_error(caller: str, status: int, body: bytes) -> None:
    translator = response_translator(caller, status, True)  # an error answer is JSON even for a stream
    parsed = check_json_answer(caller, status, through(translator, [body]))
    message = parsed["error"]["message"]
    assert message == f"Upstream provider error (HTTP {status})"
    assert not translator.failed  # the provider's own error, faithfully passed on


def test_usage_counts_beyond_what_json_carries_do_not_break_the_answer() -> None:
    huge = {"input_tokens": 2**64 - 1, "output_tokens": 2**64 - 1, "cache_read_input_tokens": 2**64 - 1}
    out = through(response_translator("openai", 200, False), [orjson.dumps({**ANTHROPIC_TOOL_MESSAGE, "usage": huge})])
    assert check_json_answer("openai", 200, out)["usage"]["total_tokens"] == 0  # no believable count: none
    usage = {"prompt_tokens": 2**64 - 1, "completion_tokens": -5, "prompt_tokens_details": {"cached_tokens": 2.5}}
    out = through(
        response_translator("anthropic", 200, False), [orjson.dumps({**OPENAI_TOOL_COMPLETION, "usage": usage})]
    )
    assert check_json_answer("anthropic", 200, out)["usage"] == {
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def test_odd_metadata_is_tolerated_when_the_content_is_sound() -> None:
    # An id, stop reason or usage of the wrong type does not make the answer unusable; it is defaulted.
    message = {**ANTHROPIC_TOOL_MESSAGE, "id": 5, "stop_reason": ["x"], "usage": "many"}
    out = check_json_answer("openai", 200, through(response_translator("openai", 200, False), [orjson.dumps(message)]))
    assert out["id"] == "chatcmpl-" and out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["message"]["content"] == "Let me check."
    completion = {**OPENAI_TOOL_COMPLETION, "id": [], "usage": 5}
    completion["choices"] = [{**OPENAI_TOOL_COMPLETION["choices"][0], "finish_reason": {"a": 1}}]
    answer = through(response_translator("anthropic", 200, False), [orjson.dumps(completion)])
    out = check_json_answer("anthropic", 200, answer)
    assert out["id"] == "msg_" and out["stop_reason"] == "end_turn" and len(out["content"]) == 3


# ---------------------------------------------------------------------------------------------------
# targeted: streams


def _events(stream: bytes) -> list[bytes]:
    return [event + b"\n\n" for event in stream.split(b"\n\n") if event]


BROKEN_ANTHROPIC_EVENTS = [
    b"event: content_block_delta\ndata: not json\n\n",
    b"event: content_block_delta\ndata: \xff\xfe\n\n",
    b"event: content_block_delta\ndata: [1]\n\n",
    b"data: [DONE]\n\n",
    sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": []}),
    sse("content_block_delta", {"type": "content_block_delta", "index": [], "delta": {"type": "text_delta"}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}}),
    sse("content_block_start", {"type": "content_block_start", "index": 3, "content_block": "text"}),
    sse("content_block_start", {"type": "content_block_start", "index": 3, "content_block": {"type": "tool_use"}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": {}}),
    sse("message_start", {"type": "message_start", "message": []}),
    sse("message_delta", {"type": "message_delta", "delta": 5}),
    sse("bogus", {"type": 5}),
]

BROKEN_OPENAI_EVENTS = [
    b"data: not json\n\n",
    b"data: \xff\xfe\n\n",
    b"data: [1]\n\n",
    b"data: 5\n\n",
    b'data: {"choices": {}}\n\n',
    b'data: {"choices": [5]}\n\n',
    b'data: {"choices": [{"index": 0, "delta": []}]}\n\n',
    b'data: {"choices": [{"index": 0, "delta": {"content": 5}}]}\n\n',
    b'data: {"choices": [{"index": 0, "delta": {"tool_calls": 5}}]}\n\n',
    b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": [], "id": "c"}]}}]}\n\n',
    b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": []}]}}]}\n\n',
    b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 5, "id": 5}]}}]}\n\n',
]


@pytest.mark.parametrize("broken", BROKEN_ANTHROPIC_EVENTS)
def test_a_broken_anthropic_event_ends_the_openai_stream_after_what_was_sent(broken: bytes) -> None:
    events = _events(anthropic_text_stream())
    prefix = o2a.StreamTranslator(requested_model="m", include_usage=False, created=1)
    sent = b"".join(prefix.feed(event) for event in events[:4])
    translator = ResponseTranslator("openai", 200, True, requested_model="m", include_usage=False)
    out = through(translator, [*events[:4], broken, *events[4:]])
    assert out == sent + b"data: " + orjson.dumps(OPENAI_UNTRANSLATABLE) + b"\n\n"  # nothing retracted, then the end
    assert translator.failed
    check_stream_answer("openai", out)
    with pytest.raises(openai.APIError, match="could not be translated"):
        list(openai_client(serve(out, sse=True)).chat.completions.create(model="m", messages=[USER], stream=True))


@pytest.mark.parametrize("broken", BROKEN_OPENAI_EVENTS)
def test_a_broken_openai_chunk_ends_the_anthropic_stream_after_what_was_sent(broken: bytes) -> None:
    events = _events(openai_tool_stream())
    prefix = a2o.StreamTranslator(requested_model="m")
    sent = b"".join(prefix.feed(event) for event in events[:5])
    translator = response_translator("anthropic", 200, True)
    out = through(translator, [*events[:5], broken, *events[5:]])
    assert out == sent + b"event: error\ndata: " + orjson.dumps(ANTHROPIC_UNTRANSLATABLE) + b"\n\n"
    assert translator.failed
    check_stream_answer("anthropic", out)
    client = anthropic_client(serve(out, sse=True))
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        client.messages.stream(model="m", max_tokens=5, messages=[USER]) as stream,
    ):
        stream.get_final_message()
    assert caught.value.body == ANTHROPIC_UNTRANSLATABLE


@pytest.mark.parametrize(
    ("caller", "event", "expected"),
    [
        (
            "openai",
            sse("error", {"type": "error", "error": "boom"}),
            {"message": "The upstream provider reported an error mid-stream.", "type": "server_error", "code": None},
        ),
        (
            "openai",
            sse("error", {"type": "error", "error": {"type": ["x"], "message": 5}}),
            {"message": "The upstream provider reported an error mid-stream.", "type": "server_error", "code": None},
        ),
        (
            "openai",
            sse("error", {"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down"}}),
            {"message": "Slow down", "type": "requests", "code": "rate_limit_exceeded"},
        ),
        ("anthropic", b'data: {"error": 5}\n\n', "The upstream provider failed."),
        ("anthropic", b'data: {"error": {"message": []}}\n\n', "The upstream provider failed."),
        ("anthropic", b'data: {"error": "quota exhausted"}\n\n', "quota exhausted"),
    ],
)
def test_a_provider_error_event_mid_stream_of_any_shape_is_passed_on(caller: str, event: bytes, expected: Any) -> None:
    events = _events(_provider_streams()[PROVIDER_OF[caller]][0])
    translator = response_translator(caller, 200, True)
    out = through(translator, [*events[:4], event, *events[4:]])
    last = check_stream_answer(caller, out)[-1]
    if caller == "openai":
        assert last == {"error": {**expected, "param": None}}
    else:
        assert last == {"type": "error", "error": {"type": "api_error", "message": expected}}
    assert not translator.failed  # the provider's own error, not a translation failure


@pytest.mark.parametrize("caller", ["openai", "anthropic"])
def test_unknown_events_comments_and_nameless_events_are_skipped(caller: str) -> None:
    source = _provider_streams()[PROVIDER_OF[caller]][0]
    clean = through(stream_translator(caller), [source])
    events = _events(source)
    noise = [
        b": keep-alive\n\n",
        b"event: ping\n\n",  # a name and no data: not an event, says the SSE spec
        b"id: 7\nretry: 100\n\n",
        sse("future_event", {"type": "future_event", "x": [1]}) if caller == "openai" else b'data: {"object": "x"}\n\n',
    ]
    noisy = [events[0], *noise, *events[1:3], *noise, *events[3:]]
    assert through(stream_translator(caller), noisy) == clean


@pytest.mark.parametrize("caller", ["openai", "anthropic"])
def test_usage_beyond_64_bits_in_a_stream_does_not_break_it(caller: str) -> None:
    if caller == "openai":
        usage = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2**64 - 1}}
        events = _events(anthropic_text_stream())
        source = [*events[:-2], sse("message_delta", usage), events[-1]]
        # input 17 from message_start + a cumulative output count no JSON consumer could add to: none
        expected_usage = {"prompt_tokens": 17, "completion_tokens": 0, "total_tokens": 17}
    else:
        big = {"prompt_tokens": 2**64 - 1, "completion_tokens": 2**64 - 1, "total_tokens": 3}
        events = _events(openai_text_stream())
        source = [*events[:-1], b"data: " + orjson.dumps({"choices": [], "usage": big}) + b"\n\n", events[-1]]
        expected_usage = {"input_tokens": 0, "output_tokens": 0}
    payloads = check_stream_answer(caller, through(response_translator(caller, 200, True), source))
    usage = payloads[-2]["usage"]
    assert {k: usage[k] for k in expected_usage} == expected_usage


@pytest.mark.parametrize("caller", ["openai", "anthropic"])
def test_the_cause_is_logged_once_at_warning(caller: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="extproc.translate")
    translator = response_translator(caller, 200, True)
    events = _events(_provider_streams()[PROVIDER_OF[caller]][0])
    through(translator, [*events[:3], b"data: [1]\n\n", b"data: oops\n\n", *events[3:]])
    through(translator, [b"data: oops\n\n"])  # more after the end: nothing more is said
    records = [r for r in caplog.records if r.name.startswith("extproc.translate")]
    assert [r.levelno for r in records] == [logging.WARNING]
    assert "could not be translated" in records[0].getMessage()
    assert "not a JSON object" in records[0].getMessage()  # the cause, for the operator
    caplog.clear()
    json_translator = response_translator(caller, 200, False)
    through(json_translator, [b"[1, 2"])
    records = [r for r in caplog.records if r.name.startswith("extproc.translate")]
    assert [r.levelno for r in records] == [logging.WARNING]


@pytest.mark.parametrize("caller", ["openai", "anthropic"])
def test_a_clean_answer_is_not_a_failure(caller: str, caplog: pytest.LogCaptureFixture) -> None:
    for source in _provider_streams()[PROVIDER_OF[caller]]:
        translator = response_translator(caller, 200, True)
        check_stream_answer(caller, through(translator, [source]))
        assert not translator.failed
    for body in PROVIDER_JSON[PROVIDER_OF[caller]][:2]:
        translator = response_translator(caller, 200, False)
        check_json_answer(caller, 200, through(translator, [orjson.dumps(body)]))
        assert not translator.failed
    assert not [r for r in caplog.records if r.name.startswith("extproc.translate")]


def test_an_unexpected_exception_is_contained(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The last-resort handler: a bug in a translator must still give the caller a well-formed end.
    def broken(self: Any, *args: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(o2a.StreamTranslator, "_event", broken)
    monkeypatch.setattr(a2o, "response", broken)
    translator = response_translator("openai", 200, True)
    out = through(translator, [anthropic_text_stream(), b"more"])
    assert check_stream_answer("openai", out) == [OPENAI_UNTRANSLATABLE]
    assert translator.failed
    json_translator = response_translator("anthropic", 200, False)
    assert orjson.loads(through(json_translator, [orjson.dumps(OPENAI_TOOL_COMPLETION)])) == ANTHROPIC_UNTRANSLATABLE
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(r.exc_info for r in warnings)


# ---------------------------------------------------------------------------------------------------
# fuzz: seeded random mutations of real provider answers

HUGE_TEXT = b"123456789012345678901234567890"  # orjson reads it as a float
ODD_VALUES: list[Any] = [None, True, False, 0, 5, -1, 2.5, "", "x", [], {}, [1], {"a": 1}, 2**64 - 1, "__HUGE__"]
ODD_DOCUMENTS = [b"", b" ", b"null", b"5", b'"x"', b"[]", b"[{}]", b"{}", b"not json", b"\xff\xfe", b"{", b"[DONE]"]
INVALID_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\x00"]
EXTRA_EVENTS = [
    b": comment",
    b"event: ping",
    b"id: 1\nretry: x",
    b"data",
    b"event",
    b"data: ",
    b"data: [DONE]",
    b'event: future\ndata: {"type": "future"}',
    b'data: {"type": "mystery", "choices": [{"index": 0, "delta": {"content": "?"}}]}',
    b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}',
    b'event: error\ndata: {"type": "error", "error": "boom"}',
    b'data: {"error": {"message": "The server had an error", "type": "server_error"}}',
    b'data: {"error": []}',
    b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 9, "delta": {"type": "text_delta"}}',
    b'event: content_block_stop\ndata: {"type": "content_block_stop", "index": 0}',
    b'event: message_stop\ndata: {"type": "message_stop"}',
    b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 3, "function": {"arguments": "{"}}]}}]}',
    b'data: {"choices": [{"index": 1, "delta": {"content": "other choice"}}]}',
    b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}',
]


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        value = value[key]
    return value


def mutate_value(rng: random.Random, value: Any) -> Any:
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(paths(value)))
        roll = rng.random()
        if roll < 0.6 or not path:
            value = replaced(value, path, rng.choice(ODD_VALUES))
        elif roll < 0.85:
            value = replaced(value, path, _DELETE)
        else:
            value = replaced(value, path, [_get(value, path)])  # an array where something else was
    return value


def dumps(value: Any) -> bytes:
    return orjson.dumps(value).replace(b'"__HUGE__"', HUGE_TEXT)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    at = rng.randint(0, len(data))
    roll = rng.randrange(7)
    if roll == 0:
        return data[:at]
    if roll == 1:
        return data[:at] + rng.choice(INVALID_UTF8) + data[at:]
    if roll == 2 and data:
        at = min(at, len(data) - 1)
        return data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
    if roll == 3:
        return data[:at] + data[at + rng.randint(1, 20) :]
    if roll == 4:
        return data[:at] + data[max(0, at - 20) : at] + data[at:]
    if roll == 5:
        return rng.choice(ODD_DOCUMENTS)
    # a duplicate key at the end, which a parser that keeps the last value would use
    key = rng.choice([b"content", b"choices", b"usage", b"id", b"error", b"type"])
    return data[:-1] + b',"' + key + b'":' + dumps(rng.choice(ODD_VALUES)) + b"}" if data.endswith(b"}") else data


def odd_json(rng: random.Random) -> bytes:
    body = rng.choice([*PROVIDER_JSON["anthropic"], *PROVIDER_JSON["openai"]])
    roll = rng.random()
    if roll < 0.05:
        return dumps(body)
    if roll < 0.6:
        return dumps(mutate_value(rng, body))
    if roll < 0.85:
        return mutate_bytes(rng, dumps(body))
    return mutate_bytes(rng, dumps(mutate_value(rng, body)))


def _mutate_event(rng: random.Random, event: bytes) -> bytes:
    lines = event.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"data: "):
            try:
                payload = orjson.loads(line[6:])
            except orjson.JSONDecodeError:
                return event
            lines[i] = b"data: " + dumps(mutate_value(rng, payload))
            return b"\n".join(lines)
    return event


def odd_stream(rng: random.Random, streams: list[bytes]) -> bytes:
    events = [event for event in rng.choice(streams).split(b"\n\n") if event]
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(events)) if events else 0
        roll = rng.randrange(10)
        if not events or roll == 0:
            events.insert(at, rng.choice(EXTRA_EVENTS))
        elif roll in (1, 2, 3):
            events[at] = _mutate_event(rng, events[at])
        elif roll == 4:
            head = events[at].rpartition(b"data: ")[0]
            events[at] = head + b"data: " + rng.choice(ODD_DOCUMENTS)
        elif roll == 5:
            del events[at]
        elif roll == 6:
            events.insert(at, events[at])
        elif roll == 7:
            other = rng.randrange(len(events))
            events[at], events[other] = events[other], events[at]
        elif roll == 8:
            events[at] = mutate_bytes(rng, events[at])
        else:
            # the JSON split over two data lines (joined with a newline: still the same JSON)
            head, _, data = events[at].rpartition(b"data: ")
            cut = rng.randint(0, len(data))
            events[at] = head + b"data: " + data[:cut] + b"\ndata: " + data[cut:]
    stream = b"".join(event + b"\n\n" for event in events)
    roll = rng.random()
    if roll < 0.15:
        stream = stream[: rng.randint(0, len(stream))]  # cut anywhere
    elif roll < 0.25:
        stream = stream.replace(b"\n", b"\r\n")
    elif roll < 0.3:
        stream += rng.choice(EXTRA_EVENTS)  # a last event that never completes
    return stream


def chunked(rng: random.Random, data: bytes) -> list[bytes]:
    if rng.random() < 0.05:
        return [data[i : i + 1] for i in range(len(data))]
    if not data or rng.random() < 0.2:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data) + 1), k=min(len(data), rng.randint(1, 30))))
    return [data[a:b] for a, b in zip([0, *cuts], cuts, strict=False)] + [data[cuts[-1] :]]


JSON_CASES_PER_SEED = 500
STREAM_CASES_PER_SEED = 500
SEEDS = range(5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("caller", ["openai", "anthropic"])
def test_fuzzed_json_answers_always_give_a_json_answer(caller: str, seed: int) -> None:
    rng = random.Random(f"json-{caller}-{seed}")
    module = MODULES[caller]
    outcomes = {"translated": 0, "untranslatable": 0, "error": 0}
    for case in range(JSON_CASES_PER_SEED):
        body = odd_json(rng)
        status = rng.choice([200, 200, 200, 201, 400, 401, 404, 429, 500, 502, 503, 529])
        context = f"case {case}: {status} {body[:300]!r}"
        # The module functions themselves: error() never raises, response() only a TranslationError.
        if 200 <= status < 300:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                parsed = None
            try:
                orjson.dumps(module.response(parsed, requested_model="m"))
            except TranslationError:
                pass
            except Exception as exc:
                pytest.fail(f"response() raised {type(exc).__name__}: {exc} for {context}")
        else:
            try:
                orjson.loads(module.error(status, body))
            except Exception as exc:
                pytest.fail(f"error() raised {type(exc).__name__}: {exc} for {context}")
        translator = response_translator(caller, status, rng.random() < 0.3 and status >= 400)
        try:
            out = through(translator, chunked(rng, body))
        except Exception as exc:
            pytest.fail(f"ResponseTranslator raised {type(exc).__name__}: {exc} for {context}")
        try:
            parsed_out = check_json_answer(caller, status, out)
        except (AssertionError, orjson.JSONDecodeError) as exc:
            pytest.fail(f"bad answer {out[:300]!r} for {context}: {exc}")
        if translator.failed:
            outcomes["untranslatable"] += 1
        else:
            outcomes["error" if "error" in parsed_out and parsed_out.get("type") != "message" else "translated"] += 1
    # The generator reaches all three outcomes, so the checks above saw each kind of answer.
    assert min(outcomes.values()) > JSON_CASES_PER_SEED // 20, outcomes


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("caller", ["openai", "anthropic"])
def test_fuzzed_streams_always_give_well_formed_events_and_one_end(caller: str, seed: int) -> None:
    rng = random.Random(f"sse-{caller}-{seed}")
    streams = _provider_streams()
    ends = {"clean": 0, "untranslatable": 0, "other error": 0}
    for case in range(STREAM_CASES_PER_SEED):
        # Mostly the provider API this caller is served by; sometimes the other one, which is odd too.
        provider = PROVIDER_OF[caller] if rng.random() < 0.8 else caller
        stream = odd_stream(rng, streams[provider])
        chunks = chunked(rng, stream)
        context = f"case {case}: {stream[:2000]!r}"
        direct = stream_translator(caller)
        try:
            expected = through(direct, chunks)
        except Exception as exc:
            pytest.fail(f"StreamTranslator raised {type(exc).__name__}: {exc} for {context}")
        translator = response_translator(caller, 200, True)
        try:
            out = through(translator, chunks)
        except Exception as exc:
            pytest.fail(f"ResponseTranslator raised {type(exc).__name__}: {exc} for {context}")
        assert out == expected, context  # the last-resort handler was not needed
        try:
            payloads = check_stream_answer(caller, out)
        except (AssertionError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            pytest.fail(f"bad stream {out[-600:]!r} for {context}: {exc!r}")
        if translator.failed:
            ends["untranslatable"] += 1
        elif _clean_end(caller, payloads[-1]):
            ends["clean"] += 1
        else:
            ends["other error"] += 1
    assert min(ends.values()) > STREAM_CASES_PER_SEED // 20, ends


def _clean_end(caller: str, payload: Any) -> bool:
    return payload == "[DONE]" if caller == "openai" else payload["type"] == "message_stop"


def test_the_fuzz_generators_are_deterministic() -> None:
    def sample() -> Iterator[bytes]:
        rng = random.Random(3)
        for _ in range(20):
            yield odd_json(rng)
            yield odd_stream(rng, _provider_streams()["openai"])

    assert list(sample()) == list(sample())
