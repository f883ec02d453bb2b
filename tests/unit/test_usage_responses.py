"""Usage of OpenAI Responses API answers (``UsageTracker("openai_responses", ...)``), and of legacy completions.

Bytes come from the mock provider: its Responses event generator called with a fixed response object
(deterministic, byte-exact) and the mock served over HTTP (real network chunks, cut streams). A Responses
stream is only complete at a terminal ``response.completed`` or ``response.incomplete``; anything cut
before is estimated from the text deltas seen. The tracker never changes a Responses stream's bytes, so
every test also checks that what it forwards is what it was fed. A fuzz test feeds mutated streams and
bodies in random chunkings: the tracker never raises and forwards every byte.
"""

from __future__ import annotations

import math
import random
from typing import Any

import httpx
import orjson
import pytest

from devtools import mock_provider as mock
from extproc.core import usage as usage_module
from extproc.core.usage import RESPONSES, Usage, UsageTracker, estimate_request_tokens
from tests.chunking import split
from tests.unit.test_usage import CHUNKINGS, crlf, fetch, http, run, sse_events

__all__ = ["http"]  # the served mock, a module-scoped fixture of test_usage

INSTRUCTIONS = "You are terse."
USER_TEXT = "one two three four five six seven eight nine ten"
REPLY = "mock reply from gpt-4o: one two three four five six seven eight"
PROMPT = math.ceil((len(INSTRUCTIONS) + len(USER_TEXT)) / 4)  # what the mock charges: instructions + input text
COMPLETION = len(REPLY.split())
USAGE = Usage(PROMPT, COMPLETION)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def request_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "instructions": INSTRUCTIONS, "input": USER_TEXT, **extra}


def final_response(output: list[dict[str, Any]], usage: dict[str, Any] | None, status: str = "completed"
                   ) -> dict[str, Any]:
    """A completed response object as the mock builds it, with fixed ids and time."""
    final = mock._response_object(request_body(), "resp_fixed", 1_700_000_000, [])
    final.update(status=status, completed_at=1_700_000_000, output=output, usage=usage)
    return final


def text_output(text: str = REPLY) -> list[dict[str, Any]]:
    return [{"id": "msg_fixed", "type": "message", "status": "completed", "role": "assistant",
             "content": [mock._output_text_part(text)]}]


def call_output(arguments: str = '{"city":"Paris"}') -> list[dict[str, Any]]:
    return [{"id": "fc_fixed", "type": "function_call", "status": "completed", "arguments": arguments,
             "call_id": "call_fixed", "name": "get_weather"}]


def responses_stream(output: list[dict[str, Any]] | None = None, usage: dict[str, Any] | None = None) -> bytes:
    final = final_response(text_output() if output is None else output,
                           mock._responses_usage(PROMPT, COMPLETION) if usage is None else usage)
    return b"".join(mock._response_events(final))


def tracker(streaming: bool = True) -> UsageTracker:
    return UsageTracker(RESPONSES, streaming=streaming)


def test_the_format_string_is_the_one_the_decision_uses() -> None:
    assert RESPONSES == "openai_responses" and RESPONSES in usage_module.FORMATS
    assert responses_stream() == responses_stream()  # deterministic given fixed ids: exact comparisons hold


# ---------------------------------------------------------------------------------------------------
# JSON bodies


@pytest.mark.parametrize("how", CHUNKINGS)
def test_json_answer(http: httpx.Client, how: str) -> None:
    network = fetch(http, "/v1/responses", request_body())
    body = b"".join(network)
    for chunks in (network, split(body, how)):
        observed = tracker(streaming=False)
        assert [observed.feed(chunk) for chunk in chunks] == chunks  # JSON is never held or changed
        assert observed.usage is None  # read once, at the end
        assert observed.finish() == b""
        assert observed.usage == USAGE and observed.complete
        assert observed.output_text_chars == len(REPLY)
        assert observed.estimate(999) == USAGE


