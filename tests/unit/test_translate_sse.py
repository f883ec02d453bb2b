"""The one SSE parser (``extproc.translate.sse``) that the usage tracker and the stream translators share.

The parser against the spec's own line-by-line algorithm, whatever the chunking (a cut at every byte of
a sample with every rule in it, in LF and CRLF, and seeded random streams); the end of a stream; and a
translated stream parsed once: the usage tracker reads the translator's events (and their decoded JSON)
and reads the same usage as when it parses the bytes itself.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from devtools import mock_provider as mock
from extproc.core.usage import Usage, UsageTracker
from extproc.translate import openai_to_anthropic as o2a
from extproc.translate import responses_to_anthropic as r2a
from extproc.translate import sse
from extproc.translate.response import ResponseTranslator
from extproc.translate.sse import SseEvent, SseParser
from tests.chunking import CHUNKINGS, split

# Every rule in one stream: comments, an empty block, OpenAI's and Anthropic's shapes, a name without
# data, multi-line data, id/retry/unknown fields, the last of two names, no space and two spaces after
# the colon, a field without a colon, blank lines in a row, [DONE].
SAMPLE = (
    b": a comment before anything\n"
    b"\n"
    b'data: {"a":1}\n\n'
    b'event: message_start\ndata: {"type":"message_start"}\n\n'
    b"event: ping\n\n"
    b"data: first\ndata: second\n\n"
    b": keep-alive\n\n"
    b"id: 7\nretry: 100\nevent: one\nevent: two\ndata:no-space\n: inner comment\ndata:  two spaces\n\n"
    b"data\n\n"
    b"data:\n\n"
    b"event:  spaced\ndata: x\n\n"
    b"unknown: field\ndata: y\n\n"
    b"\n\n\n"
    b"event: last\ndata: z\n: trailing comment\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    (None, b'{"a":1}'),
    ("message_start", b'{"type":"message_start"}'),
    (None, b"first\nsecond"),
    ("two", b"no-space\n two spaces"),
    (None, b""),
    (None, b""),
    (" spaced", b"x"),
    (None, b"y"),
    ("last", b"z"),
    (None, b"[DONE]"),
]


def crlf(stream: bytes) -> bytes:
    return stream.replace(b"\n", b"\r\n")


def reference(stream: bytes) -> list[tuple[str | None, bytes]]:
    """The spec's algorithm, a line at a time (the translators' old parser): what any chunking must give."""
    events: list[tuple[str | None, bytes]] = []
    name: str | None = None
    data: list[bytes] = []
    for line in stream.split(b"\n")[:-1]:  # what follows the last newline is not a line yet
        line = line.removesuffix(b"\r")
        if not line:
            if data:
                events.append((name, b"\n".join(data)))
            name, data = None, []
            continue
        field, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    return events


def parse(chunks: list[bytes]) -> tuple[list[tuple[str | None, bytes | None]], SseParser]:
    parser = SseParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return [(event.event, event.data) for event in events], parser


def test_the_reference_reads_the_sample_as_expected() -> None:
    assert reference(SAMPLE) == EXPECTED
    assert reference(crlf(SAMPLE)) == EXPECTED


@pytest.mark.parametrize("ending", ["lf", "crlf"])
def test_a_cut_at_every_byte_changes_nothing(ending: str) -> None:
    stream = SAMPLE if ending == "lf" else crlf(SAMPLE)
    for cut in range(len(stream) + 1):
        events, parser = parse([stream[:cut], stream[cut:]])
        assert events == EXPECTED, cut
        assert parser.pending == b""
        assert parser.finish() is None
    events, _ = parse(split(stream, "bytes"))
    assert events == EXPECTED


@pytest.mark.parametrize("ending", ["lf", "crlf"])
def test_events_are_dispatched_at_their_blank_line_and_not_before(ending: str) -> None:
    stream = SAMPLE if ending == "lf" else crlf(SAMPLE)
    parser = SseParser()
    seen = 0
    for at in range(len(stream)):
        seen += len(parser.feed(stream[at : at + 1]))
        assert seen == len(reference(stream[: at + 1])), at  # exactly the events whose blank line is in


@pytest.mark.parametrize("ending", ["lf", "crlf"])
def test_blocks_account_for_every_byte(ending: str) -> None:
    stream = SAMPLE if ending == "lf" else crlf(SAMPLE)
    for cut in range(len(stream) + 1):
        parser = SseParser()
        blocks = parser.blocks(stream[:cut]) + parser.blocks(stream[cut:])
        assert b"".join(raw for _, _, raw in blocks) == stream
        assert [(name, data) for name, data, _ in blocks if data is not None] == EXPECTED
    events, _ = parse([stream])
    assert len(SseParser().blocks(stream)) > len(events)  # comments and the bare `event: ping` are blocks
    assert len(SseParser().blocks(stream, every_block=False)) == len(events)


def test_raw_is_each_event_as_received() -> None:
    stream = b'data: {"a":1}\r\n\r\nevent: e\ndata: x\r\n\n: c\ndata: y\n\n'
    events = SseParser().feed(stream)
    raws = [b'data: {"a":1}\r\n\r\n', b"event: e\ndata: x\r\n\n", b": c\ndata: y\n\n"]
    assert [event.raw for event in events] == raws
    assert events[0] == SseEvent(None, b'{"a":1}', b'data: {"a":1}\r\n\r\n')


def test_mixed_line_endings_and_a_lone_carriage_return() -> None:
    stream = b"data: a\r\n\ndata: b\n\r\nevent: n\r\ndata: c\ndata: d\r\n\r\ndata: e\rf\n\n"
    assert parse([stream])[0] == [(None, b"a"), (None, b"b"), ("n", b"c\nd"), (None, b"e\rf")]
    # A lone \r is not a line ending (no provider sends one): no event yet.
    assert parse([b"data: a\r\rdata: b\r\r"])[0] == []


_LINES = [
    b"data: {}", b"data:x", b"data:  y", b"data", b"data:", b"event: e", b"event:f", b"event", b": comment", b":",
    b"id: 1", b"retry: 5", b"dat: no", b"", b"", b"", b"data: [DONE]", b"event: message_delta", b"x\xff: y",
]


def _random_stream(rng: random.Random) -> bytes:
    lines = [rng.choice(_LINES) for _ in range(rng.randint(0, 40))]
    return b"".join(line + rng.choice((b"\n", b"\r\n")) for line in lines) + rng.choice((b"", b"dat", b"data: z"))


@pytest.mark.parametrize("seed", range(300))
def test_random_streams_read_as_the_spec_says(seed: int) -> None:
    rng = random.Random(seed)
    stream = _random_stream(rng)
    expected = reference(stream)
    for how in ("whole", "bytes", f"seed-{seed}"):
        chunks = split(stream, how) if stream else [b""]
        events, parser = parse(chunks)
        assert events == expected, how
        # What is held is read at the end as if its blank line had come.
        tail = parser.finish()
        last = [(tail.event, tail.data)] if tail is not None and tail.data is not None else []
        assert events + last == reference(stream + b"\n\n"), how


# ---------------------------------------------------------------------------------------------------
# the end of a stream


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (b"data: x", ("x", None)),
        (b"data: x\n", ("x", None)),
        (b"data: x\r", ("x", None)),
        (b"data: x\n\r", ("x", None)),
        (b"event: e\ndata: x\r\n", ("x", "e")),
        (b"event: e\ndata: a\ndata: b", ("a\nb", "e")),
        (b"\ndata: x", ("x", None)),
        (b'data: {"cut":', ('{"cut":', None)),
        (b": only a comment", (None, None)),
        (b"event: ping", (None, None)),  # not an event: its name goes with its blank line
    ],
)
def test_finish_reads_what_a_stream_left_unterminated(tail: bytes, expected: tuple[str | None, str | None]) -> None:
    for ending in (b"\n\n", b"\r\n\r\n"):
        parser = SseParser()
        assert parser.feed(b"data: before" + ending + tail) == [SseEvent(None, b"before", b"data: before" + ending)]
        assert parser.pending == tail
        event = parser.finish()
        assert event is not None
        data, name = expected
        assert (event.data, event.event, event.raw) == (data and data.encode(), name, tail)  # raw: as sent
        assert parser.finish() is None  # nothing held any more
        assert parser.pending == b""


def test_feed_drops_an_unterminated_event_as_a_client_does() -> None:
    parser = SseParser()
    assert parser.feed(b'data: {"usage":{}}') == []
    assert parser.feed(b"") == []
    assert SseParser().finish() is None


def test_json_is_decoded_once_however_many_readers_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[bytes] = []
    real = sse.orjson.loads

    def counting(data: bytes) -> Any:
        decoded.append(data)
        return real(data)

    monkeypatch.setattr(sse.orjson, "loads", counting)
    event = SseParser().feed(b'data: {"a":[1]}\n\n')[0]
    assert event.json() == {"a": [1]}
    assert event.json() is event.json()
    assert decoded == [b'{"a":[1]}']
    for bad in (SseEvent(None, b"[DONE]"), SseEvent(None, b""), SseEvent("ping", None)):
        with pytest.raises(orjson.JSONDecodeError):
            bad.json()


# ---------------------------------------------------------------------------------------------------
# a translated stream, parsed once: the usage tracker reads the translator's events


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Translated chunks carry the translation time; fixed, so two translators' outputs compare equal."""
    monkeypatch.setattr(o2a, "time", SimpleNamespace(time=lambda: 1.0))
    monkeypatch.setattr(r2a, "time", SimpleNamespace(time=lambda: 1.0))


