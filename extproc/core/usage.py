"""Token usage read from AI provider responses as they stream past, and removal of an injected usage chunk.

Three body formats: ``"openai"`` (chat completions, legacy completions, embeddings), ``"anthropic"``
(Messages) and ``"openai_responses"`` (the Responses API: ``usage.input_tokens``/``output_tokens`` in a
JSON body; in a stream, the ``response`` object of the terminal ``response.completed`` or
``response.incomplete`` event, whose usage is final, with ``*.delta`` events counted for an estimate).

Responses arrive in arbitrary chunks (an SSE event, or even a JSON token, may straddle two): streams
are read with the SSE parser the translators use (``extproc.translate.sse``), which dispatches only
complete events and holds nothing but an incomplete trailing one. When the stream is translated, the
translator parses it and hands the tracker its events (``event_reader``), so it is parsed once. JSON
bodies are buffered (bounded) and parsed once at the end.

When we asked an OpenAI stream for ``stream_options.include_usage`` on the caller's behalf, the caller
must see exactly the stream it would have got without it: the usage-only final chunk is dropped and the
``"usage":null`` member added to every other chunk is cut out byte for byte, so the provider's own
formatting survives untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.translate.sse import SseEvent, SseParser

__all__ = ["FORMATS", "RESPONSES", "Usage", "UsageTracker", "estimate_request_tokens"]

OPENAI = "openai"
ANTHROPIC = "anthropic"
RESPONSES = "openai_responses"  # the OpenAI Responses API (POST /v1/responses)
FORMATS = frozenset((OPENAI, ANTHROPIC, RESPONSES))

_CHARS_PER_TOKEN = 4
_DONE = b"[DONE]"
_USAGE_NULL_AFTER = b',"usage":null'
_USAGE_NULL_LAST = b',"usage":null}'  # where OpenAI puts it: the last member of the chunk
_USAGE_NULL_BEFORE = b'"usage":null,'
# The Anthropic events worth parsing (usage, generated text); ping/stop/block-start are skipped unparsed.
_ANTHROPIC_WANTED = frozenset(("message_start", "content_block_delta", "message_delta"))
_ANTHROPIC_DELTA = b"_delta"
_ANTHROPIC_START = b"message_start"
# Output that the model generated and is billed for, whichever kind of content block it streams into.
_ANTHROPIC_DELTA_KEYS = ("text", "thinking", "partial_json")
# Responses API events worth parsing: generated text of any kind (for an estimate) and the lifecycle
# events whose `response` may carry usage. The many others (added/done/part events, whose text repeats
# the deltas) are skipped unparsed.
_RESPONSES_DELTAS = frozenset((
    "response.output_text.delta",
    "response.refusal.delta",
    "response.function_call_arguments.delta",
    "response.custom_tool_call_input.delta",
    "response.reasoning_summary_text.delta",
    "response.reasoning_text.delta",
))
_RESPONSES_FINAL = frozenset(("response.completed", "response.incomplete"))  # usage there is final
_RESPONSES_FAILED = "response.failed"  # its response may carry usage, but the answer is not complete
_RESPONSES_WANTED = _RESPONSES_DELTAS | _RESPONSES_FINAL | {_RESPONSES_FAILED}
_RESPONSES_WANTED_BYTES = frozenset(kind.encode() for kind in _RESPONSES_WANTED)
_RESPONSES_TYPE = b'"type":"'
# Reads one event: (tracker, name, data, raw bytes, the SseEvent if another reader has it) → bytes to forward.
_Reader = Callable[["UsageTracker", str | None, bytes | None, bytes, SseEvent | None], bytes]


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int  # including cached/cache-read input
    output_tokens: int  # including reasoning
    cached_input_tokens: int = 0  # OpenAI prompt_tokens_details.cached_tokens / Anthropic cache_read_input_tokens
    cache_creation_input_tokens: int = 0
    reasoning_tokens: int = 0
    reported: bool = True  # False when estimated (usage never arrived)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _int(value: Any) -> int:
    # Providers send null for absent counters; a bool is an int to Python but never a count.
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _openai_usage(raw: dict[str, Any]) -> Usage:
    details = raw.get("prompt_tokens_details")
    completion_details = raw.get("completion_tokens_details")
    return Usage(
        input_tokens=_int(raw.get("prompt_tokens")),
        # Embeddings report only prompt_tokens and total_tokens.
        output_tokens=_int(raw.get("completion_tokens")),
        cached_input_tokens=_int(details.get("cached_tokens")) if isinstance(details, dict) else 0,
        reasoning_tokens=(
            _int(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0
        ),
    )


def _responses_usage(raw: dict[str, Any]) -> Usage:
    """The Responses API's counters: input_tokens already include cached (and cache-written) tokens."""
    details = raw.get("input_tokens_details")
    output_details = raw.get("output_tokens_details")
    if not isinstance(details, dict):
        details = {}
    return Usage(
        input_tokens=_int(raw.get("input_tokens")),
        output_tokens=_int(raw.get("output_tokens")),
        cached_input_tokens=_int(details.get("cached_tokens")),
        cache_creation_input_tokens=_int(details.get("cache_write_tokens")),
        reasoning_tokens=_int(output_details.get("reasoning_tokens")) if isinstance(output_details, dict) else 0,
    )