def test_json_function_call_answer(http: httpx.Client) -> None:
    body = request_body(input="use get_weather for Paris", tools=[WEATHER])
    answer = orjson.loads(b"".join(fetch(http, "/v1/responses", body)))
    call = answer["output"][0]
    assert call["type"] == "function_call"
    observed = tracker(streaming=False)
    run(observed, split(orjson.dumps(answer), "seed-2"))
    assert observed.complete
    assert observed.usage == Usage(answer["usage"]["input_tokens"], answer["usage"]["output_tokens"])
    assert observed.output_text_chars == len(call["name"]) + len(call["arguments"])


def test_json_cached_reasoning_and_cache_write_details() -> None:
    body = orjson.dumps({"status": "completed", "output": [], "usage": {
        "input_tokens": 100, "input_tokens_details": {"cached_tokens": 64, "cache_write_tokens": 20},
        "output_tokens": 40, "output_tokens_details": {"reasoning_tokens": 30}, "total_tokens": 140}})
    observed = tracker(streaming=False)
    run(observed, [body])
    # The Responses API's input_tokens already include the cached ones (unlike Anthropic's).
    assert observed.usage == Usage(100, 40, cached_input_tokens=64, cache_creation_input_tokens=20,
                                   reasoning_tokens=30)
    # Details may be null or missing altogether.
    observed = tracker(streaming=False)
    run(observed, [b'{"usage":{"input_tokens":7,"output_tokens":2,"input_tokens_details":null}}'])
    assert observed.usage == Usage(7, 2) and observed.complete


@pytest.mark.parametrize("status", ["failed", "queued", "in_progress"])
def test_json_answer_that_is_not_finished_is_not_complete(status: str) -> None:
    # A background response comes back queued; a failed one may carry the usage of what it did.
    body = orjson.dumps({"status": status, "output": text_output("abcd"),
                         "usage": {"input_tokens": 9, "output_tokens": 3}})
    observed = tracker(streaming=False)
    run(observed, [body])
    assert not observed.complete
    assert observed.usage == Usage(9, 3)
    assert observed.estimate(1) == Usage(9, 3, reported=False)


def test_json_incomplete_answer_is_complete() -> None:
    body = orjson.dumps({"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"},
                         "output": text_output("ab"), "usage": {"input_tokens": 9, "output_tokens": 16}})
    observed = tracker(streaming=False)
    run(observed, [body])
    assert observed.complete and observed.usage == Usage(9, 16)


def test_json_reasoning_and_refusal_output_count_as_output() -> None:
    output = [
        {"type": "reasoning", "id": "rs", "summary": [{"type": "summary_text", "text": "think"}]},
        {"type": "message", "content": [{"type": "refusal", "refusal": "no"}, {"type": "output_text", "text": "x"}]},
        {"type": "custom_tool_call", "name": "f", "input": "abc"},
    ]
    observed = tracker(streaming=False)
    run(observed, [orjson.dumps({"output": output})])
    assert observed.output_text_chars == len("think") + len("no") + len("x") + len("f") + len("abc")
    assert observed.usage is None and observed.estimate(3) == Usage(3, 3, reported=False)


# ---------------------------------------------------------------------------------------------------
# streams


@pytest.mark.parametrize("how", CHUNKINGS)
def test_stream(how: str) -> None:
    stream = responses_stream()
    # Stripping applies to chat streams only; asking for it here must not change a byte.
    observed = UsageTracker(RESPONSES, streaming=True, strip_injected_usage=True)
    assert run(observed, split(stream, how)) == stream
    assert observed.usage == USAGE and observed.complete
    assert observed.output_text_chars == len(REPLY)  # deltas only: the .done events repeat the text


def test_served_stream(http: httpx.Client) -> None:
    chunks = fetch(http, "/v1/responses", request_body(stream=True))
    observed = tracker()
    assert run(observed, chunks) == b"".join(chunks)
    assert observed.usage == USAGE and observed.complete
    assert observed.output_text_chars == len(REPLY)