def anthropic_stream() -> bytes:
    return b"".join(mock._message_events("msg_01fixed", "claude-3", "one two three four five", 17))


def openai_stream() -> bytes:
    usage = mock._chat_usage(21, 5)
    return b"".join(mock._chat_events("chatcmpl-fixed", 1, "gpt-4o", "one two three four five", usage, True))


# (provider's API, caller's API, the provider's stream, what the provider reported)
TRANSLATED = [
    ("anthropic", "openai", anthropic_stream, Usage(17, 5)),
    ("anthropic", "openai_responses", anthropic_stream, Usage(17, 5)),
    ("openai", "anthropic", openai_stream, Usage(21, 5)),
]


def settle(provider: str, caller: str, chunks: list[bytes], *, once: bool) -> tuple[UsageTracker, bytes, bool]:
    """What Settlement does with a translated stream (feed, then flush), with or without usage=tracker."""
    tracker = UsageTracker(provider, streaming=True)
    translator = ResponseTranslator(caller, 200, True, requested_model="m", include_usage=True,
                                    **({"usage": tracker} if once else {}))
    out = []
    for chunk in chunks:
        forwarded = tracker.feed(chunk)
        assert forwarded is chunk  # observed, never rewritten
        out.append(translator.feed(forwarded))
    out.append(translator.feed(tracker.finish()) + translator.finish())
    return tracker, b"".join(out), translator.failed