def _anthropic_usage(raw: dict[str, Any], base: Usage | None = None) -> Usage:
    """Anthropic's counters; ``base`` supplies those a message_delta leaves out."""
    if base is None:
        uncached, created, read, output = 0, 0, 0, 0
    else:
        created, read, output = base.cache_creation_input_tokens, base.cached_input_tokens, base.output_tokens
        uncached = base.input_tokens - created - read
    # Anthropic's input_tokens excludes both cache reads and cache writes; ours is everything read in.
    if "input_tokens" in raw:
        uncached = _int(raw["input_tokens"])
    if "cache_creation_input_tokens" in raw:
        created = _int(raw["cache_creation_input_tokens"])
    if "cache_read_input_tokens" in raw:
        read = _int(raw["cache_read_input_tokens"])
    if "output_tokens" in raw:
        output = _int(raw["output_tokens"])
    return Usage(uncached + created + read, output, cached_input_tokens=read, cache_creation_input_tokens=created)


def _without_usage_null(event: bytes) -> bytes:
    """Cut the one ``"usage":null`` member out of an event, or return it untouched if that is not exact."""
    # Fast path: right before the brace that ends the data it can only be the top-level member, and a
    # search from the end finds it at once instead of scanning the whole event.
    at = event.rfind(_USAGE_NULL_LAST)
    if at >= 0 and not event[at + len(_USAGE_NULL_LAST) :].strip(b"\r\n"):
        return event[:at] + event[at + len(_USAGE_NULL_AFTER) :]
    for needle in (_USAGE_NULL_AFTER, _USAGE_NULL_BEFORE):
        parts = event.split(needle)
        if len(parts) == 2:
            return parts[0] + parts[1]
        if len(parts) > 2:
            return event  # ambiguous: some nested object also has a null usage
    return event


def _openai_choice_chars(choices: list[Any], key: str) -> int:
    """Characters generated in ``choices[].{key}`` (``delta`` for chunks, ``message`` for a full body)."""
    chars = 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        text = choice.get("text")  # legacy completions: the text is on the choice itself
        if isinstance(text, str):
            chars += len(text)
        part = choice.get(key)
        if not isinstance(part, dict):
            continue
        for field in ("content", "refusal", "reasoning_content"):
            text = part.get(field)
            if isinstance(text, str):
                chars += len(text)
        calls = part.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    for field in ("name", "arguments"):
                        text = function.get(field)
                        if isinstance(text, str):
                            chars += len(text)
    return chars


def _anthropic_block_chars(block: Any) -> int:
    if not isinstance(block, dict):
        return 0
    chars = 0
    for key in (*_ANTHROPIC_DELTA_KEYS, "name"):
        text = block.get(key)
        if isinstance(text, str):
            chars += len(text)
    if "input" in block:
        chars += _json_len(block["input"])
    return chars


def _responses_output_chars(output: list[Any]) -> int:
    """Characters generated in a Responses ``output`` array: message text, refusals, calls, reasoning."""
    chars = 0
    for item in output:
        if not isinstance(item, dict):
            continue
        for key in ("name", "arguments", "input"):  # function and custom tool calls
            text = item.get(key)
            if isinstance(text, str):
                chars += len(text)
        for key in ("content", "summary"):  # message parts; reasoning summary and text parts
            parts = item.get(key)
            if isinstance(parts, list):
                for part in parts:
                    if isinstance(part, dict):
                        for field in ("text", "refusal"):
                            text = part.get(field)
                            if isinstance(text, str):
                                chars += len(text)
    return chars