@pytest.mark.parametrize("how", ["whole", "bytes", "seed-2"])
def test_function_call_stream(how: str) -> None:
    arguments = '{"city":"Paris, France"}'
    stream = responses_stream(call_output(arguments), mock._responses_usage(PROMPT, 7))
    assert b"response.function_call_arguments.delta" in stream
    observed = tracker()
    assert run(observed, split(stream, how)) == stream
    assert observed.output_text_chars == len(arguments)
    assert observed.usage == Usage(PROMPT, 7) and observed.complete


def test_crlf_and_nameless_events() -> None:
    stream = responses_stream()
    observed = tracker()
    assert run(observed, split(crlf(stream), "bytes")) == crlf(stream)
    assert observed.usage == USAGE and observed.output_text_chars == len(REPLY)

    # Event names are optional in SSE; the data's own "type" (which OpenAI writes first) still says what it is.
    nameless = b"".join(event.split(b"\n", 1)[1] for event in sse_events(stream))
    assert not nameless.startswith(b"event:")
    observed = tracker()
    assert run(observed, split(nameless, "seed-3")) == nameless
    assert observed.usage == USAGE and observed.output_text_chars == len(REPLY)


def test_every_kind_of_generated_text_counts() -> None:
    def event(kind: str, **fields: Any) -> bytes:
        return mock._sse(kind, {"type": kind, "sequence_number": 0, **fields})

    stream = b"".join([
        event("response.reasoning_summary_text.delta", delta="sum"),
        event("response.reasoning_summary_text.done", text="sum"),  # repeats: not counted again
        event("response.reasoning_text.delta", delta="raw"),
        event("response.refusal.delta", delta="no"),
        event("response.custom_tool_call_input.delta", delta="in"),
        event("response.function_call_arguments.delta", delta="{}"),
        event("response.output_text.delta", delta="text"),
        event("response.output_text.done", text="text"),
        event("response.audio.delta", delta="QUJD"),  # audio is not text
    ])
    observed = tracker()
    run(observed, split(stream, "bytes"))
    assert observed.output_text_chars == len("sum" "raw" "no" "in" "{}" "text")
    assert not observed.complete


def test_incomplete_is_terminal_and_its_usage_final() -> None:
    final = final_response(text_output("cut sh"), mock._responses_usage(PROMPT, 16), status="incomplete")
    final["incomplete_details"] = {"reason": "max_output_tokens"}
    events = list(mock._response_events(final))
    events[-1] = events[-1].replace(b"response.completed", b"response.incomplete")
    observed = tracker()
    run(observed, split(b"".join(events), "seed-1"))
    assert observed.complete and observed.usage == Usage(PROMPT, 16)


def test_failed_stream_keeps_its_usage_but_is_not_complete() -> None:
    events = sse_events(responses_stream())
    failed = events[-1].replace(b"response.completed", b"response.failed").replace(
        b'"status":"completed"', b'"status":"failed"')
    observed = tracker()
    run(observed, [*events[:-1], failed])
    assert not observed.complete
    assert observed.usage == USAGE  # what the failed response reported: the floor of the estimate
    assert observed.estimate(1) == Usage(PROMPT, max(COMPLETION, math.ceil(len(REPLY) / 4)), reported=False)


def test_error_event_ends_nothing_complete() -> None:
    error = mock._sse("error", {"type": "error", "sequence_number": 5, "code": "server_error", "message": "x",
                                "param": None, "error": {"type": "server_error", "message": "x"}})
    events = sse_events(responses_stream())
    deltas = [event for event in events if b"output_text.delta" in event][:3]
    observed = tracker()
    run(observed, [*events[:2], *events[2:4], *deltas, error])
    assert not observed.complete and observed.usage is None
    seen = sum(len(orjson.loads(d.split(b"data: ", 1)[1])["delta"]) for d in deltas)
    assert observed.estimate(PROMPT) == Usage(PROMPT, math.ceil(seen / 4), reported=False)