@pytest.mark.parametrize(("provider", "caller", "stream", "usage"), TRANSLATED)
@pytest.mark.parametrize("how", CHUNKINGS)
def test_the_tracker_reads_the_same_usage_from_the_translators_events(
    provider: str, caller: str, stream: Callable[[], bytes], usage: Usage, how: str
) -> None:
    chunks = split(stream(), how)
    twice, out_twice, _ = settle(provider, caller, chunks, once=False)
    once, out_once, failed = settle(provider, caller, chunks, once=True)
    assert out_once == out_twice and not failed
    assert once.complete and once.usage == twice.usage == usage
    assert once.output_text_chars == twice.output_text_chars == len("one two three four five")


@pytest.mark.parametrize(("provider", "caller", "stream", "usage"), TRANSLATED)
def test_a_translated_stream_is_parsed_and_decoded_once(
    monkeypatch: pytest.MonkeyPatch, provider: str, caller: str, stream: Callable[[], bytes], usage: Usage
) -> None:
    parsed: list[bytes] = []
    real_blocks = SseParser.blocks

    def counting_blocks(self: SseParser, chunk: bytes, *, every_block: bool = True) -> list[sse.Block]:
        parsed.append(chunk)
        return real_blocks(self, chunk, every_block=every_block)

    decoded: list[bytes] = []
    real_loads = orjson.loads

    def counting_loads(data: bytes) -> Any:
        decoded.append(bytes(data))
        return real_loads(data)

    monkeypatch.setattr(SseParser, "blocks", counting_blocks)
    monkeypatch.setattr(orjson, "loads", counting_loads)
    body = stream()
    json_events = [e for e in reference(body) if e[1] != b"[DONE]"]

    settle(provider, caller, split(body, "seed-1"), once=False)
    assert len(b"".join(parsed)) == 2 * len(body)  # the tracker's parse and the translator's
    assert len(decoded) > len(json_events)
    parsed.clear()
    decoded.clear()

    tracker, _, _ = settle(provider, caller, split(body, "seed-1"), once=True)
    assert tracker.usage == usage
    assert b"".join(parsed) == body  # one parse (finish adds nothing: no unterminated event)
    assert sorted(decoded) == sorted(data for _, data in json_events)  # each event's JSON once


