"""Usage read from real provider bytes (the mock provider's), whatever the chunking, and injected-usage stripping.

Two sources of bytes: the mock's own event generators called with fixed ids and timestamps (byte-exact
and deterministic, so "stripped stream == stream without include_usage" can be asserted exactly), and
the mock served over HTTP, whose responses arrive in real network chunks but carry a random id and the
current time; those two fields are normalised before comparing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from devtools import mock_provider as mock
from extproc.core.usage import Usage, UsageTracker, estimate_request_tokens
from tests.chunking import split

SYSTEM = "You are terse."
USER_TEXT = "one two three four five six seven eight nine ten"
OPENAI_MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER_TEXT}]
ANTHROPIC_MESSAGES = [{"role": "user", "content": USER_TEXT}]
# What the mock answers and charges for these messages: 8 words of the user text after a prefix, and
# ceil(chars / 4) prompt tokens over all message text (the system prompt included).
OPENAI_REPLY = "mock reply from gpt-4: one two three four five six seven eight"
ANTHROPIC_REPLY = "mock reply from claude-3: one two three four five six seven eight"
OPENAI_PROMPT = math.ceil((len(SYSTEM) + len(USER_TEXT)) / 4)
ANTHROPIC_PROMPT = math.ceil((len(SYSTEM) + len(USER_TEXT)) / 4)  # system passed as Anthropic `system`
COMPLETION = 12  # words in either reply

CHUNKINGS = ["whole", "bytes", "halves", "seed-1", "seed-2", "seed-3", "seed-4", "seed-5"]


def run(tracker: UsageTracker, chunks: list[bytes]) -> bytes:
    forwarded = b"".join(tracker.feed(chunk) for chunk in chunks)
    return forwarded + tracker.finish()


def openai_stream(include_usage: bool, usage: dict[str, Any] | None = None) -> bytes:
    """The mock's chat stream with a fixed id and timestamp, so two calls differ only by include_usage."""
    if usage is None:
        usage = mock._chat_usage(OPENAI_PROMPT, COMPLETION)
    events = mock._chat_events("chatcmpl-fixed", 1_700_000_000, "gpt-4", OPENAI_REPLY, usage, include_usage)
    return b"".join(events)


def anthropic_stream() -> bytes:
    return b"".join(mock._message_events("msg_01fixed", "claude-3", ANTHROPIC_REPLY, ANTHROPIC_PROMPT))


def sse_events(stream: bytes) -> list[bytes]:
    return [event + b"\n\n" for event in stream.split(b"\n\n") if event]


def crlf(stream: bytes) -> bytes:
    # The mock's JSON is compact, so every \n in its output is a line ending.
    return stream.replace(b"\n", b"\r\n")


def test_mock_streams_are_deterministic_given_fixed_ids() -> None:
    # The exact-comparison tests below rely on this: the generators take id and created as inputs.
    assert openai_stream(True) == openai_stream(True)
    assert anthropic_stream() == anthropic_stream()
    assert b'"usage":null' not in openai_stream(False)


# ---------------------------------------------------------------------------------------------------
# the mock over HTTP: real chunk boundaries


