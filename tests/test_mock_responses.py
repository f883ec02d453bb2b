"""The mock provider's Responses API, legacy completions, models lists and token counting, driven by the SDKs.

As in test_mock_provider.py, the official ``openai`` and ``anthropic`` SDKs are used unmodified (only
``base_url``, ``api_key`` and ``max_retries=0``), so any drift in JSON shape, SSE framing, status codes
or error envelopes shows up as an SDK parse error or a wrong exception class; the installed SDK's own
pydantic models validate bodies and every stream event strictly. Raw ``httpx`` checks what the SDKs
hide: event names, sequence numbers, exact error messages and params.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from openai.types import Completion
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from devtools.mock_provider import DEFAULT_ANTHROPIC_MODELS, DEFAULT_OPENAI_MODELS, MockConfig
from tests.test_mock_provider import (
    ANTHROPIC_HEADERS,
    ANTHROPIC_KEY,
    OPENAI_AUTH,
    OPENAI_KEY,
    USER_TEXT,
    _aiohttp_problems,
    _exception_chain,
    _MockServer,
)

EVENT = TypeAdapter(ResponseStreamEvent)
INSTRUCTIONS = "You are terse."
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["c", "f"]},
            "days": {"type": "integer"},
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": False,
    },
    "strict": True,
}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}


@pytest.fixture(scope="module")
def server() -> Iterator[_MockServer]:
    mock = _MockServer(MockConfig(openai_key=OPENAI_KEY, anthropic_key=ANTHROPIC_KEY, name="mock-responses")).start()
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


def tokens(*texts: str) -> int:
    return max(1, math.ceil(sum(len(t) for t in texts) / 4))


def raw_events(raw: httpx.Client, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """A Responses stream as named events: each `event:` line must repeat its data's type."""
    with raw.stream("POST", "/v1/responses", headers={**OPENAI_AUTH, **(headers or {})},
                    json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = []
    assert text.endswith("\n\n")
    for block in text[:-2].split("\n\n"):
        name_line, data_line = block.split("\n")
        payload = orjson.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {payload['type']}"
        EVENT.validate_python(payload)
        events.append(payload)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


# ---------------------------------------------------------------------------------------------------
# POST /v1/responses


def test_responses_json(oai: openai.OpenAI, raw: httpx.Client) -> None:
    answer = oai.responses.create(model="gpt-4o", instructions=INSTRUCTIONS, input=USER_TEXT)
    assert answer.status == "completed" and answer.model == "gpt-4o"
    assert answer.id.startswith("resp_") and answer.output[0].id.startswith("msg_")
    assert answer.output_text == "mock reply from gpt-4o: one two three four five six seven eight"
    assert answer.instructions == INSTRUCTIONS and answer.store is True and answer.tools == []
    assert answer.usage is not None
    assert answer.usage.input_tokens == tokens(INSTRUCTIONS, USER_TEXT)
    assert answer.usage.output_tokens == len(answer.output_text.split())
    assert answer.usage.total_tokens == answer.usage.input_tokens + answer.usage.output_tokens

    response = raw.post("/v1/responses", headers=OPENAI_AUTH, json={"model": "gpt-4o", "input": "hi"})
    assert response.status_code == 200
    assert response.headers["x-mock-provider"] == "mock-responses" and "openai-processing-ms" in response.headers
    Response.model_validate(response.json())  # strict validation, not the SDK's lenient construction
    assert response.json()["output"][0]["content"] == [
        {"type": "output_text", "annotations": [], "logprobs": [], "text": "mock reply from gpt-4o: hi"}]


def test_responses_input_items_of_every_shape(oai: openai.OpenAI) -> None:
    answer = oai.responses.create(
        model="gpt-4o",
        input=[
            {"role": "developer", "content": "Be kind."},
            {"role": "user", "content": "an earlier question"},
            {"role": "assistant", "content": "an earlier answer"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": USER_TEXT}]},
        ],
    )
    assert answer.output_text.endswith(": one two three four five six seven eight")
    assert answer.usage is not None
    assert answer.usage.input_tokens == tokens("Be kind.", "an earlier question", "an earlier answer", USER_TEXT)


def test_responses_stream_text(oai: openai.OpenAI, raw: httpx.Client) -> None:
    with oai.responses.stream(model="gpt-4o", input=USER_TEXT) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    words = len(final.output_text.split(" "))
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * words,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert final.output_text == "mock reply from gpt-4o: one two three four five six seven eight"
    assert final.usage is not None and final.usage.output_tokens == words

    events = raw_events(raw, {"model": "gpt-4o", "input": "x y"})
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert all(isinstance(e["obfuscation"], str) and e["logprobs"] == [] for e in deltas)  # padding, by default
    plain = raw_events(raw, {"model": "gpt-4o", "input": "x y", "stream_options": {"include_obfuscation": False}})
    assert not any("obfuscation" in e for e in plain)
    created, completed = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    assert completed["status"] == "completed" and completed["id"] == created["id"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == (
        completed["output"][0]["content"][0]["text"])
    # The stored response is the completed one.
    assert oai.responses.retrieve(completed["id"]).model_dump(exclude_none=True) == Response.model_validate(
        completed).model_dump(exclude_none=True)


def test_responses_function_call(oai: openai.OpenAI, raw: httpx.Client) -> None:
    answer = oai.responses.create(model="gpt-4o", input="use get_weather for Paris", tools=[TIME, WEATHER])
    call = answer.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    # Every required property, of its schema's type (the first enum value where there is one).
    assert orjson.loads(call.arguments) == {"city": "mock", "unit": "c", "days": 1}
    assert [tool.name for tool in answer.tools] == ["get_time", "get_weather"]
    assert answer.tools[0].strict is True  # echoed with the API's default

    with oai.responses.stream(model="gpt-4o", input="use get_weather for Paris", tools=[WEATHER]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    streamed = final.output[0]
    assert streamed.type == "function_call" and streamed.parsed_arguments == {"city": "mock", "unit": "c", "days": 1}

    events = raw_events(raw, {"model": "gpt-4o", "input": "use get_weather", "tools": [WEATHER]})
    added = events[2]["item"]
    assert added["arguments"] == "" and added["status"] == "in_progress"
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert deltas == done["arguments"] == events[-1]["response"]["output"][0]["arguments"]


@pytest.mark.parametrize(
    ("tools", "choice", "prompt", "called"),
    [
        ([WEATHER], None, "hello there", None),  # not asked for: text
        ([WEATHER], "none", "use get_weather", None),
        ([TIME, WEATHER], "required", "hello", "get_time"),  # a call is required: the first function
        ([TIME, WEATHER], {"type": "function", "name": "get_weather"}, "hello", "get_weather"),
        ([TIME, WEATHER], "auto", "what does get_time say", "get_time"),
        ([], "auto", "use get_weather", None),
        ([{"type": "web_search"}], "auto", "use web_search", None),  # only functions are called
    ],
)
def test_when_the_mock_calls_a_function(
    oai: openai.OpenAI, tools: list[Any], choice: Any, prompt: str, called: str | None
) -> None:
    extra = {} if choice is None else {"tool_choice": choice}
    answer = oai.responses.create(model="gpt-4o", input=prompt, tools=tools, **extra)
    item = answer.output[0]
    assert (item.name if item.type == "function_call" else None) == called


def test_function_call_output_continues_a_stored_response(oai: openai.OpenAI) -> None:
    first = oai.responses.create(model="gpt-4o", instructions=INSTRUCTIONS, input="use get_weather", tools=[WEATHER])
    call = first.output[0]
    assert call.type == "function_call"
    second = oai.responses.create(
        model="gpt-4o",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"}],
        tools=[WEATHER],
    )
    assert second.output_text == "mock reply from gpt-4o: 18C and sunny"
    assert second.previous_response_id == first.id
    # The stored conversation is input again: the first turn's input and call, then the new output.
    assert second.usage is not None
    assert second.usage.input_tokens == tokens("use get_weather", f"get_weather {call.arguments}", "18C and sunny")

    # Stateless, the same continuation sends the call itself.
    third = oai.responses.create(
        model="gpt-4o",
        input=[
            {"role": "user", "content": "use get_weather"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"},
        ],
        tools=[WEATHER],
    )
    assert third.output_text == second.output_text


def test_previous_response_and_call_ids_must_exist(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.responses.create(model="gpt-4o", previous_response_id="resp_missing", input="x")
    assert info.value.code == "previous_response_not_found" and info.value.param == "previous_response_id"
    assert info.value.body["message"] == "Previous response with id 'resp_missing' not found."
    with pytest.raises(openai.BadRequestError) as info:
        orphan = {"type": "function_call_output", "call_id": "call_x", "output": "1"}
        oai.responses.create(model="gpt-4o", input=[orphan])
    assert info.value.body["message"] == (
        "No tool call found for function call output with call_id call_x.")


def test_retrieve_delete_and_input_items(oai: openai.OpenAI, raw: httpx.Client) -> None:
    items = [{"role": "user", "content": f"message {n}"} for n in range(5)]
    created = oai.responses.create(model="gpt-4o", input=items)
    assert oai.responses.retrieve(created.id) == created

    listed = oai.responses.input_items.list(created.id)
    assert [item.content[0].text for item in listed.data] == [f"message {n}" for n in reversed(range(5))]  # desc
    assert all(item.id.startswith("msg_") and item.type == "message" for item in listed.data)
    ascending = oai.responses.input_items.list(created.id, order="asc", limit=2)
    assert ascending.has_more and [i.content[0].text for i in ascending.data] == ["message 0", "message 1"]
    # The SDK's auto-pagination follows `after` through every page.
    assert [i.content[0].text for i in oai.responses.input_items.list(created.id, order="asc", limit=2)] == [
        f"message {n}" for n in range(5)]
    page = raw.get(f"/v1/responses/{created.id}/input_items", params={"limit": 2}, headers=OPENAI_AUTH).json()
    assert set(page) == {"object", "data", "first_id", "last_id", "has_more"} and page["object"] == "list"
    assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]

    deleted = raw.delete(f"/v1/responses/{created.id}", headers=OPENAI_AUTH)
    assert deleted.json() == {"id": created.id, "object": "response", "deleted": True}
    for call in (oai.responses.retrieve, oai.responses.delete, oai.responses.input_items.list):
        with pytest.raises(openai.NotFoundError) as info:
            call(created.id)
        assert info.value.body["message"] == f"Response with id '{created.id}' not found."
        assert info.value.type == "invalid_request_error"

    other = oai.responses.create(model="gpt-4o", input="x")
    assert oai.responses.delete(other.id) is None  # the SDK's delete returns nothing


def test_store_false_is_not_stored_and_cancel_needs_background(oai: openai.OpenAI) -> None:
    unstored = oai.responses.create(model="gpt-4o", input="x", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError, match="Only responses created with background=true"):
        oai.responses.cancel(oai.responses.create(model="gpt-4o", input="x").id)
    background = oai.responses.create(model="gpt-4o", input="x", background=True)
    assert oai.responses.cancel(background.id).id == background.id


@pytest.mark.parametrize(
    ("body", "message", "param", "code"),
    [
        ({"model": "gpt-4o"}, "Missing required parameter: 'input'.", "input", "missing_required_parameter"),
        ({"input": "x"}, "you must provide a model parameter", None, None),
        ({"model": "gpt-4o", "input": 5},
         "Invalid type for 'input': expected one of a string or an array of input items, but got an integer instead.",
         "input", "invalid_type"),
        ({"model": "gpt-4o", "input": [5]},
         "Invalid type for 'input[0]': expected an object, but got an integer instead.", "input[0]", "invalid_type"),
        ({"model": "gpt-4o", "input": [{"role": "tool", "content": "x"}]},
         "Invalid value: \"tool\". Supported values are: 'user', 'assistant', 'system', and 'developer'.",
         "input[0].role", "invalid_value"),
        ({"model": "gpt-4o", "input": [{"role": "user"}]}, "Missing required parameter: 'input[0].content'.",
         "input[0].content", "missing_required_parameter"),
        ({"model": "gpt-4o", "input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
         "Missing required parameter: 'input[0].arguments'.", "input[0].arguments", "missing_required_parameter"),
        ({"model": "gpt-4o", "input": "x", "max_output_tokens": 5},
         "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 16, but got 5 instead.",
         "max_output_tokens", "integer_below_min_value"),
        ({"model": "gpt-4o", "input": "x", "temperature": 3},
         "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 instead.",
         "temperature", "decimal_above_max_value"),
        ({"model": "gpt-4o", "input": "x", "stream": "yes"},
         "Invalid type for 'stream': expected a boolean, but got a string instead.", "stream", "invalid_type"),
        ({"model": "gpt-4o", "input": "x", "tools": [{"type": "function"}]},
         "Missing required parameter: 'tools[0].name'.", "tools[0].name", "missing_required_parameter"),
        ({"model": "gpt-4o", "input": "x", "stream_options": {"include_obfuscation": False}},
         "The 'stream_options' parameter is only allowed when 'stream' is set to true.", "stream_options", None),
    ],
)
def test_responses_validation(raw: httpx.Client, body: dict[str, Any], message: str, param: str | None,
                              code: str | None) -> None:
    response = raw.post("/v1/responses", headers=OPENAI_AUTH, json=body)
    assert response.status_code == 400
    assert response.json() == {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                         "code": code}}


def test_responses_faults(oai: openai.OpenAI, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(openai.RateLimitError) as rate:
        oai.responses.create(model="gpt-4o", input="x", extra_headers={"x-mock-status": "429"})
    assert rate.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.InternalServerError):
        oai.responses.stream(model="gpt-4o", input="x", extra_headers={"x-mock-status": "503"}).__enter__()
    with pytest.raises(openai.APIConnectionError):
        oai.responses.create(model="gpt-4o", input="x", extra_headers={"x-mock-reset": "1"})
    with pytest.raises(openai.NotFoundError):  # faults apply to the stored-response endpoints as well
        oai.responses.retrieve("resp_x", extra_headers={"x-mock-status": "404"})

    # A cut stream: the events before the cut, then the SDK raises (never a clean end).
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    kinds: list[str] = []
    with pytest.raises(openai.APIConnectionError) as info, oai.responses.stream(
        model="gpt-4o", input=USER_TEXT, extra_headers={"x-mock-cut-after": "5"}
    ) as stream:
        for event in stream:
            kinds.append(event.type)
    assert "incomplete chunked read" in _exception_chain(info.value)
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta"]
    time.sleep(0.05)
    assert _aiohttp_problems(caplog) == []


def test_auth_applies_to_every_new_endpoint(server: _MockServer, raw: httpx.Client) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong-key-000", max_retries=0) as client:
        for call in (
            lambda: client.responses.create(model="m", input="x"),
            lambda: client.responses.retrieve("resp_x"),
            lambda: client.completions.create(model="m", prompt="x"),
            lambda: client.models.list(),
        ):
            with pytest.raises(openai.AuthenticationError) as info:
                call()
            assert info.value.code == "invalid_api_key"
    with anthropic.Anthropic(base_url=server.url, api_key="sk-ant-wrong", max_retries=0) as client:
        for call in (
            lambda: client.messages.count_tokens(model="c", messages=[{"role": "user", "content": "x"}]),
            lambda: client.models.list(),
        ):
            with pytest.raises(anthropic.AuthenticationError):
                call()
    no_version = raw.post("/v1/messages/count_tokens", headers={"x-api-key": ANTHROPIC_KEY},
                          json={"model": "c", "messages": [{"role": "user", "content": "x"}]})
    assert no_version.status_code == 400
    assert no_version.json()["error"]["message"] == "anthropic-version: header is required"


def test_every_request_is_recorded(oai: openai.OpenAI, claude: anthropic.Anthropic, raw: httpx.Client) -> None:
    raw.delete("/_mock/requests")
    created = oai.responses.create(model="gpt-4o", input="x")
    oai.responses.retrieve(created.id)
    oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")
    oai.models.list()
    claude.messages.count_tokens(model="claude-3", messages=[{"role": "user", "content": "x"}])
    claude.models.list()
    records = raw.get("/_mock/requests").json()
    assert [(r["method"], r["path"], r["provider_api"]) for r in records] == [
        ("POST", "/v1/responses", "openai"),
        ("GET", f"/v1/responses/{created.id}", "openai"),
        ("POST", "/v1/completions", "openai"),
        ("GET", "/v1/models", "openai"),
        ("POST", "/v1/messages/count_tokens", "anthropic"),
        ("GET", "/v1/models", "anthropic"),
    ]
    assert records[0]["body"] == {"model": "gpt-4o", "input": "x"} and records[1]["body"] is None


def test_under_a_provider_base_path(server: _MockServer) -> None:
    with openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key=OPENAI_KEY, max_retries=0) as client:
        created = client.responses.create(model="gpt-4o", input="x")
        assert client.responses.retrieve(created.id).id == created.id
        assert [m.id for m in client.models.list()] == list(DEFAULT_OPENAI_MODELS)


# ---------------------------------------------------------------------------------------------------
# POST /v1/completions (legacy)


def test_completions_json(oai: openai.OpenAI, raw: httpx.Client) -> None:
    answer = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="say this is a test")
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-")
    assert answer.choices[0].text == "mock reply from gpt-3.5-turbo-instruct: say this is a test"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (tokens("say this is a test"), 9)

    several = oai.completions.create(model="m", prompt=["alpha", "beta gamma"], n=2, echo=True, max_tokens=3)
    assert [(c.index, c.text, c.finish_reason) for c in several.choices] == [
        (0, "alphamock reply from", "length"), (1, "alphamock reply from", "length"),
        (2, "beta gammamock reply from", "length"), (3, "beta gammamock reply from", "length")]
    assert several.usage is not None and several.usage.prompt_tokens == tokens("alpha") + tokens("beta gamma")

    tokens_prompt = raw.post("/v1/completions", headers=OPENAI_AUTH, json={"model": "m", "prompt": [[1, 2, 3]]})
    assert tokens_prompt.json()["usage"]["prompt_tokens"] == 3
    Completion.model_validate(tokens_prompt.json())


def test_completions_stream(oai: openai.OpenAI) -> None:
    chunks = list(oai.completions.create(model="m", prompt="one two", stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "mock reply from m: one two"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(oai.completions.create(model="m", prompt="x", stream=True))
    assert all(c.choices for c in plain)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": 5}, "prompt"),
        ({"model": "m", "prompt": "x", "max_tokens": "9"}, "max_tokens"),
        ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_completions_validation(raw: httpx.Client, body: dict[str, Any], param: str) -> None:
    response = raw.post("/v1/completions", headers=OPENAI_AUTH, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


# ---------------------------------------------------------------------------------------------------
# GET /v1/models (both APIs) and POST /v1/messages/count_tokens


def test_openai_models(oai: openai.OpenAI) -> None:
    models = list(oai.models.list())
    assert [m.id for m in models] == list(DEFAULT_OPENAI_MODELS)
    assert all(m.object == "model" and m.owned_by for m in models)
    assert oai.models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("gpt-nope")
    assert info.value.code == "model_not_found"


def test_anthropic_models(claude: anthropic.Anthropic) -> None:
    assert [m.id for m in claude.models.list()] == list(DEFAULT_ANTHROPIC_MODELS)
    page = claude.models.list(limit=1)
    assert [m.id for m in page.data] == [DEFAULT_ANTHROPIC_MODELS[0]] and page.has_more
    assert [m.id for m in claude.models.list(limit=1)] == list(DEFAULT_ANTHROPIC_MODELS)  # auto-paging
    info = claude.models.retrieve("claude-3")
    assert info.type == "model" and info.display_name == "Claude 3"
    with pytest.raises(anthropic.NotFoundError):
        claude.models.retrieve("claude-nope")


def test_models_lists_are_configurable() -> None:
    mock = _MockServer(MockConfig(openai_models=("a", "b"), anthropic_models=("c",))).start()
    try:
        with httpx.Client(base_url=mock.url) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["a", "b"]
            assert [m["id"] for m in client.get("/v1/models", headers=ANTHROPIC_HEADERS).json()["data"]] == ["c"]
    finally:
        mock.stop()


def test_count_tokens_is_what_messages_charges(claude: anthropic.Anthropic) -> None:
    messages = [
        {"role": "user", "content": "an earlier question"},
        {"role": "assistant", "content": [{"type": "text", "text": "an earlier answer"}]},
        {"role": "user", "content": USER_TEXT},
    ]
    counted = claude.messages.count_tokens(model="claude-3", system=INSTRUCTIONS, messages=messages)
    answered = claude.messages.create(model="claude-3", max_tokens=64, system=INSTRUCTIONS, messages=messages)
    assert counted.input_tokens == answered.usage.input_tokens == tokens(
        INSTRUCTIONS, "an earlier question", "an earlier answer", USER_TEXT)


def test_count_tokens_validation(raw: httpx.Client) -> None:
    response = raw.post("/v1/messages/count_tokens", headers=ANTHROPIC_HEADERS, json={"model": "c"})
    assert response.status_code == 400
    assert response.json()["error"] == {"type": "invalid_request_error", "message": "messages: Field required"}