def _responses_wanted(name: str | None, data: bytes) -> bool:
    """Whether a Responses event is one usage is read from, judged before its JSON is decoded."""
    if name is not None:
        return name in _RESPONSES_WANTED
    # No name line (OpenAI always sends one): peek at the first "type", which OpenAI writes first.
    at = data.find(_RESPONSES_TYPE)
    if at < 0:
        return False
    at += len(_RESPONSES_TYPE)
    return data[at : data.find(b'"', at)] in _RESPONSES_WANTED_BYTES


def _json_len(value: Any) -> int:
    try:
        return len(orjson.dumps(value))
    except (TypeError, orjson.JSONEncodeError):  # e.g. integers wider than 64 bits
        return len(str(value))


def _json_object(data: bytes, event: SseEvent | None) -> dict[str, Any] | None:
    """An event's data as a JSON object (decoded once when another reader holds the event), or None."""
    try:
        value = orjson.loads(data) if event is None else event.json()
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class UsageTracker:
    """Follows one response body; see the module docstring for what it reads and what it strips."""

    __slots__ = (
        "_buffer",
        "_buffered",
        "_chars",
        "_complete",
        "_finished",
        "_format",
        "_gave_up",
        "_max",
        "_parser",
        "_read",
        "_streaming",
        "_strip",
        "_usage",
    )

    def __init__(
        self,
        api: str,
        *,
        streaming: bool,
        strip_injected_usage: bool = False,
        max_buffered_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        """``api`` is the body format: ``"openai"``, ``"anthropic"`` or ``"openai_responses"``.

        Any other value reads as ``"openai"``, as it always has. Stripping an injected usage chunk applies
        to OpenAI chat streams only (a Responses stream always reports usage, so nothing is ever injected
        there); it is ignored for the other formats.
        """
        self._format = api if api in (ANTHROPIC, RESPONSES) else OPENAI
        self._streaming = streaming
        self._strip = strip_injected_usage and streaming and self._format == OPENAI
        self._max = max_buffered_bytes
        # Streaming: reads one event, returning what the caller should receive of it. The function, not
        # a bound method: the tracker would reference itself and live until the cycle collector ran.
        self._read: _Reader = (
            UsageTracker._anthropic_event if self._format == ANTHROPIC
            else UsageTracker._responses_event if self._format == RESPONSES
            else UsageTracker._openai_event
        )
        # None when not streaming, or once the events come from another parser (event_reader).
        self._parser: SseParser | None = SseParser() if streaming else None
        self._buffer: list[bytes] = []  # JSON: the body so far
        self._buffered = 0
        self._gave_up = False  # too much to hold: pass the rest through unread
        self._finished = False
        self._chars = 0
        self._usage: Usage | None = None
        self._complete = False

    @property
    def usage(self) -> Usage | None:
        """What the provider reported so far (for Anthropic possibly only message_start's counts)."""
        return self._usage

    @property
    def complete(self) -> bool:
        """The provider's final usage arrived (OpenAI usage object, Anthropic message_delta, JSON usage).

        For a Responses stream: a ``response.completed`` or ``response.incomplete`` event with usage; a
        ``response.failed`` event's usage is kept (``usage``, and as the floor of ``estimate``) but is
        not final.
        """
        return self._complete

    @property
    def output_text_chars(self) -> int:
        return self._chars

    def estimate(self, input_estimate: int) -> Usage:
        """The reported usage if complete, else the best guess from what was seen (``reported=False``)."""
        usage = self._usage
        if self._complete and usage is not None:
            return usage
        output = math.ceil(self._chars / _CHARS_PER_TOKEN)
        if usage is None:
            return Usage(input_estimate, output, reported=False)
        return Usage(
            usage.input_tokens,
            max(output, usage.output_tokens),
            cached_input_tokens=usage.cached_input_tokens,
            cache_creation_input_tokens=usage.cache_creation_input_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            reported=False,
        )

    def event_reader(self) -> Callable[[SseEvent], object] | None:
        """Read the stream's events from another parser of the same bytes, so the stream is parsed once.

        For a stream translator, which parses the provider's stream anyway: from now on ``feed`` and
        ``finish`` pass bytes through unread, and the returned callable reads each event, in order (an
        unterminated one at the end too, if it is handed over). None if this tracker must keep reading the
        bytes itself: a JSON body, a stream it strips (it rewrites the bytes), or one it has started on.
        """
        parser = self._parser
        if parser is None or self._strip or parser.pending or self._finished or self._gave_up:
            return None
        self._parser = None
        return self._read_event

    def _read_event(self, event: SseEvent) -> None:
        self._read(self, event.event, event.data, event.raw, event)

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to forward now: ``chunk`` itself unless stripping, when complete events go out at once."""
        if self._gave_up or self._finished or not chunk:
            return chunk
        if not self._streaming:
            self._buffered += len(chunk)
            if self._buffered > self._max:
                self._gave_up = True
                self._buffer.clear()
            else:
                self._buffer.append(chunk)
            return chunk
        parser = self._parser
        if parser is None:
            return chunk  # another parser hands the events over (event_reader)

        read = self._read
        if not self._strip:
            for name, data, raw in parser.blocks(chunk, every_block=False):
                read(self, name, data, raw, None)
            if len(parser.pending) > self._max:
                # Not SSE after all, or an absurd event: stop reading rather than hold the caller's bytes.
                self._gave_up = True
                self._parser = None
            return chunk

        # Every block, data or not, goes out as soon as it is complete: a keep-alive comment too.
        out = [read(self, name, data, raw, None) for name, data, raw in parser.blocks(chunk)]
        if len(parser.pending) > self._max:
            self._gave_up = True
            self._parser = None
            out.append(parser.pending)
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def finish(self) -> bytes:
        """End of the response: the held bytes (forwarded as sent) and, for JSON, the usage."""
        if self._finished:
            return b""
        self._finished = True
        if not self._streaming:
            if not self._gave_up and self._buffer:
                self._read_json(b"".join(self._buffer))
            self._buffer.clear()
            return b""
        parser = self._parser
        if parser is None or self._gave_up:
            return b""
        rest = parser.finish()
        if rest is None:
            return b""
        # A client drops an unterminated event, so it goes out as sent; it may still hold usage (a
        # provider that ends without the final blank line) and is read if it is whole.
        self._read(self, rest.event, rest.data, rest.raw, rest)
        return rest.raw if self._strip else b""

    # -- internals ---------------------------------------------------------------------------------
    # One event each, as parsed: its name, data (None for a block without data lines) and raw bytes, and
    # the SseEvent when another reader has it too (its JSON is then decoded once for both).

    def _openai_event(self, name: str | None, data: bytes | None, raw: bytes, event: SseEvent | None) -> bytes:
        """Account one OpenAI event; return what the caller should receive of it."""
        if data is None or data == _DONE:
            return raw
        chunk = _json_object(data, event)
        if chunk is None:
            return raw
        choices = chunk.get("choices")
        if choices and isinstance(choices, list):
            self._chars += _openai_choice_chars(choices, "delta")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = _openai_usage(usage)
            self._complete = True
            if self._strip and choices == []:
                return b""
            return raw
        if self._strip and usage is None and "usage" in chunk:
            return _without_usage_null(raw)
        return raw

    def _anthropic_event(self, name: str | None, data: bytes | None, raw: bytes, event: SseEvent | None) -> bytes:
        if data is None:
            return raw
        if name is not None:
            if name not in _ANTHROPIC_WANTED:
                return raw
        elif _ANTHROPIC_DELTA not in data and _ANTHROPIC_START not in data:
            return raw  # no name line: judge by content
        payload = _json_object(data, event)
        if payload is None:
            return raw
        kind = payload.get("type")
        if kind == "content_block_delta":
            delta = payload.get("delta")
            if isinstance(delta, dict):
                for key in _ANTHROPIC_DELTA_KEYS:
                    text = delta.get(key)
                    if isinstance(text, str):
                        self._chars += len(text)
        elif kind == "message_start":
            message = payload.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._usage = _anthropic_usage(usage)
        elif kind == "message_delta":
            usage = payload.get("usage")
            if isinstance(usage, dict):
                # Counts here are cumulative, so the last message_delta wins.
                self._usage = _anthropic_usage(usage, self._usage)
                self._complete = True
        return raw

    def _responses_event(self, name: str | None, data: bytes | None, raw: bytes, event: SseEvent | None) -> bytes:
        """Account one Responses API event (named by its ``event:`` line, or by its data's ``type``)."""
        if data is None or not _responses_wanted(name, data):
            return raw
        payload = _json_object(data, event)
        if payload is None:
            return raw
        kind = payload.get("type")
        if not isinstance(kind, str):
            return raw
        if kind.endswith(".delta"):
            delta = payload.get("delta")
            if isinstance(delta, str) and kind in _RESPONSES_DELTAS:
                self._chars += len(delta)
            return raw
        self._responses_end(kind, payload.get("response"))
        return raw

    def _responses_end(self, kind: str, response: Any) -> None:
        """Take the usage a terminal Responses event carries (``response`` is its ``response`` field)."""
        usage = response.get("usage") if isinstance(response, dict) else None
        if kind in _RESPONSES_FINAL:
            if isinstance(usage, dict):
                self._usage = _responses_usage(usage)
                self._complete = True
            else:
                # A terminal event without usage: what its output holds is the best count there is.
                output = response.get("output") if isinstance(response, dict) else None
                if isinstance(output, list):
                    self._chars = max(self._chars, _responses_output_chars(output))
        elif kind == _RESPONSES_FAILED and isinstance(usage, dict) and not self._complete:
            self._usage = _responses_usage(usage)

    def _read_json(self, body: bytes) -> None:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if not isinstance(payload, dict):
            return
        if self._format == ANTHROPIC:
            content = payload.get("content")
            if isinstance(content, list):
                self._chars = sum(_anthropic_block_chars(block) for block in content)
        elif self._format == RESPONSES:
            output = payload.get("output")
            if isinstance(output, list):
                self._chars = _responses_output_chars(output)
            usage = payload.get("usage")
            if isinstance(usage, dict):
                self._usage = _responses_usage(usage)
                # A failed (or still queued, background) response's counts are not the final answer's.
                self._complete = payload.get("status") not in ("failed", "queued", "in_progress")
            return
        else:
            choices = payload.get("choices")
            if isinstance(choices, list):
                self._chars = _openai_choice_chars(choices, "message")
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self._usage = _anthropic_usage(usage) if self._format == ANTHROPIC else _openai_usage(usage)
            self._complete = True


# -- request-side estimate -------------------------------------------------------------------------


def _text_chars(content: Any) -> int:
    """Characters of a content value: a string, or a list of parts/blocks (tool blocks by JSON size)."""
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        return 0
    chars = 0
    for part in content:
        if isinstance(part, str):
            chars += len(part)
        elif isinstance(part, dict):
            text = part.get("text")
            if isinstance(text, str):
                chars += len(text)
            elif part.get("type") in ("tool_use", "tool_result"):
                chars += _json_len(part)
    return chars


def _item_chars(item: dict[str, Any]) -> int:
    """Characters of one Responses API input item: a message's text, a call's name and arguments, an output."""
    chars = _text_chars(item.get("content"))
    for key in ("name", "arguments"):
        text = item.get(key)
        if isinstance(text, str):
            chars += len(text)
    output = item.get("output")  # function_call_output: a string or content parts
    if output is not None:
        chars += _text_chars(output)
    return chars


def _input_counts(value: Any) -> tuple[int, int]:
    """(characters, token ids) of an ``input`` (embeddings, Responses) or ``prompt`` (legacy completions)."""
    if isinstance(value, str):
        return len(value), 0
    chars = token_ids = 0
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                chars += len(item)
            elif isinstance(item, int):
                token_ids += 1  # a single token-id list
            elif isinstance(item, list):
                token_ids += len(item)
            elif isinstance(item, dict):  # a Responses API input item
                chars += _item_chars(item)
    return chars, token_ids


def _request_counts(body: dict[str, Any], api: str) -> tuple[int, int]:
    """(characters of prompt text, tokens given directly as token ids)."""
    chars = 0
    token_ids = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            chars += _text_chars(message.get("content"))
            calls = message.get("tool_calls")
            if calls:  # an OpenAI assistant turn's tool calls are input again, like Anthropic tool_use
                chars += _json_len(calls)
    tools = body.get("tools")
    if tools:  # tool schemas are billed as input by both providers, and can dwarf the prompt
        chars += _json_len(tools)
    if api == ANTHROPIC:
        chars += _text_chars(body.get("system"))
        return chars, token_ids
    # Embeddings and the Responses API take `input`, legacy completions `prompt`; the Responses API's
    # `instructions` are its system prompt. Counted whichever OpenAI format the caller names.
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        chars += len(instructions)
    for key in ("input", "prompt"):
        more_chars, more_ids = _input_counts(body.get(key))
        chars += more_chars
        token_ids += more_ids
    return chars, token_ids


def estimate_request_tokens(body: object, api: str) -> int:
    """A cheap input-token estimate for a parsed request body: about 4 characters a token, at least 1.

    ``api`` is ``"anthropic"`` or an OpenAI format (``"openai"`` or ``"openai_responses"``, read alike).
    """
    if not isinstance(body, dict):
        return 1
    chars, token_ids = _request_counts(body, api)
    return max(1, math.ceil(chars / _CHARS_PER_TOKEN) + token_ids)
