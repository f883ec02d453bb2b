"""Request translation of crafted bodies: a clean TranslationError naming the field, never a crash.

The translators read caller JSON that nothing has validated yet (the same-API path forwards it to the
provider untouched, whose own validation answers). A property test replaces every value of a few valid
requests, at every depth, by a value of every JSON type (and deletes every key and item); each result
must be either a request orjson can write or a TranslationError whose message reads as an API error,
not as a Python exception. Exact messages are pinned for the fields named in bug reports.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from extproc.translate import TranslationError
from extproc.translate import anthropic_to_openai as a2o
from extproc.translate import openai_to_anthropic as o2a
from tests.unit.test_translate import PDF_B64, PNG_B64, TIME_SCHEMA, USER, WEATHER_SCHEMA, _random_anthropic_request

HUGE = 2**70  # beyond the 64 bits orjson (and both providers) write; only a Python caller can pass one
VALUES: list[Any] = [None, True, 5, 2.5, "x", [], {}, [1], {"a": 1}, HUGE]
_DELETE = object()

# What a message built from a Python exception looks like; a caller must never see one.
_INTERNAL = re.compile(
    r"[A-Z][a-z]+Error\b|NoneType|has no attribute|unhashable|not iterable|not subscriptable|object of type|"
    r"<class |Traceback|positional argument|takes \d"
)

OPENAI_FULL: dict[str, Any] = {
    "model": "auth_assistant",
    "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Rule one."}]},
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris and the time?"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Checking."}, {"type": "refusal", "refusal": "No."}],
            "refusal": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "P"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "09:00"}]},
        {"role": "user", "content": "And this picture?"},
        {"role": "assistant", "content": None, "refusal": "I won't."},
        {
            "role": "user",
            "name": "alice",
            "content": [
                {"type": "text", "text": "These:"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                {"type": "file", "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{PDF_B64}"}},
            ],
        },
    ],
    "tools": [
        {"type": "function", "function": {"name": "weather", "description": "Weather", "parameters": WEATHER_SCHEMA}},
        {"type": "function", "function": {"name": "time", "strict": True}},
    ],
    "tool_choice": {"type": "function", "function": {"name": "weather"}},
    "parallel_tool_calls": False,
    "max_completion_tokens": 300,
    "max_tokens": 200,
    "temperature": 0.3,
    "top_p": 0.9,
    "stop": ["END", "STOP"],
    "user": "user-42",
    "safety_identifier": "sid",
    "stream": True,
    "stream_options": {"include_usage": True},
    "n": 1,
    "logprobs": False,
    "logit_bias": {},
    "response_format": {"type": "text"},
    "modalities": ["text"],
    "seed": 7,
}

ANTHROPIC_FULL: dict[str, Any] = {
    "model": "fraud_detector",
    "max_tokens": 256,
    "system": [{"type": "text", "text": "A.", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather here?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                {
                    "type": "document",
                    "title": "a.pdf",
                    "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris", "n": [1, 2.5]}},
                {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "09:00"}]},
                {"type": "text", "text": "Thanks, and tomorrow?"},
            ],
        },
    ],
    "tools": [
        {"name": "weather", "description": "Weather", "input_schema": WEATHER_SCHEMA},
        {"type": "custom", "name": "time", "input_schema": TIME_SCHEMA},
    ],
    "tool_choice": {"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
    "stop_sequences": ["END", "STOP"],
    "temperature": 0.2,
    "top_p": 0.8,
    "top_k": 40,
    "metadata": {"user_id": "user-42"},
    "thinking": {"type": "disabled"},
    "stream": True,
}

OPENAI_MINIMAL: dict[str, Any] = {"model": "m", "messages": [USER]}
ANTHROPIC_MINIMAL: dict[str, Any] = {"model": "m", "max_tokens": 5, "messages": [USER]}

Translate = Callable[[Any], dict[str, Any]]


def to_anthropic(body: Any) -> dict[str, Any]:
    return o2a.request(body, model="claude-3")


def to_openai(body: Any) -> dict[str, Any]:
    return a2o.request(body, model="gpt-4o")


def _openai_bodies() -> list[dict[str, Any]]:
    generated = [a2o.request(_random_anthropic_request(random.Random(seed)), model="gpt-4o") for seed in (1, 2, 3)]
    return [OPENAI_FULL, OPENAI_MINIMAL, *generated]


def _anthropic_bodies() -> list[dict[str, Any]]:
    generated = [_random_anthropic_request(random.Random(seed)) for seed in (1, 2, 3)]
    return [ANTHROPIC_FULL, ANTHROPIC_MINIMAL, *generated]


def paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into a JSON value, the root included."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, (*path, index))


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of ``value`` with the item at ``path`` replaced by ``new`` (or removed, for ``_DELETE``)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        copy: Any = dict(value)
    else:
        copy = list(value)
    if not rest and new is _DELETE:
        del copy[head]
    else:
        copy[head] = replaced(value[head], rest, new)
    return copy


def outcome(translate: Translate, body: Any) -> str:
    """'translated' or 'refused'; anything else (a crash, an unwritable result, an internal message) fails."""
    try:
        out = translate(body)
    except TranslationError as exc:
        assert isinstance(exc.message, str) and exc.message, body
        assert not _INTERNAL.search(exc.message), (exc.message, body)
        assert len(exc.message) < 300, exc.message
        return "refused"
    assert isinstance(out, dict)
    orjson.dumps(out)  # raises on a value JSON cannot carry
    return "translated"


def _mutations(bodies: list[dict[str, Any]]) -> Iterator[tuple[tuple[Any, ...], Any, Any]]:
    for body in bodies:
        for path in paths(body):
            for value in [*VALUES, _DELETE] if path else VALUES:
                yield path, value, replaced(body, path, value)


@pytest.mark.parametrize(
    ("translate", "bodies", "then"),
    [(to_anthropic, _openai_bodies, to_openai), (to_openai, _anthropic_bodies, to_anthropic)],
    ids=["openai_to_anthropic", "anthropic_to_openai"],
)
def test_any_value_at_any_path_translates_or_is_refused_cleanly(
    translate: Translate, bodies: Callable[[], list[dict[str, Any]]], then: Translate
) -> None:
    seen = {"translated": 0, "refused": 0}
    for path, value, body in _mutations(bodies()):
        try:
            result = outcome(translate, body)
        except AssertionError:
            raise
        except Exception as exc:  # the failure to report: which path, which value
            pytest.fail(f"{type(exc).__name__}: {exc} at {path!r} = {value!r}")
        seen[result] += 1
        if result == "translated":
            # What a translator writes is a valid request of the other API: reading it back must not crash.
            outcome(then, translate(body))
    # Both outcomes occur: the mutations reach fields that matter and fields that are passed over.
    assert seen["translated"] > 100 and seen["refused"] > 100, seen


@pytest.mark.parametrize(
    ("translate", "bodies"),
    [(to_anthropic, _openai_bodies), (to_openai, _anthropic_bodies)],
    ids=["openai_to_anthropic", "anthropic_to_openai"],
)
@pytest.mark.parametrize("seed", range(4))
def test_several_odd_values_at_once_translate_or_are_refused_cleanly(
    translate: Translate, bodies: Callable[[], list[dict[str, Any]]], seed: int
) -> None:
    rng = random.Random(seed)
    for _ in range(500):
        body: Any = rng.choice(bodies())
        for _ in range(rng.randint(2, 4)):
            candidates = [p for p in paths(body) if p]
            if not candidates:
                break
            body = replaced(body, rng.choice(candidates), rng.choice([*VALUES, _DELETE]))
        try:
            outcome(translate, body)
        except AssertionError:
            raise
        except Exception as exc:
            pytest.fail(f"{type(exc).__name__}: {exc} for {body!r}")


def _openai(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [USER], **fields}


def _anthropic(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 5, "messages": [USER], **fields}


def _assistant_call(call: Any) -> dict[str, Any]:
    return {
        "messages": [
            USER,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"},
        ]
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_openai(stop=5), "'stop' must be a string or an array of strings"),
        (_openai(stop=["a", 5]), "'stop' must be a string or an array of strings"),
        (_openai(temperature=[]), "'temperature' must be a number"),
        (_openai(temperature=True), "'temperature' must be a number"),
        (_openai(top_p="0.9"), "'top_p' must be a number"),
        (_openai(tools=2.5), "'tools' must be an array"),
        (_openai(tools=[5]), "'tools[0]' must be an object"),
        (_openai(tools=[{"type": "function", "function": []}]), "'tools[0].function' must be an object"),
        (_openai(tools=[{"type": "function", "function": {"name": 5}}]), "'tools[0].function.name' must be a string"),
        (
            _openai(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
            "'tools[0].function.parameters' must be an object",
        ),
        (
            _openai(tools=[{"type": "function", "function": {"name": "f", "parameters": {"maximum": HUGE}}}]),
            "'tools[0].function.parameters' holds an integer beyond 64 bits",
        ),
        (_openai(messages="x"), "'messages' must be a non-empty array"),
        (_openai(messages=[5]), "'messages[0]' must be an object"),
        (_openai(messages=[{"role": 5, "content": "x"}]), "'messages[0].role' must be a string"),
        (_openai(messages=[{"role": "user", "content": 5}]), "'messages[0].content' must be a string or an array"),
        (_openai(messages=[{"role": "user", "content": [5]}]), "'messages[0].content[0]' must be an object"),
        (
            _openai(messages=[{"role": "user", "content": [{"type": 5}]}]),
            "'messages[0].content[0].type' must be a string",
        ),
        (
            _openai(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
            "'messages[0].content[0].text' must be a string",
        ),
        (
            _openai(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]),
            "'messages[0].content[0].image_url.url' must be a string",
        ),
        (
            _openai(messages=[{"role": "user", "content": [{"type": "file", "file": "x"}]}]),
            "'messages[0].content[0].file' must be an object",
        ),
        (
            _openai(messages=[{"role": "system", "content": [{"type": "text", "text": None}]}, USER]),
            "'messages[0].content[0].text' must be a string",
        ),
        (_openai(**_assistant_call(5)), "'messages[1].tool_calls[0]' must be an object"),
        (
            _openai(**_assistant_call({"id": "c", "function": []})),
            "'messages[1].tool_calls[0].function' must be an object",
        ),
        (
            _openai(**_assistant_call({"id": 5, "function": {"name": "f", "arguments": "{}"}})),
            "'messages[1].tool_calls[0].id' must be a string",
        ),
        (
            _openai(**_assistant_call({"id": "c", "function": {"name": "f", "arguments": {"a": 1}}})),
            "'messages[1].tool_calls[0].function.arguments' must be a string",
        ),
        (
            _openai(messages=[USER, {"role": "assistant", "content": "x", "tool_calls": 5}, USER]),
            "'messages[1].tool_calls' must be an array",
        ),
        (
            _openai(messages=[USER, {"role": "tool", "tool_call_id": 5, "content": "x"}]),
            "'messages[1].tool_call_id' must be a string",
        ),
        (_openai(max_tokens="10"), "'max_tokens' must be an integer from 1 to 2147483647"),
        (_openai(max_completion_tokens=HUGE), "'max_completion_tokens' must be an integer from 1 to 2147483647"),
        (_openai(max_tokens=0), "'max_tokens' must be an integer from 1 to 2147483647"),
        (_openai(max_tokens=10.0), "'max_tokens' must be an integer from 1 to 2147483647"),
        (_openai(stream="yes"), "'stream' must be a boolean"),
        (_openai(parallel_tool_calls="no"), "'parallel_tool_calls' must be a boolean"),
        (_openai(user=5), "'user' must be a string"),
        (_openai(tool_choice=5), '\'tool_choice\' must be "auto", "none", "required" or an object'),
        (_openai(tool_choice="sometimes"), "'tool_choice' 'sometimes' cannot be translated"),
        (_openai(tool_choice={"type": "function", "function": "f"}), "'tool_choice.function' must be an object"),
        (_openai(tool_choice={"type": "function", "function": {}}), "'tool_choice.function.name' must be a string"),
        (_openai(tool_choice={"type": 5}), "'tool_choice.type' must be a string"),
        (_openai(n="2"), "'n' must be an integer"),
        (_openai(logprobs="yes"), "'logprobs' must be a boolean"),
        (_openai(logit_bias=[1]), "'logit_bias' must be an object"),
        (_openai(response_format=5), "'response_format' must be an object"),
        (_openai(response_format={"type": 5}), "'response_format.type' must be a string"),
        (_openai(modalities="text"), "'modalities' must be an array of strings"),
        (_openai(modalities=[5]), "'modalities' must be an array of strings"),
    ],
)
def test_wrong_typed_openai_field_is_named(body: dict[str, Any], message: str) -> None:
    with pytest.raises(TranslationError) as caught:
        o2a.request(body, model="m")
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_anthropic(stop_sequences=5), "'stop_sequences' must be an array of strings"),
        (_anthropic(stop_sequences="END"), "'stop_sequences' must be an array of strings"),
        (_anthropic(temperature=[]), "'temperature' must be a number"),
        (_anthropic(temperature=HUGE), "'temperature' must be a number"),
        (_anthropic(top_p={}), "'top_p' must be a number"),
        (_anthropic(tools=2.5), "'tools' must be an array"),
        (_anthropic(tools=[{"name": "f", "input_schema": []}]), "'tools.0.input_schema' must be an object"),
        (_anthropic(tools=[{"name": 5, "input_schema": {}}]), "'tools.0.name' must be a string"),
        (_anthropic(tools=[{"type": 5, "name": "f", "input_schema": {}}]), "'tools.0.type' must be a string"),
        (_anthropic(messages="x"), "'messages' must be a non-empty array"),
        (_anthropic(messages=[None]), "'messages.0' must be an object"),
        (_anthropic(messages=[{"role": "user", "content": 5}]), "'messages.0.content' must be a string or an array"),
        (_anthropic(messages=[{"role": "user", "content": [[]]}]), "'messages.0.content.0' must be an object"),
        (
            _anthropic(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
            "'messages.0.content.0.text' must be a string",
        ),
        (
            _anthropic(messages=[{"role": "user", "content": [{"type": "image", "source": "x"}]}]),
            "'messages.0.content.0.source' must be an object",
        ),
        (
            _anthropic(
                messages=[
                    {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": 5}}]}
                ]
            ),
            "'messages.0.content.0.source.media_type' must be a string",
        ),
        (
            _anthropic(
                messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 5}]}]
            ),
            "'messages.0.content.0.content' must be a string or an array of text blocks",
        ),
        (
            _anthropic(
                messages=[
                    USER,
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": []}]},
                    USER,
                ]
            ),
            "'messages.1.content.0.input' must be an object",
        ),
        (
            _anthropic(
                messages=[
                    USER,
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"n": HUGE}}],
                    },
                    USER,
                ]
            ),
            "'messages.1.content.0.input' holds an integer beyond 64 bits",
        ),
        (_anthropic(max_tokens="10"), "'max_tokens' must be an integer from 1 to 2147483647"),
        (_anthropic(max_tokens=HUGE), "'max_tokens' must be an integer from 1 to 2147483647"),
        (_anthropic(stream="yes"), "'stream' must be a boolean"),
        (_anthropic(tool_choice="auto"), "'tool_choice' must be an object"),
        (_anthropic(tool_choice={"type": 5}), "'tool_choice.type' must be a string"),
        (_anthropic(tool_choice={"type": "tool", "name": 5}), "'tool_choice.name' must be a string"),
        (
            _anthropic(tool_choice={"type": "auto", "disable_parallel_tool_use": "yes"}),
            "'tool_choice.disable_parallel_tool_use' must be a boolean",
        ),
        (_anthropic(system=5), "'system' must be a string or an array of text blocks"),
        (_anthropic(system=[{"type": "text"}]), "'system.0.text' must be a string"),
        (_anthropic(metadata=[]), "'metadata' must be an object"),
        (_anthropic(metadata={"user_id": 5}), "'metadata.user_id' must be a string"),
        (_anthropic(thinking="on"), "'thinking' must be an object"),
        (_anthropic(thinking={"type": 5}), "'thinking.type' must be a string"),
    ],
)
def test_wrong_typed_anthropic_field_is_named(body: dict[str, Any], message: str) -> None:
    with pytest.raises(TranslationError) as caught:
        a2o.request(body, model="m")
    assert caught.value.message == message


@pytest.mark.parametrize("body", [None, 5, "x", [], [USER]])
def test_a_body_that_is_not_an_object_is_refused(body: Any) -> None:
    for translate in (to_anthropic, to_openai):
        with pytest.raises(TranslationError, match="the request body must be a JSON object"):
            translate(body)


# ---------------------------------------------------------------------------------------------------
# what the parser hands over: duplicate keys and integers beyond 64 bits


def test_duplicate_keys_mean_the_last_value_in_both_directions() -> None:
    # orjson keeps the last of duplicate keys (as Python's json and the providers' parsers do), so the
    # translators see one value and translate it like the provider would have read the untranslated body.
    openai_body = orjson.loads(
        b'{"model": "m", "stop": 5, "messages": [{"role": "user", "content": "hi"}], "stop": "E"}'
    )
    assert o2a.request(openai_body, model="m")["stop_sequences"] == ["E"]
    anthropic_body = orjson.loads(
        b'{"max_tokens": "x", "messages": [{"role": "user", "content": 1, "content": "hi"}], "max_tokens": 7}'
    )
    assert a2o.request(anthropic_body, model="m")["max_completion_tokens"] == 7
    assert a2o.request(anthropic_body, model="m")["messages"] == [{"role": "user", "content": "hi"}]


def test_integers_beyond_64_bits_arrive_as_floats_and_are_refused_where_an_integer_is_needed() -> None:
    # orjson reads an integer beyond 64 bits as the nearest float (decision.py parses the body with it):
    # a schema bound becomes a float (lossy, but the value is one no provider could use exactly either);
    # a token limit stops being an integer and is refused by name.
    body = orjson.loads(
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 123456789012345678901234567890,'
        b'"tools": [{"type": "function", "function": {"name": "f", "parameters": '
        b'{"maximum": 123456789012345678901234567890, "minimum": 18446744073709551615}}}]}'
    )
    with pytest.raises(TranslationError, match="'max_tokens' must be an integer"):
        o2a.request(body, model="m")
    del body["max_tokens"]
    schema = o2a.request(body, model="m")["tools"][0]["input_schema"]
    assert schema == {"maximum": 1.2345678901234568e29, "minimum": 18446744073709551615}
    assert b"18446744073709551615" in orjson.dumps(schema)  # u64 still round-trips exactly


def test_a_64_bit_tool_input_keeps_every_digit() -> None:
    body = _anthropic(
        messages=[
            USER,
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"n": 2**64 - 1}}]},
            USER,
        ]
    )
    arguments = a2o.request(body, model="m")["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert arguments == '{"n":18446744073709551615}'
    assert o2a.request(a2o.request(body, model="m"), model="m")["messages"][1]["content"][0]["input"] == {
        "n": 2**64 - 1
    }