def test_an_unterminated_last_event_reaches_the_tracker_but_not_the_caller() -> None:
    stream = anthropic_stream()
    cut = stream[: stream.index(b"event: message_stop") - 2]  # message_delta without its blank line, then EOF
    twice, out_twice, _ = settle("anthropic", "openai", [cut], once=False)
    once, out_once, _ = settle("anthropic", "openai", [cut], once=True)
    assert out_once == out_twice
    assert b'"finish_reason":"stop"' not in out_once  # the client never saw message_delta: a cut stream
    assert once.complete and once.usage == twice.usage == Usage(17, 5)


def test_usage_is_read_to_the_end_after_the_translation_failed() -> None:
    stream = anthropic_stream()
    at = stream.index(b"event: content_block_stop")
    broken = stream[:at] + b"event: content_block_delta\ndata: not json\n\n" + stream[at:]
    twice, out_twice, _ = settle("anthropic", "openai", split(broken, "seed-2"), once=False)
    once, out_once, failed = settle("anthropic", "openai", split(broken, "seed-2"), once=True)
    assert failed and out_once == out_twice
    assert once.complete and once.usage == twice.usage == Usage(17, 5)


def test_usage_is_read_to_the_end_after_the_translator_broke(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Any, event: SseEvent) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(o2a.StreamTranslator, "_event", broken)
    tracker, out, failed = settle("anthropic", "openai", split(anthropic_stream(), "seed-3"), once=True)
    assert failed and b"provider_response_untranslatable" in out
    assert tracker.complete and tracker.usage == Usage(17, 5)


def test_the_tracker_keeps_parsing_when_it_must() -> None:
    assert UsageTracker("openai", streaming=True, strip_injected_usage=True).event_reader() is None  # rewrites bytes
    assert UsageTracker("openai", streaming=False).event_reader() is None  # a JSON body
    started = UsageTracker("anthropic", streaming=True)
    started.feed(b"event: message_start\ndata: {")
    assert started.event_reader() is None  # it holds part of an event: the other parser never saw it
    fresh = UsageTracker("anthropic", streaming=True)
    assert fresh.event_reader() is not None
    assert fresh.event_reader() is None  # handed over once

    # An error status is not translated as a stream: the tracker reads the body itself.
    tracker = UsageTracker("anthropic", streaming=True)
    translator = ResponseTranslator("openai", 500, True, requested_model="m", usage=tracker)
    body = anthropic_stream()
    translator.feed(tracker.feed(body))
    translator.finish()
    assert tracker.usage == Usage(17, 5)