def test_terminal_event_without_usage_counts_its_output() -> None:
    final = final_response(text_output("x" * 40), None)
    last = list(mock._response_events(final))[-1]
    observed = tracker()
    run(observed, [last])
    assert not observed.complete and observed.output_text_chars == 40
    assert observed.estimate(3) == Usage(3, 10, reported=False)


@pytest.mark.parametrize("cut_after", [0, 2, 5, 8])
def test_cut_stream_is_estimated(http: httpx.Client, cut_after: int) -> None:
    # Over HTTP: created, in_progress, item added, part added, then one delta per word.
    chunks = fetch(http, "/v1/responses", request_body(stream=True), {"x-mock-cut-after": str(cut_after)})
    observed = tracker()
    assert run(observed, chunks) == b"".join(chunks)
    assert not observed.complete and observed.usage is None
    seen = len(" ".join(REPLY.split(" ")[: max(0, cut_after - 4)]))
    assert observed.output_text_chars == seen
    assert observed.estimate(PROMPT) == Usage(PROMPT, math.ceil(seen / 4), reported=False)


def test_cut_mid_event_and_unterminated_last_event() -> None:
    stream = responses_stream()
    cut = stream.index(b'"delta":" three"')
    observed = tracker()
    assert run(observed, split(stream[:cut], "seed-5")) == stream[:cut]
    assert observed.output_text_chars == len("mock reply from gpt-4o: one two")
    assert not observed.complete

    # The terminal event without its blank line, then the end: it is still read (and forwarded as sent).
    observed = tracker()
    assert run(observed, split(stream.rstrip(b"\n"), "bytes")) == stream.rstrip(b"\n")
    assert observed.complete and observed.usage == USAGE


def test_only_the_events_that_matter_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    real = usage_module.orjson.loads

    def counting(data: bytes) -> Any:
        parsed.append(bytes(data))
        return real(data)

    monkeypatch.setattr(usage_module.orjson, "loads", counting)
    stream = responses_stream()
    events = sse_events(stream)
    run(tracker(), [stream])
    wanted = [e for e in events if b"output_text.delta" in e.split(b"\n")[0] or b"response.completed" in e]
    assert len(parsed) == len(wanted) == len(REPLY.split(" ")) + 1 < len(events)


# ---------------------------------------------------------------------------------------------------
# odd input never raises and is forwarded untouched


_ODD_EVENTS = [
    b"event: response.completed\ndata: {not json\n\n",
    b"event: response.completed\ndata: 42\n\n",
    b'event: response.completed\ndata: {"type":"response.completed","response":null}\n\n',
    b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":[1]}}\n\n',
    b'event: response.completed\ndata: {"type":"response.completed","response":{"output":{"a":1}}}\n\n',
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":5}\n\n',
    b'event: response.output_text.delta\ndata: {"type":7}\n\n',
    b'data: {"type":"response.output_text.delta"\n\n',
    b'data: {"type":"response.failed","response":{"usage":{"input_tokens":"many"}}}\n\n',
    b"event: response.incomplete\n\n",
    b": keep-alive\n\n",
    b"\xff\xfe\n\n",
]