class _MockServer:
    """The mock on its own loop in a thread, as tests/test_mock_provider.py runs it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mock-provider", daemon=True)
        self.runner = web.AppRunner(mock.build_app(mock.MockConfig()), access_log=None, shutdown_timeout=1.0)
        self.url = ""

    async def _start(self) -> str:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def __enter__(self) -> _MockServer:
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with _MockServer() as server, httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def fetch(client: httpx.Client, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[bytes]:
    """The response body as the network delivered it; a cut stream yields what arrived before the cut."""
    headers = {"anthropic-version": "2023-06-01", **(headers or {})}
    chunks: list[bytes] = []
    with client.stream("POST", path, json=body, headers=headers) as response:
        assert response.status_code == 200
        with contextlib.suppress(httpx.RemoteProtocolError):  # x-mock-cut-after: the body never terminates
            for chunk in response.iter_raw():
                chunks.append(chunk)
    return chunks


def normalise(stream: bytes) -> bytes:
    # Served responses carry a random id and the wall-clock second; nothing else varies between calls.
    stream = re.sub(rb'"id":"(chatcmpl-|msg_01)[A-Za-z0-9]+"', rb'"id":"\1X"', stream)
    return re.sub(rb'"created":\d+', b'"created":0', stream)


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4", "messages": OPENAI_MESSAGES, **extra}


def messages_body(**extra: Any) -> dict[str, Any]:
    return {"model": "claude-3", "max_tokens": 64, "system": SYSTEM, "messages": ANTHROPIC_MESSAGES, **extra}


OPENAI_USAGE = Usage(OPENAI_PROMPT, COMPLETION)
ANTHROPIC_USAGE = Usage(ANTHROPIC_PROMPT, COMPLETION)


# ---------------------------------------------------------------------------------------------------
# JSON bodies


def test_usage_value() -> None:
    usage = Usage(10, 5, cached_input_tokens=4)
    assert usage.total_tokens == 15
    assert usage.reported
    with pytest.raises(AttributeError):
        usage.input_tokens = 1  # type: ignore[misc]


@pytest.mark.parametrize("how", CHUNKINGS)
def test_openai_chat_json(http: httpx.Client, how: str) -> None:
    network = fetch(http, "/v1/chat/completions", chat_body())
    body = b"".join(network)
    for chunks in (network, split(body, how)):
        tracker = UsageTracker("openai", streaming=False)
        forwarded = [tracker.feed(chunk) for chunk in chunks]
        assert forwarded == chunks  # JSON is never held or changed
        assert tracker.usage is None  # parsed only at the end
        assert tracker.finish() == b""
        assert tracker.usage == OPENAI_USAGE
        assert tracker.output_text_chars == len(OPENAI_REPLY)
        assert tracker.estimate(999) == OPENAI_USAGE


def test_openai_embeddings_json(http: httpx.Client) -> None:
    # The mock charges ceil(len / 4) per string input and one token per token id.
    body = {"model": "text-embedding-3-small", "input": ["hello world", "abc"]}
    tracker = UsageTracker("openai", streaming=False)
    run(tracker, split(b"".join(fetch(http, "/v1/embeddings", body)), "bytes"))
    assert tracker.usage == Usage(3 + 1, 0)


@pytest.mark.parametrize("how", CHUNKINGS)
def test_anthropic_json(http: httpx.Client, how: str) -> None:
    body = b"".join(fetch(http, "/v1/messages", messages_body()))
    tracker = UsageTracker("anthropic", streaming=False)
    assert run(tracker, split(body, how)) == body
    assert tracker.usage == ANTHROPIC_USAGE
    assert tracker.output_text_chars == len(ANTHROPIC_REPLY)


def test_json_cached_and_reasoning_details() -> None:
    openai_body = orjson.dumps({"choices": [], "usage": {
        "prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140,
        "prompt_tokens_details": {"cached_tokens": 64}, "completion_tokens_details": {"reasoning_tokens": 30}}})
    tracker = UsageTracker("openai", streaming=False)
    run(tracker, [openai_body])
    assert tracker.usage == Usage(100, 40, cached_input_tokens=64, reasoning_tokens=30)

    # Details may be null or missing altogether.
    tracker = UsageTracker("openai", streaming=False)
    run(tracker, [b'{"usage":{"prompt_tokens":7,"completion_tokens":2,"prompt_tokens_details":null}}'])
    assert tracker.usage == Usage(7, 2)

    # Anthropic's input_tokens excludes cache reads and writes; ours counts everything read in.
    anthropic_body = orjson.dumps({"content": [{"type": "text", "text": "hi"}], "usage": {
        "input_tokens": 10, "output_tokens": 3, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 300}})
    tracker = UsageTracker("anthropic", streaming=False)
    run(tracker, [anthropic_body])
    assert tracker.usage == Usage(330, 3, cached_input_tokens=300, cache_creation_input_tokens=20)


def test_oversized_json_reports_nothing_but_forwards_everything(http: httpx.Client) -> None:
    body = b"".join(fetch(http, "/v1/chat/completions", chat_body()))
    tracker = UsageTracker("openai", streaming=False, max_buffered_bytes=len(body) - 1)
    assert run(tracker, split(body, "seed-1")) == body
    assert tracker.usage is None
    assert tracker.estimate(42) == Usage(42, 0, reported=False)

    exact = UsageTracker("openai", streaming=False, max_buffered_bytes=len(body))
    run(exact, split(body, "seed-1"))
    assert exact.usage == OPENAI_USAGE


def test_truncated_or_invalid_json_reports_nothing() -> None:
    body = openai_json = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}})
    for broken in (body[:-3], b"not json", b"[1, 2]", b"", openai_json.replace(b'{"prompt', b'["prompt')):
        tracker = UsageTracker("openai", streaming=False)
        run(tracker, [broken])
        assert tracker.usage is None
        assert tracker.estimate(9) == Usage(9, 0, reported=False)


# ---------------------------------------------------------------------------------------------------
# OpenAI streams


@pytest.mark.parametrize("how", CHUNKINGS)
def test_openai_stream_observed_unchanged(how: str) -> None:
    stream = openai_stream(True)
    tracker = UsageTracker("openai", streaming=True)
    assert run(tracker, split(stream, how)) == stream
    assert tracker.usage == OPENAI_USAGE
    assert tracker.output_text_chars == len(OPENAI_REPLY)


@pytest.mark.parametrize("how", CHUNKINGS)
def test_openai_stream_stripped_equals_stream_without_include_usage(how: str) -> None:
    tracker = UsageTracker("openai", streaming=True, strip_injected_usage=True)
    assert run(tracker, split(openai_stream(True), how)) == openai_stream(False)
    assert tracker.usage == OPENAI_USAGE
    assert tracker.complete
    assert tracker.estimate(999) == OPENAI_USAGE  # reported, so the estimate's inputs are not used
    assert tracker.output_text_chars == len(OPENAI_REPLY)


@pytest.mark.parametrize("how", ["network", "bytes", "seed-1", "seed-2"])
def test_served_openai_stream_stripped(http: httpx.Client, how: str) -> None:
    with_usage = fetch(http, "/v1/chat/completions", chat_body(stream=True, stream_options={"include_usage": True}))
    without = b"".join(fetch(http, "/v1/chat/completions", chat_body(stream=True)))
    chunks = with_usage if how == "network" else split(b"".join(with_usage), how)
    tracker = UsageTracker("openai", streaming=True, strip_injected_usage=True)
    stripped = run(tracker, chunks)
    assert stripped != b"".join(with_usage)
    assert normalise(stripped) == normalise(without)
    assert tracker.usage == OPENAI_USAGE


def test_strip_holds_back_no_complete_event() -> None:
    events = sse_events(openai_stream(True))
    expected = sse_events(openai_stream(False))
    assert len(events) == len(expected) + 1  # the usage-only chunk
    tracker = UsageTracker("openai", streaming=True, strip_injected_usage=True)
    for event, want in zip(events[:-2], expected[:-1], strict=True):
        assert tracker.feed(event) == want  # out at once, minus "usage":null
    assert tracker.feed(events[-2]) == b""  # the usage chunk is ours
    assert tracker.feed(events[-1]) == b"data: [DONE]\n\n"
    assert tracker.finish() == b""

    # Only the incomplete tail waits, and it goes out as soon as it completes.
    tracker = UsageTracker("openai", streaming=True, strip_injected_usage=True)
    first, second = events[0], events[1]
    assert tracker.feed(first + second[:40]) == expected[0]
    assert tracker.feed(second[40:-1]) == b""
    assert tracker.feed(second[-1:]) == expected[1]


def test_strip_leaves_events_without_an_exact_usage_null_alone() -> None:
    pretty = b'data: {"id": "x", "choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": null}\n\n'
    only_member = b'data: {"usage":null}\n\n'
    first_member = b'data: {"usage":null,"choices":[{"delta":{"content":"ab"}}]}\n\n'
    nested_too = b'data: {"choices":[{"delta":{"content":"c"},"usage":null}],"usage":null}\n\n'
    ambiguous = b'data: {"choices":[{"delta":{},"usage":null}],"usage":null,"id":"x"}\n\n'
    tracker = UsageTracker("openai", streaming=True, strip_injected_usage=True)
    assert tracker.feed(pretty) == pretty
    assert tracker.feed(only_member) == only_member
    assert tracker.feed(first_member) == b'data: {"choices":[{"delta":{"content":"ab"}}]}\n\n'
    # Right before the closing brace it can only be the top-level member, whatever is nested.
    assert tracker.feed(nested_too) == b'data: {"choices":[{"delta":{"content":"c"},"usage":null}]}\n\n'
    assert tracker.feed(ambiguous) == ambiguous  # which one is ours is ambiguous: keep both
    assert tracker.output_text_chars == len("hi") + len("ab") + len("c")


def test_strip_keeps_usage_that_rides_on_a_content_chunk() -> None:
    # Some OpenAI-compatible servers attach usage to the last content chunk; it is not our empty chunk.
    event = b'data: {"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
    tracker = UsageTracker("openai", streaming=True, strip_injected_usage=True)
    assert tracker.feed(event) == event
    assert tracker.usage == Usage(3, 1)


@pytest.mark.parametrize("how", ["whole", "bytes", "seed-3"])
def test_openai_crlf_stream(how: str) -> None:
    observed = UsageTracker("openai", streaming=True)
    assert run(observed, split(crlf(openai_stream(True)), how)) == crlf(openai_stream(True))
    assert observed.usage == OPENAI_USAGE

    stripped = UsageTracker("openai", streaming=True, strip_injected_usage=True)
    assert run(stripped, split(crlf(openai_stream(True)), how)) == crlf(openai_stream(False))
    assert stripped.usage == OPENAI_USAGE
    assert stripped.output_text_chars == len(OPENAI_REPLY)


def test_mixed_line_endings_and_multi_line_data() -> None:
    usage = b'{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}'
    stream = (
        b'data: {"choices":[{"delta":{"content":"ab"}}],"usage":null}\r\n\r\n'
        b": keep-alive comment\n\n"
        b'data: {"choices":[{"delta":\ndata: {"content":"cd"}}],"usage":null}\n\n'  # data split over lines
        b"data: " + usage + b"\r\n\n"
        b"data:[DONE]\n\n"
    )
    for how in ("whole", "bytes"):
        tracker = UsageTracker("openai", streaming=True, strip_injected_usage=True)
        forwarded = run(tracker, split(stream, how))
        assert tracker.usage == Usage(4, 2)
        assert tracker.output_text_chars == 4
        assert b"prompt_tokens" not in forwarded
        assert forwarded.endswith(b"data:[DONE]\n\n")
        assert forwarded.count(b'"usage":null') == 0


def test_done_without_usage() -> None:
    # An OpenAI stream that never asked for usage: [DONE] ends it and only an estimate is possible.
    stream = openai_stream(False)
    tracker = UsageTracker("openai", streaming=True, strip_injected_usage=True)
    assert run(tracker, split(stream, "seed-2")) == stream
    assert tracker.usage is None
    assert tracker.estimate(20) == Usage(20, math.ceil(len(OPENAI_REPLY) / 4), reported=False)


def test_unterminated_final_event_is_forwarded_and_read() -> None:
    usage_event = sse_events(openai_stream(True))[-2]
    stream = b"".join(sse_events(openai_stream(True))[:-2]) + usage_event.rstrip(b"\n")
    tracker = UsageTracker("openai", streaming=True, strip_injected_usage=True)
    forwarded = b"".join(tracker.feed(chunk) for chunk in split(stream, "bytes"))
    assert b"prompt_tokens" not in forwarded  # still held: it might continue
    tail = tracker.finish()
    assert tail == usage_event.rstrip(b"\n")  # a client drops an unterminated event, so it goes as sent
    assert tracker.usage == OPENAI_USAGE
    assert tracker.finish() == b""  # idempotent: Envoy may signal the end twice (body, then trailers)
    assert tracker.feed(b"late") == b"late"


def test_unterminated_anthropic_message_delta_is_read() -> None:
    stream = anthropic_stream()
    end = stream.index(b"event: message_stop") - 2  # message_delta without its blank line, then EOF
    tracker = UsageTracker("anthropic", streaming=True)
    assert run(tracker, split(stream[:end], "bytes")) == stream[:end]
    assert tracker.usage == ANTHROPIC_USAGE


def test_malformed_events_are_ignored_and_forwarded() -> None:
    junk = (
        b"data: {not json\n\n"
        b"data: 42\n\n"
        b"data: \n\n"
        b"event: only-a-name\n\n"
        b'data: {"choices":"nope","usage":[1]}\n\n'
        b'data: {"choices":[null,{"delta":null},{"delta":{"content":7,"tool_calls":[null,{"function":{}}]}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":"many","completion_tokens":true}}\n\n'
    )
    stream = junk + openai_stream(True)
    for how in ("whole", "bytes", "seed-4"):
        observed = UsageTracker("openai", streaming=True)
        assert run(observed, split(stream, how)) == stream
        assert observed.usage == OPENAI_USAGE  # the real usage chunk, which came last, wins
        stripped = UsageTracker("openai", streaming=True, strip_injected_usage=True)
        # Junk is the caller's business: forwarded untouched except the usage-only chunk, which is dropped.
        forwarded = run(stripped, split(stream, how))
        assert forwarded == junk.replace(
            b'data: {"choices":[],"usage":{"prompt_tokens":"many","completion_tokens":true}}\n\n', b""
        ) + openai_stream(False)


def test_tool_call_arguments_count_as_output() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"get","arguments":""}}]}}]}\n\n'
        b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"q\\": 1}"}}]}}]}\n\n'
    )
    tracker = UsageTracker("openai", streaming=True)
    run(tracker, split(stream, "bytes"))
    assert tracker.output_text_chars == len("get") + len('{"q": 1}')


def test_cut_openai_stream_is_estimated(http: httpx.Client) -> None:
    # Over HTTP: the mock closes the connection after three events (role, "mock", " reply").
    chunks = fetch(http, "/v1/chat/completions", chat_body(stream=True, stream_options={"include_usage": True}),
                   {"x-mock-cut-after": "3"})
    tracker = UsageTracker("openai", streaming=True, strip_injected_usage=True)
    run(tracker, chunks)
    assert tracker.usage is None
    assert tracker.output_text_chars == len("mock reply")
    assert tracker.estimate(OPENAI_PROMPT) == Usage(OPENAI_PROMPT, math.ceil(len("mock reply") / 4), reported=False)

    # Cut mid-event: the partial event is held, then forwarded as is and not counted.
    stream = openai_stream(True)
    cut = stream.index(b'"content":" from"') + 5
    tracker = UsageTracker("openai", streaming=True, strip_injected_usage=True)
    forwarded = run(tracker, split(stream[:cut], "seed-5"))
    assert forwarded.endswith(stream[stream.rindex(b"data: ", 0, cut) : cut])
    assert tracker.output_text_chars == len("mock reply")
    estimate = tracker.estimate(100)
    assert (estimate.input_tokens, estimate.output_tokens, estimate.reported) == (100, 3, False)


def test_runaway_event_is_passed_through_not_held() -> None:
    tracker = UsageTracker("openai", streaming=True, strip_injected_usage=True, max_buffered_bytes=64)
    assert tracker.feed(b"data: " + b"x" * 40) == b""
    assert tracker.feed(b"y" * 40) == b"data: " + b"x" * 40 + b"y" * 40  # past the limit: let go
    assert tracker.feed(b'\n\ndata: {"usage":null}\n\n') == b'\n\ndata: {"usage":null}\n\n'
    assert tracker.finish() == b""


# ---------------------------------------------------------------------------------------------------
# Anthropic streams


@pytest.mark.parametrize("how", CHUNKINGS)
def test_anthropic_stream(how: str) -> None:
    stream = anthropic_stream()
    # Stripping applies to OpenAI only; asking for it on Anthropic must not change a byte.
    tracker = UsageTracker("anthropic", streaming=True, strip_injected_usage=True)
    assert run(tracker, split(stream, how)) == stream
    assert tracker.usage == ANTHROPIC_USAGE
    assert tracker.complete
    assert tracker.output_text_chars == len(ANTHROPIC_REPLY)
    assert tracker.estimate(1) == ANTHROPIC_USAGE


def test_served_anthropic_stream(http: httpx.Client) -> None:
    chunks = fetch(http, "/v1/messages", messages_body(stream=True))
    tracker = UsageTracker("anthropic", streaming=True)
    assert run(tracker, chunks) == b"".join(chunks)
    assert tracker.usage == ANTHROPIC_USAGE
    assert normalise(b"".join(chunks)) == normalise(anthropic_stream())


def test_anthropic_crlf_and_cache_counters() -> None:
    stream = crlf(anthropic_stream()).replace(b'"cache_read_input_tokens":0', b'"cache_read_input_tokens":500')
    tracker = UsageTracker("anthropic", streaming=True)
    assert run(tracker, split(stream, "bytes")) == stream
    assert tracker.usage == Usage(ANTHROPIC_PROMPT + 500, COMPLETION, cached_input_tokens=500)


def test_anthropic_events_without_name_lines() -> None:
    # Event names are optional in SSE; the data's own `type` still says what each event is.
    stream = b"".join(event.split(b"\n", 1)[1] for event in sse_events(anthropic_stream()))
    assert not stream.startswith(b"event:")
    tracker = UsageTracker("anthropic", streaming=True)
    assert run(tracker, split(stream, "seed-3")) == stream
    assert tracker.usage == ANTHROPIC_USAGE
    assert tracker.output_text_chars == len(ANTHROPIC_REPLY)


def test_anthropic_last_message_delta_wins() -> None:
    stream = anthropic_stream()
    delta = next(e for e in sse_events(stream) if e.startswith(b"event: message_delta"))
    later = delta.replace(b'"output_tokens":12', b'"output_tokens":15')
    tracker = UsageTracker("anthropic", streaming=True)
    run(tracker, [stream.replace(delta, delta + later)])
    assert tracker.usage == Usage(ANTHROPIC_PROMPT, 15)


def test_cut_anthropic_stream_is_estimated(http: httpx.Client) -> None:
    # message_start, content_block_start, ping, "mock": input is known, output only partly.
    chunks = fetch(http, "/v1/messages", messages_body(stream=True), {"x-mock-cut-after": "4"})
    tracker = UsageTracker("anthropic", streaming=True)
    assert run(tracker, chunks) == b"".join(chunks)
    assert not tracker.complete
    assert tracker.usage == Usage(ANTHROPIC_PROMPT, 1)  # as message_start reported it
    assert tracker.estimate(999) == Usage(ANTHROPIC_PROMPT, 1, reported=False)  # input from the provider

    # Before any text: the output message_start reported beats the 0 that counting text gives.
    tracker = UsageTracker("anthropic", streaming=True)
    run(tracker, fetch(http, "/v1/messages", messages_body(stream=True), {"x-mock-cut-after": "3"}))
    assert tracker.output_text_chars == 0
    assert tracker.estimate(999) == Usage(ANTHROPIC_PROMPT, 1, reported=False)

    stream = anthropic_stream()
    cut = stream.index(b'"text":" three"')  # mid content_block_delta
    tracker = UsageTracker("anthropic", streaming=True)
    assert run(tracker, split(stream[:cut], "seed-2")) == stream[:cut]  # observed: nothing held or repeated
    seen = len("mock reply from claude-3: one two")
    assert tracker.output_text_chars == seen
    assert tracker.estimate(999) == Usage(ANTHROPIC_PROMPT, math.ceil(seen / 4), reported=False)


def test_anthropic_thinking_and_tool_input_count_as_output() -> None:
    stream = (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"thinking_delta","thinking":"hmm"}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
        b'"delta":{"type":"input_json_delta","partial_json":"{\\"a\\":"}}\n\n'
        b"event: ping\ndata: {not json at all\n\n"
        b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":null}\n\n'
    )
    tracker = UsageTracker("anthropic", streaming=True)
    run(tracker, split(stream, "bytes"))
    assert tracker.output_text_chars == len("hmm") + len('{"a":')
    assert tracker.usage is None
    assert tracker.estimate(5) == Usage(5, 2, reported=False)


# ---------------------------------------------------------------------------------------------------
# request-side estimate


def test_request_estimate_matches_what_the_mock_charges(http: httpx.Client) -> None:
    chat = orjson.loads(b"".join(fetch(http, "/v1/chat/completions", chat_body())))
    assert estimate_request_tokens(chat_body(), "openai") == chat["usage"]["prompt_tokens"] == OPENAI_PROMPT
    message = orjson.loads(b"".join(fetch(http, "/v1/messages", messages_body())))
    assert estimate_request_tokens(messages_body(), "anthropic") == message["usage"]["input_tokens"]
    # String lengths that are multiples of 4, so the mock's per-input rounding agrees with ours.
    for value in ("abcdefgh", ["abcd", "efghijkl"], [[1, 2, 3], [4]], [5, 6, 7]):
        body = {"model": "e", "input": value}
        embedded = orjson.loads(b"".join(fetch(http, "/v1/embeddings", body)))
        assert estimate_request_tokens(body, "openai") == embedded["usage"]["prompt_tokens"], value


def test_request_estimate_shapes() -> None:
    parts = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a" * 10}, {"type": "image_url", "image_url": {"url": "data:" + "x" * 999}}]}]}
    assert estimate_request_tokens(parts, "openai") == 3  # images are not text

    tool_use = {"type": "tool_use", "id": "t1", "name": "lookup", "input": {"q": "x" * 50}}
    tool_result = {"type": "tool_result", "tool_use_id": "t1", "content": "y" * 30}
    anthropic_body = {
        "system": [{"type": "text", "text": "s" * 8}],
        "messages": [{"role": "user", "content": "u" * 8},
                     {"role": "assistant", "content": [tool_use]},
                     {"role": "user", "content": [tool_result]}],
    }
    tool_chars = len(orjson.dumps(tool_use)) + len(orjson.dumps(tool_result))
    assert estimate_request_tokens(anthropic_body, "anthropic") == math.ceil((16 + tool_chars) / 4)
    # `system` means nothing to OpenAI's wire format (there it is a message role).
    assert estimate_request_tokens(anthropic_body, "openai") == math.ceil((8 + tool_chars) / 4)

    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    openai_tools = {"messages": [{"role": "assistant", "content": None, "tool_calls": calls}]}
    assert estimate_request_tokens(openai_tools, "openai") == math.ceil(len(orjson.dumps(calls)) / 4)


@pytest.mark.parametrize("body", [
    {},
    {"messages": None},
    {"messages": "hello"},
    {"messages": [None, 3, {"content": {"text": 5}}, {"content": [None, 1, {"text": None}]}]},
    {"input": None},
    {"input": [None, {}, 1.5]},
    {"system": 12, "messages": [{"content": [{"type": "tool_use", "input": 2**70}]}]},
    [],
])
def test_request_estimate_tolerates_odd_shapes(body: Any) -> None:
    for api in ("openai", "anthropic"):
        assert estimate_request_tokens(body, api) >= 1


def test_tool_schemas_count_as_input() -> None:
    tools = [{"type": "function", "function": {"name": "lookup_order", "description": "Find an order " * 20,
                                               "parameters": {"type": "object", "properties": {}}}}]
    plain = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert estimate_request_tokens({**plain, "tools": tools}, "openai") > estimate_request_tokens(plain, "openai") + 60