@pytest.mark.parametrize("seed", range(4))
def test_fuzzed_streams_and_bodies_never_raise_and_pass_through(seed: int) -> None:
    rng = random.Random(f"usage-responses-{seed}")
    base = [responses_stream(), responses_stream(call_output(), mock._responses_usage(3, 4))]
    for case in range(400):
        events = sse_events(rng.choice(base))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(events))
            roll = rng.randrange(4)
            if roll == 0:
                events.insert(at, rng.choice(_ODD_EVENTS))
            elif roll == 1:
                del events[at]
            elif roll == 2:
                cut = rng.randrange(len(events[at]))
                events[at] = events[at][:cut] + bytes([rng.randrange(256)]) + events[at][cut + 1 :]
            else:
                events[at] = events[at].replace(b'"usage":{', b'"usage":{"input_tokens":' + rng.choice(
                    [b"null", b"-3", b"1e400", b"true", b'"9"', b"123456789012345678901234567890"]) + b",")
        stream = b"".join(events)
        if rng.random() < 0.2:
            stream = stream[: rng.randrange(len(stream))]
        how = rng.choice(["whole", "bytes", "halves", f"seed-{case}"]) if len(stream) > 1 else "whole"
        for streaming in (True, False):
            observed = tracker(streaming)
            try:
                forwarded = run(observed, split(stream, how) if stream else [])
                estimate = observed.estimate(5)
            except Exception as exc:
                pytest.fail(f"{type(exc).__name__}: {exc} for case {case}: {stream[:500]!r}")
            assert forwarded == stream, case
            assert estimate.input_tokens >= 0 and estimate.output_tokens >= 0


# ---------------------------------------------------------------------------------------------------
# request-side estimate


def test_request_estimate_matches_what_the_mock_charges(http: httpx.Client) -> None:
    for body in (
        request_body(),
        request_body(input=[{"role": "developer", "content": "abcd"},
                            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "efgh"}]}]),
        request_body(input=[
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"P"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "18C and sunny"},
        ]),
    ):
        answer = orjson.loads(b"".join(fetch(http, "/v1/responses", body)))
        # The decision passes the caller's body format; the plain "openai" name reads the same fields.
        assert estimate_request_tokens(body, RESPONSES) == answer["usage"]["input_tokens"], body
        assert estimate_request_tokens(body, "openai") == answer["usage"]["input_tokens"], body


def test_request_estimate_counts_tools_and_output_parts() -> None:
    plain = {"model": "m", "input": "hi"}
    assert estimate_request_tokens({**plain, "tools": [WEATHER]}, RESPONSES) > estimate_request_tokens(plain, RESPONSES)
    parts = {"input": [{"type": "function_call_output", "call_id": "c", "output": [
        {"type": "input_text", "text": "a" * 8}, {"type": "input_image", "image_url": "data:" + "x" * 999}]}]}
    assert estimate_request_tokens(parts, RESPONSES) == 2  # images are not text


@pytest.mark.parametrize("body", [
    {}, {"input": None}, {"input": [None, {}, 1.5, {"content": 5, "output": {}, "arguments": 3}]},
    {"instructions": 5, "input": {"a": 1}}, {"prompt": [None, [1, 2], "ab"]}, [],
])
def test_request_estimate_tolerates_odd_shapes(body: Any) -> None:
    assert estimate_request_tokens(body, RESPONSES) >= 1


# ---------------------------------------------------------------------------------------------------
# legacy completions (read as "openai")


def test_legacy_completion_json_and_stream(http: httpx.Client) -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "say this is a test"}
    answer = b"".join(fetch(http, "/v1/completions", body))
    text = orjson.loads(answer)["choices"][0]["text"]
    observed = UsageTracker("openai", streaming=False)
    run(observed, [answer])
    assert observed.usage == Usage(math.ceil(len(body["prompt"]) / 4), len(text.split()))
    assert observed.output_text_chars == len(text)
    assert estimate_request_tokens(body, "openai") == observed.usage.input_tokens

    chunks = fetch(http, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    observed = UsageTracker("openai", streaming=True)
    run(observed, chunks)
    assert observed.complete and observed.usage == Usage(math.ceil(len(body["prompt"]) / 4), len(text.split()))
    assert observed.output_text_chars == len(text)

    # Cut before the usage chunk: the text seen so far is the estimate.
    chunks = fetch(http, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}},
                   {"x-mock-cut-after": "2"})
    observed = UsageTracker("openai", streaming=True, strip_injected_usage=True)
    run(observed, chunks)
    assert not observed.complete and observed.output_text_chars == len("mock reply")
