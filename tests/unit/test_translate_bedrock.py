"""Bedrock Converse ⇄ canonical (Anthropic Messages) translation, and the AWS event-stream decoder.

The decoder is checked against botocore's own parser (an independent reading of the same frames),
cut at every byte, and against corruption at every byte. The translator: exact expected Converse
bodies for requests (so a wrong mapping fails with a readable diff) and refusals naming the field;
answers, errors and ConverseStream streams translated back and read by the unmodified ``anthropic``
SDK through an httpx MockTransport (no socket), whose accumulator must rebuild text, tool calls,
thinking, stop reason and usage; and the usage tracker reading the final counts of a translated stream.
"""

from __future__ import annotations

import random
import re
import struct
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from botocore.eventstream import EventStreamBuffer

from devtools import mock_provider as mock
from extproc.core.usage import Usage, UsageTracker
from extproc.translate import TranslationError, _anthropic
from extproc.translate import anthropic_to_openai as a2o
from extproc.translate import bedrock as br
from extproc.translate import openai_to_anthropic as o2a
from extproc.translate.eventstream import (
    MAX_FRAME_LENGTH,
    EventStreamDecoder,
    EventStreamError,
    Message,
    encode,
)
from extproc.translate.sse import SseParser
from tests.chunking import CHUNKINGS, split
from tests.unit.test_translate import _canonical_openai, _random_anthropic_request
from tests.unit.test_translate_request import _DELETE, VALUES, outcome, paths, replaced

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
PDF_B64 = "JVBERi0xLjQKJcfsj6IKMSAwIG9iago8PD4+CmVuZG9iagp0cmFpbGVyCjw8Pj4KJSVFT0YK"
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CLAUDE = "anthropic.claude-sonnet-4-20250514-v1:0"
USER = {"role": "user", "content": "Hi"}


# ---------------------------------------------------------------------------------------------------
# frames


def raw_frame(headers: bytes, payload: bytes) -> bytes:
    """A frame around already-encoded header bytes, with correct lengths and CRCs."""
    prelude = struct.pack(">II", 16 + len(headers) + len(payload), len(headers))
    body = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers + payload
    return body + struct.pack(">I", zlib.crc32(body))


def header(name: str, kind: int, value: bytes = b"") -> bytes:
    raw = name.encode()
    return bytes((len(raw),)) + raw + bytes((kind,)) + value


def event(name: str, payload: dict[str, Any], *, pad: bool = True) -> bytes:
    """A ConverseStream event frame as Bedrock sends it (with the ``p`` padding field)."""
    body = {**payload, "p": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"} if pad else payload
    headers = {":event-type": name, ":content-type": "application/json", ":message-type": "event"}
    return encode(headers, orjson.dumps(body))


def exception(kind: str, message: str) -> bytes:
    headers = {":exception-type": kind, ":content-type": "application/json", ":message-type": "exception"}
    return encode(headers, orjson.dumps({"message": message}))


SAMPLE_FRAMES = [
    encode({":message-type": "event", ":event-type": "messageStart"}, b'{"role":"assistant"}'),
    encode({}, b""),  # the smallest frame: 16 bytes
    encode({"x": ""}, b"\x00\xff" * 300),
    encode({"é名": "ünïcödé ✓"}, b"{}"),
]
SAMPLE = b"".join(SAMPLE_FRAMES)
SAMPLE_MESSAGES = [
    Message({":message-type": "event", ":event-type": "messageStart"}, b'{"role":"assistant"}'),
    Message({}, b""),
    Message({"x": ""}, b"\x00\xff" * 300),
    Message({"é名": "ünïcödé ✓"}, b"{}"),
]


def decode_all(chunks: list[bytes]) -> list[Message]:
    decoder = EventStreamDecoder()
    out = [message for chunk in chunks for message in decoder.feed(chunk)]
    assert decoder.pending == b""
    decoder.finish()
    return out


def botocore_decode(data: bytes) -> list[tuple[dict[str, Any], bytes]]:
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    return [(message.headers, message.payload) for message in buffer]


# ---------------------------------------------------------------------------------------------------
# the decoder


def test_decoder_reads_frames_cut_at_every_byte() -> None:
    assert decode_all([SAMPLE]) == SAMPLE_MESSAGES
    assert decode_all([SAMPLE[i : i + 1] for i in range(len(SAMPLE))]) == SAMPLE_MESSAGES
    for cut in range(len(SAMPLE) + 1):
        decoder = EventStreamDecoder()
        first = decoder.feed(SAMPLE[:cut])
        boundary = max(end for end in frame_ends() if end <= cut)
        assert decoder.pending == SAMPLE[boundary:cut]  # only the incomplete frame is held
        assert first + decoder.feed(SAMPLE[cut:]) == SAMPLE_MESSAGES


def frame_ends() -> list[int]:
    ends = [0]
    for frame in SAMPLE_FRAMES:
        ends.append(ends[-1] + len(frame))
    return ends


@pytest.mark.parametrize("how", CHUNKINGS)
def test_decoder_reads_any_chunking(how: str) -> None:
    assert decode_all(split(SAMPLE * 3, how)) == SAMPLE_MESSAGES * 3


def test_botocore_reads_the_same_frames() -> None:
    """Frames made by ``encode`` (seeded random headers and payloads) read the same in botocore."""
    rng = random.Random(7)
    frames = []
    for _ in range(200):
        headers = {
            "".join(rng.choices("abc:-é", k=rng.randint(1, 12))): "".join(rng.choices("xyz ✓\n", k=rng.randint(0, 40)))
            for _ in range(rng.randint(0, 5))
        }
        frames.append((headers, rng.randbytes(rng.choice((0, 1, 15, 16, 17, 1000, 70_000)))))
    data = b"".join(encode(headers, payload) for headers, payload in frames)
    ours = decode_all(split(data, "seed-1"))
    assert [(message.headers, message.payload) for message in ours] == frames
    assert botocore_decode(data) == frames


def test_every_header_type_reads_as_botocore_reads_it() -> None:
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    headers = (
        header("true", 0)
        + header("false", 1)
        + header("byte", 2, struct.pack(">b", -7))
        + header("short", 3, struct.pack(">h", -300))
        + header("int", 4, struct.pack(">i", -70_000))
        + header("long", 5, struct.pack(">q", -(2**40)))
        + header("bytes", 6, struct.pack(">H", 3) + b"\x00\x01\xff")
        + header("string", 7, struct.pack(">H", 5) + "ünï".encode())
        + header("timestamp", 8, struct.pack(">q", 1_700_000_000_123))
        + header("uuid", 9, ident.bytes)
    )
    frame = raw_frame(headers, b"payload")
    (message,) = decode_all([frame])
    expected = {
        "true": True,
        "false": False,
        "byte": -7,
        "short": -300,
        "int": -70_000,
        "long": -(2**40),
        "bytes": b"\x00\x01\xff",
        "string": "ünï",
        "timestamp": 1_700_000_000_123,
        "uuid": ident,
    }
    assert message == Message(expected, b"payload")
    ((boto_headers, boto_payload),) = botocore_decode(frame)
    assert {**boto_headers, "uuid": uuid.UUID(bytes=boto_headers["uuid"])} == expected
    assert boto_payload == b"payload"
    assert message.header("string") == "ünï" and message.header("int") is None and message.header("nope") is None


def test_a_flipped_byte_anywhere_is_rejected() -> None:
    frame = SAMPLE_FRAMES[0]
    for position in range(len(frame)):
        corrupt = bytearray(frame)
        corrupt[position] ^= 0x20
        with pytest.raises(EventStreamError, match="checksum mismatch"):
            EventStreamDecoder().feed(bytes(corrupt))


def test_corrupt_frame_keeps_the_frames_before_it_and_breaks_the_decoder() -> None:
    corrupt = bytearray(SAMPLE_FRAMES[2])
    corrupt[-1] ^= 1
    decoder = EventStreamDecoder()
    with pytest.raises(EventStreamError, match=r"message checksum mismatch \(expected 0x") as caught:
        decoder.feed(SAMPLE_FRAMES[0] + SAMPLE_FRAMES[1] + bytes(corrupt) + SAMPLE_FRAMES[3])
    assert caught.value.messages == SAMPLE_MESSAGES[:2]
    with pytest.raises(EventStreamError, match="already broken"):
        decoder.feed(SAMPLE_FRAMES[3])


def prelude(total: int, headers_length: int) -> bytes:
    head = struct.pack(">II", total, headers_length)
    return head + struct.pack(">I", zlib.crc32(head))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (prelude(MAX_FRAME_LENGTH + 1, 0), "frame length 16777217 is outside 16..16777216"),
        (prelude(15, 0), "frame length 15 is outside"),
        (prelude(0, 0), "frame length 0 is outside"),
        (prelude(40, 25), "headers length 25 does not fit a frame of 40 bytes"),
        (prelude(200_000, 150_000), "headers length 150000 does not fit"),
        (raw_frame(header("a", 10), b""), "header 'a' has unknown type 10"),
        (raw_frame(header("a", 0) + header("a", 1), b""), "header 'a' appears twice"),
        (raw_frame(header("a", 4, b"\x00\x01"), b""), "header 'a' is cut short"),
        (raw_frame(header("a", 7, b"\x00\x09abc"), b""), "header 'a' is cut short"),
        (raw_frame(header("a", 7, b"\x00"), b""), "header 'a' is cut short"),
        (raw_frame(header("a", 9, b"\x00" * 15), b""), "header 'a' is cut short"),
        (raw_frame(b"\x05ab", b""), "a header name is cut short"),
        (raw_frame(header("a", 7, b"\x00\x02\xff\xfe"), b""), "header 'a' is not UTF-8"),
        (raw_frame(b"\x02\xff\xfe\x00", b""), "a header name is not UTF-8"),
        (raw_frame(b"\x01a", b""), "header 'a' is cut short"),
    ],
)
def test_malformed_frames_are_rejected_at_once(data: bytes, match: str) -> None:
    """Bounds are checked on the prelude alone: a huge length is refused before its bytes are awaited."""
    with pytest.raises(EventStreamError, match=match):
        EventStreamDecoder().feed(data)


def test_finish_reports_a_cut_frame() -> None:
    decoder = EventStreamDecoder()
    assert decoder.feed(SAMPLE[:-5]) == SAMPLE_MESSAGES[:-1]
    assert decoder.pending == SAMPLE_FRAMES[-1][:-5]
    held = len(SAMPLE_FRAMES[-1]) - 5
    with pytest.raises(EventStreamError, match=rf"ended inside a frame \({held} bytes of it received\)"):
        decoder.finish()
    assert decoder.pending == b""
    EventStreamDecoder().finish()  # nothing held: a clean end


def test_encode_refuses_what_the_format_cannot_carry() -> None:
    with pytest.raises(ValueError, match="too long"):
        encode({"a" * 256: "x"}, b"")
    with pytest.raises(ValueError, match="too long"):
        encode({"a": "x" * 65_536}, b"")
    with pytest.raises(ValueError, match="over the event-stream limits"):
        encode({}, b"x" * MAX_FRAME_LENGTH)


# ---------------------------------------------------------------------------------------------------
# request


def test_request_becomes_converse_body() -> None:
    body = {
        "model": "claude-sonnet-4",
        "max_tokens": 300,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "stop_sequences": ["END", ""],
        "stream": True,
        "metadata": {"user_id": "u-1"},
        "service_tier": "auto",
        "tools": [{"name": "weather", "description": "Weather now", "input_schema": WEATHER_SCHEMA}],
        "tool_choice": {"type": "auto"},
    }
    assert br.request(body, model=CLAUDE) == {
        "messages": [{"role": "user", "content": [{"text": "What's the weather in Paris?"}]}],
        "system": [{"text": "Be brief."}],
        "inferenceConfig": {"maxTokens": 300, "temperature": 0.2, "topP": 0.9, "stopSequences": ["END"]},
        "toolConfig": {
            "tools": [
                {"toolSpec": {"name": "weather", "description": "Weather now", "inputSchema": {"json": WEATHER_SCHEMA}}}
            ],
            "toolChoice": {"auto": {}},
        },
        "additionalModelRequestFields": {"top_k": 40},
    }


def test_minimal_request_has_only_messages() -> None:
    assert br.request({"model": "m", "messages": [USER]}, model="meta.llama3-70b-instruct-v1:0") == {
        "messages": [{"role": "user", "content": [{"text": "Hi"}]}]
    }


def test_system_blocks_and_blank_text_and_consecutive_turns() -> None:
    body = {
        "model": "m",
        "system": [
            {"type": "text", "text": "One.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "  "},
            {"type": "text", "text": "Two."},
        ],
        "messages": [
            {"role": "user", "content": "First"},
            {"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "Second"}]},
            {"role": "assistant", "content": ""},  # nothing left: dropped, so the user turns around it merge
            {"role": "user", "content": [{"type": "text", "text": "Third", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Sure", "citations": None}]},
        ],
    }
    assert br.request(body, model=CLAUDE) == {
        "messages": [
            {"role": "user", "content": [{"text": "First"}, {"text": "Second"}, {"text": "Third"}]},
            {"role": "assistant", "content": [{"text": "Sure"}]},  # a final assistant turn: a prefill
        ],
        "system": [{"text": "One."}, {"text": "Two."}],
    }


def test_tool_round_trip_becomes_tool_use_and_tool_result() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Oslo"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "is_error": True,
                        "content": [
                            {"type": "text", "text": "no station"},
                            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                        ],
                    },
                    {"type": "tool_result", "tool_use_id": "toolu_3", "is_error": False},
                ],
            },
        ],
        "tools": [{"name": "weather", "input_schema": WEATHER_SCHEMA, "cache_control": {"type": "ephemeral"}}],
    }
    assert br.request(body, model=CLAUDE)["messages"] == [
        {"role": "user", "content": [{"text": "Weather in Paris and Oslo?"}]},
        {
            "role": "assistant",
            "content": [
                {"text": "Checking."},
                {"toolUse": {"toolUseId": "toolu_1", "name": "weather", "input": {"city": "Paris"}}},
                {"toolUse": {"toolUseId": "toolu_2", "name": "weather", "input": {"city": "Oslo"}}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"toolResult": {"toolUseId": "toolu_1", "content": [{"text": "18C"}]}},
                {
                    "toolResult": {
                        "toolUseId": "toolu_2",
                        "content": [
                            {"text": "no station"},
                            {"image": {"format": "png", "source": {"bytes": PNG_B64}}},
                        ],
                        "status": "error",
                    }
                },
                {"toolResult": {"toolUseId": "toolu_3", "content": []}},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"auto": {}}),
        ({"type": "any"}, {"any": {}}),
        ({"type": "tool", "name": "weather"}, {"tool": {"name": "weather"}}),
        ({"type": "auto", "disable_parallel_tool_use": False}, {"auto": {}}),
        (None, None),
    ],
)
def test_tool_choice(choice: dict[str, Any] | None, expected: dict[str, Any] | None) -> None:
    tools = [{"name": "weather", "input_schema": WEATHER_SCHEMA, "description": ""}]
    config = br.request({"model": "m", "messages": [USER], "tools": tools, "tool_choice": choice}, model=CLAUDE)[
        "toolConfig"
    ]
    assert config["tools"] == [{"toolSpec": {"name": "weather", "inputSchema": {"json": WEATHER_SCHEMA}}}]
    assert config.get("toolChoice") == expected


def test_tool_choice_none_leaves_the_tools_out() -> None:
    tools = [{"name": "weather", "input_schema": WEATHER_SCHEMA}]
    out = br.request({"model": "m", "messages": [USER], "tools": tools, "tool_choice": {"type": "none"}}, model="m")
    assert out == {"messages": [{"role": "user", "content": [{"text": "Hi"}]}]}
    # auto without tools is no choice at all
    assert "toolConfig" not in br.request(
        {"model": "m", "messages": [USER], "tool_choice": {"type": "auto"}}, model="m"
    )


def test_images_and_documents() -> None:
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": media, "data": PNG_B64}}
        for media in ("image/png", "image/jpeg", "image/gif", "image/webp")
    ] + [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
            "title": "Q3 report: final_v2.pdf (draft) [x]",
            "context": "finance",
        },
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
            "citations": {"enabled": False},
        },
        {"type": "text", "text": "Summarise."},
    ]
    out = br.request({"model": "m", "messages": [{"role": "user", "content": content}]}, model="m")
    blocks = out["messages"][0]["content"]
    assert [block["image"]["format"] for block in blocks[:4]] == ["png", "jpeg", "gif", "webp"]
    assert all(block["image"]["source"] == {"bytes": PNG_B64} for block in blocks[:4])
    assert blocks[4:] == [
        {
            "document": {
                "format": "pdf",
                "name": "Q3 report final v2 pdf (draft) [x]",
                "source": {"bytes": PDF_B64},
                "context": "finance",
            }
        },
        {"document": {"format": "pdf", "name": "document messages 0 content 5", "source": {"bytes": PDF_B64}}},
        {"text": "Summarise."},
    ]


def test_thinking_for_anthropic_models() -> None:
    body = {
        "model": "m",
        "max_tokens": 4000,
        "thinking": {"type": "enabled", "budget_tokens": 2000},
        "messages": [
            USER,
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Hmm.", "signature": "sig=="},
                    {"type": "redacted_thinking", "data": "b3BhcXVl"},
                    {"type": "text", "text": "Hello"},
                ],
            },
            {"role": "user", "content": "Again"},
        ],
    }
    for model in (CLAUDE, "us.anthropic.claude-3-7-sonnet-20250219-v1:0"):
        out = br.request(body, model=model)
        assert out["additionalModelRequestFields"] == {"thinking": {"type": "enabled", "budget_tokens": 2000}}
        assert out["messages"][1]["content"] == [
            {"reasoningContent": {"reasoningText": {"text": "Hmm.", "signature": "sig=="}}},
            {"reasoningContent": {"redactedContent": "b3BhcXVl"}},
            {"text": "Hello"},
        ]
    with pytest.raises(
        TranslationError, match=r"extended 'thinking' cannot be served by the Bedrock model 'amazon\.nova"
    ):
        br.request(body, model="amazon.nova-pro-v1:0")
    # Thinking off: earlier thinking blocks are dropped, for any model.
    off = br.request({**body, "thinking": {"type": "disabled"}}, model="amazon.nova-pro-v1:0")
    assert off["messages"][1]["content"] == [{"text": "Hello"}]
    assert "additionalModelRequestFields" not in off


TOOL_TURNS = [
    USER,
    {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "weather", "input": {}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
]
TOOLS = [{"name": "weather", "input_schema": WEATHER_SCHEMA}]


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "'mcp_servers' cannot be translated"),
        ({"container": "c1"}, "'container' cannot be translated to the Bedrock Converse API"),
        ({"context_management": {}}, "'context_management' cannot be translated"),
        ({"frobnicate": 1}, "'frobnicate' cannot be translated"),
        ({"metadata": {"user_id": "u", "tenant": "t"}}, "'metadata.tenant' cannot be translated"),
        ({"metadata": {"user_id": 5}}, "'metadata.user_id' must be a string"),
        ({"metadata": "u"}, "'metadata' must be an object"),
        ({"stream": "yes"}, "'stream' must be a boolean"),
        ({"thinking": "on"}, "'thinking' must be an object"),
        ({"max_tokens": 0}, "'max_tokens' must be an integer from 1 to"),
        ({"temperature": "hot"}, "'temperature' must be a number"),
        ({"top_k": -1}, "'top_k' must be an integer from 0 to"),
        ({"stop_sequences": "END"}, "'stop_sequences' must be an array of strings"),
        ({"system": [{"type": "image"}]}, "'system' may only hold text blocks"),
        ({"system": 3}, "'system' must be a string or an array of text blocks"),
        ({"messages": []}, "'messages' must be a non-empty array"),
        ({"messages": [{"role": "user", "content": " "}]}, "'messages' hold no content"),
        ({"messages": [{"role": "system", "content": "x"}]}, "'messages.0.role' 'system' cannot be translated"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "'messages.0.content.0.text' must be a string",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "search_result"}]}]},
            "'messages.0.content' block type 'search_result' cannot be translated",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "url", "url": "https://x/a.png"}}],
                    }
                ]
            },
            "'messages.0.content.0' is an image URL: the Bedrock Converse API takes images as base64 data only",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": "AA=="}}
                        ],
                    }
                ]
            },
            "image type 'image/bmp' is not supported",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "hi"}}
                        ],
                    }
                ]
            },
            "only base64 PDF documents can be translated",
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
            "document citations cannot be translated",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "search_result"}]}
                        ],
                    }
                ]
            },
            "'messages.0.content.0.content' block type 'search_result' cannot be translated",
        ),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "'web_search_20250305' is an Anthropic server tool",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "any", "disable_parallel_tool_use": True}},
            "'tool_choice.disable_parallel_tool_use' cannot be translated",
        ),
        ({"tool_choice": {"type": "any"}}, "'tool_choice' 'any' needs tools"),
        ({"tool_choice": {"type": "tool", "name": "weather"}}, "'tool_choice' 'tool' needs tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "sometimes"}}, "'tool_choice' type 'sometimes' cannot be translated"),
        ({"messages": TOOL_TURNS}, "needs the tools sent along when messages hold tool_use or tool_result blocks"),
        ({"messages": TOOL_TURNS, "tools": TOOLS, "tool_choice": {"type": "none"}}, "'tool_choice' none"),
    ],
)
def test_what_converse_cannot_express_is_refused(fields: dict[str, Any], match: str) -> None:
    body = {"model": "m", "max_tokens": 10, "messages": [USER], **fields}
    with pytest.raises(TranslationError, match=match):
        br.request(body, model="m")


def test_request_body_must_be_an_object() -> None:
    with pytest.raises(TranslationError, match="must be a JSON object"):
        br.request([], model="m")  # type: ignore[arg-type]


def test_tool_blocks_with_tools_are_fine() -> None:
    out = br.request({"model": "m", "messages": TOOL_TURNS, "tools": TOOLS}, model="m")
    assert out["toolConfig"] == {"tools": [{"toolSpec": {"name": "weather", "inputSchema": {"json": WEATHER_SCHEMA}}}]}


# ---------------------------------------------------------------------------------------------------
# a Converse request read back (the body a fallback hop re-sends)


def text_turn(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def image_block(media_type: str) -> dict[str, Any]:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": PNG_B64}}


def pdf_block(**fields: Any) -> dict[str, Any]:
    return {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
        **fields,
    }


def canonical(body: dict[str, Any], model: str = "m") -> dict[str, Any]:
    return {"model": model, "max_tokens": 100, **body}


SPOKEN_TOOLS = [
    {"name": "weather", "description": "Weather now", "input_schema": WEATHER_SCHEMA},
    {"name": "time", "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}}},
]
TOOL_CONVERSATION = [
    text_turn("user", "Weather in Paris and Oslo?"),
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Oslo", "n": [1, 2.5, None]}},
            {"type": "tool_use", "id": "toolu_3", "name": "time", "input": {}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
            {
                "type": "tool_result",
                "tool_use_id": "toolu_2",
                "is_error": True,
                "content": [{"type": "text", "text": "no station"}, image_block("image/png"), pdf_block(title="log")],
            },
            {"type": "tool_result", "tool_use_id": "toolu_3"},
            {"type": "text", "text": "And tomorrow?"},
        ],
    },
    {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_4", "name": "weather", "input": {"city": "Paris", "day": 1}}],
    },
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_4", "is_error": True}]},
]

# Canonical requests in the shape canonical_request writes: each must come back exactly.
ROUND_TRIPS: dict[str, tuple[dict[str, Any], str]] = {
    "text": (canonical({"messages": [text_turn("user", "Hi")]}), "amazon.nova-pro-v1:0"),
    "system and turns": (
        canonical(
            {
                "system": "Be brief.",
                "messages": [
                    text_turn("user", "Hi"),
                    text_turn("assistant", "Hello."),
                    {"role": "user", "content": [{"type": "text", "text": "Two"}, {"type": "text", "text": "parts"}]},
                    text_turn("assistant", "{"),  # a prefill
                ],
            }
        ),
        "meta.llama3-70b-instruct-v1:0",
    ),
    "system blocks": (
        canonical(
            {
                "system": [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}],
                "messages": [text_turn("user", "Hi")],
            }
        ),
        CLAUDE,
    ),
    "images": (
        canonical(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            *(image_block(m) for m in ("image/png", "image/jpeg", "image/gif", "image/webp")),
                            {"type": "text", "text": "What are these?"},
                        ],
                    }
                ]
            }
        ),
        CLAUDE,
    ),
    "pdf": (
        canonical(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            pdf_block(title="Q3 report (draft) [v2]", context="finance"),
                            pdf_block(),  # untitled: the name Converse needs is made from its position
                            pdf_block(context="second"),
                            {"type": "text", "text": "Summarise."},
                        ],
                    }
                ]
            }
        ),
        "mistral.mistral-large-2402-v1:0",
    ),
    **{
        f"tools, tool_choice {choice and choice['type']}": (
            canonical(
                {
                    "messages": [text_turn("user", "Weather?")],
                    "tools": SPOKEN_TOOLS,
                    **({"tool_choice": choice} if choice else {}),
                }
            ),
            CLAUDE,
        )
        for choice in (None, {"type": "auto"}, {"type": "any"}, {"type": "tool", "name": "time"})
    },
    "tool use, results and errors": (
        canonical({"messages": TOOL_CONVERSATION, "tools": SPOKEN_TOOLS, "tool_choice": {"type": "auto"}}),
        "cohere.command-r-plus-v1:0",
    ),
    "thinking": (
        canonical(
            {
                "max_tokens": 4000,
                "thinking": {"type": "enabled", "budget_tokens": 2000},
                "messages": [
                    text_turn("user", "Hi"),
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "thinking", "thinking": "Hmm.", "signature": "sig=="},
                            {"type": "redacted_thinking", "data": "b3BhcXVl"},
                            {"type": "text", "text": "Hello"},
                            {"type": "tool_use", "id": "toolu_9", "name": "time", "input": {"tz": "UTC"}},
                        ],
                    },
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "toolu_9",
                                "content": [{"type": "text", "text": "09:00"}],
                            }
                        ],
                    },
                ],
                "tools": SPOKEN_TOOLS,
            }
        ),
        "us.anthropic.claude-3-7-sonnet-20250219-v1:0",
    ),
    "sampling and stop sequences": (
        canonical(
            {
                "messages": [text_turn("user", "Count")],
                "temperature": 0.2,
                "top_p": 0.9,
                "top_k": 40,
                "stop_sequences": ["END", "STOP"],
            }
        ),
        CLAUDE,
    ),
    "zeros": (canonical({"messages": [text_turn("user", "x")], "temperature": 0, "top_k": 0}), CLAUDE),
}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_canonical_request_undoes_request(name: str) -> None:
    body, bedrock_model = ROUND_TRIPS[name]
    converse = orjson.loads(orjson.dumps(br.request(body, model=bedrock_model)))  # as Envoy re-sends it
    back = br.canonical_request(converse, model=body["model"], stream=False, default_max_tokens=7)
    assert back == body
    assert br.request(back, model=bedrock_model) == converse


def test_canonical_request_reads_back_what_request_normalised() -> None:
    """What ``request`` drops, merges or reduces comes back in its normal form: the same request."""
    body = {
        "model": "m",
        "max_tokens": 50,
        "stream": True,
        "service_tier": "auto",
        "metadata": {"user_id": "u-1"},
        "thinking": {"type": "disabled"},
        "system": [
            {"type": "text", "text": "Only.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": " "},
        ],
        "messages": [
            {"role": "user", "content": "First"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": ""},
                    pdf_block(title="Q3: final_v2.pdf", citations={"enabled": False}),
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "x", "signature": "s"},
                    {"type": "text", "text": "Sure", "citations": None},
                ],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "  "}]},
        ],
        "tools": [
            {
                "type": "custom",
                "name": "weather",
                "description": "",
                "input_schema": WEATHER_SCHEMA,
                "cache_control": {"type": "ephemeral"},
            }
        ],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": False},
        "stop_sequences": [""],
    }
    back = br.canonical_request(br.request(body, model=CLAUDE), model="gpt-4o", stream=True, default_max_tokens=7)
    assert back == {
        "model": "gpt-4o",
        "max_tokens": 50,
        "stream": True,
        "system": "Only.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "First"}, pdf_block(title="Q3 final v2 pdf")]},
            {"role": "assistant", "content": [{"type": "text", "text": "Sure"}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
        ],
        "tools": [{"name": "weather", "input_schema": WEATHER_SCHEMA}],
        "tool_choice": {"type": "auto"},
    }
    # tool_choice none leaves the tools out, so they do not come back.
    none = {"model": "m", "max_tokens": 5, "messages": [USER], "tools": TOOLS, "tool_choice": {"type": "none"}}
    assert br.canonical_request(br.request(none, model="m"), model="m", stream=False, default_max_tokens=5) == {
        "model": "m",
        "max_tokens": 5,
        "messages": [text_turn("user", "Hi")],
    }


def test_stream_flag_and_default_max_tokens() -> None:
    converse = {"messages": [{"role": "user", "content": [{"text": "Hi"}]}]}
    assert br.canonical_request(converse, model="gpt-4o", stream=True, default_max_tokens=4096) == {
        "model": "gpt-4o",
        "messages": [text_turn("user", "Hi")],
        "max_tokens": 4096,
        "stream": True,
    }
    set_limit = {**converse, "inferenceConfig": {"maxTokens": 12}}
    back = br.canonical_request(set_limit, model="gpt-4o", stream=False, default_max_tokens=4096)
    assert back == {"model": "gpt-4o", "messages": [text_turn("user", "Hi")], "max_tokens": 12}
    assert "stream" not in back


def test_null_fields_read_as_absent_and_a_signature_may_be_missing() -> None:
    converse = {
        "messages": [
            {"role": "user", "content": [{"text": "Hi"}]},
            {"role": "assistant", "content": [{"reasoningContent": {"reasoningText": {"text": "Hmm."}}}]},
        ],
        "system": None,
        "inferenceConfig": {"maxTokens": None, "temperature": None},
        "toolConfig": None,
        "additionalModelRequestFields": {"top_k": None},
        "guardrailConfig": None,
    }
    assert br.canonical_request(converse, model="m", stream=False, default_max_tokens=9) == {
        "model": "m",
        "max_tokens": 9,
        "messages": [
            text_turn("user", "Hi"),
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "Hmm.", "signature": ""}]},
        ],
    }


OPENAI_CHAT: dict[str, Any] = {
    "model": "support_bot",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "no station"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "And this picture?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
            ],
        },
    ],
    "tools": [
        {"type": "function", "function": {"name": "weather", "description": "Weather", "parameters": WEATHER_SCHEMA}}
    ],
    "tool_choice": "required",
    "max_completion_tokens": 300,
    "temperature": 0.2,
    "top_p": 0.9,
    "stop": ["END"],
}


def _same_content(value: Any) -> Any:
    """A string content and one text part say the same."""
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


def test_openai_request_sent_to_bedrock_then_to_openai_again() -> None:
    """OpenAI caller → Bedrock hop fails → the next hop is OpenAI: its body says what the caller said."""
    converse = br.request(o2a.request(OPENAI_CHAT, model="claude-3", default_max_tokens=4096), model=CLAUDE)
    canonical_again = br.canonical_request(converse, model="gpt-4o", stream=True, default_max_tokens=4096)
    chat = a2o.request(canonical_again, model="gpt-4o")
    mock._validate_chat(chat, {})
    assert chat["model"] == "gpt-4o"
    assert [message["role"] for message in chat["messages"]] == [m["role"] for m in OPENAI_CHAT["messages"]]
    for sent, original in zip(chat["messages"], OPENAI_CHAT["messages"], strict=True):
        assert _same_content(sent["content"]) == _same_content(original["content"])
        assert sent.get("tool_call_id") == original.get("tool_call_id")
        calls = [
            (c["id"], c["function"]["name"], orjson.loads(c["function"]["arguments"]))
            for c in sent.get("tool_calls", [])
        ]
        expected = [
            (c["id"], c["function"]["name"], orjson.loads(c["function"]["arguments"]))
            for c in original.get("tool_calls", [])
        ]
        assert calls == expected
    assert chat["tools"] == OPENAI_CHAT["tools"]
    assert chat["tool_choice"] == "required"
    assert (chat["max_completion_tokens"], chat["temperature"], chat["top_p"], chat["stop"]) == (300, 0.2, 0.9, ["END"])
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    # The same as the direct path (OpenAI → canonical → OpenAI), which never went through Converse.
    direct = a2o.request({**o2a.request(OPENAI_CHAT, model="claude-3"), "stream": True}, model="gpt-4o")
    assert _canonical_openai(chat) == _canonical_openai(direct)


def _bedrock_ready(body: dict[str, Any]) -> dict[str, Any]:
    """A random canonical request without what Converse refuses (image URLs, one tool per turn, tool
    blocks without tools)."""
    for message in body["messages"]:
        if isinstance(message["content"], list):
            message["content"] = [
                image_block("image/jpeg") if block.get("source", {}).get("type") == "url" else block
                for block in message["content"]
            ]
    body.get("tool_choice", {}).pop("disable_parallel_tool_use", None)
    body.setdefault("tools", SPOKEN_TOOLS)
    return body


@pytest.mark.parametrize("seed", range(40))
def test_random_conversations_survive_bedrock_and_back(seed: int) -> None:
    body = _bedrock_ready(_random_anthropic_request(random.Random(seed)))
    converse = br.request(body, model=CLAUDE)
    back = br.canonical_request(converse, model="claude-3", stream=bool(body.get("stream")), default_max_tokens=1)
    assert br.request(back, model=CLAUDE) == converse
    # In OpenAI's terms nothing was lost but metadata.user_id, which Converse has no field for.
    via_bedrock, direct = a2o.request(back, model="gpt-4o"), a2o.request(body, model="gpt-4o")
    direct.pop("user", None)
    assert _canonical_openai(via_bedrock) == _canonical_openai(direct)


def converse_with(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [{"text": "Hi"}]}], **fields}


def converse_block(block: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [block]}]}


def converse_result(*content: Any, **fields: Any) -> dict[str, Any]:
    return converse_block({"toolResult": {"toolUseId": "t", "content": list(content), **fields}})


CONVERSE_IMAGE = {"image": {"format": "png", "source": {"bytes": PNG_B64}}}
CONVERSE_PDF = {"document": {"format": "pdf", "name": "a", "source": {"bytes": PDF_B64}}}
CONVERSE_TOOLS = [{"toolSpec": {"name": "weather", "inputSchema": {"json": WEATHER_SCHEMA}}}]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ([], "the request body must be a JSON object"),
        (
            converse_with(guardrailConfig={"guardrailIdentifier": "g"}),
            "^'guardrailConfig' cannot be translated from the Bedrock Converse API$",
        ),
        (converse_with(modelId="x"), "'modelId' cannot be translated"),
        (converse_with(promptVariables={}), "'promptVariables' cannot be translated"),
        ({}, "'messages' must be a non-empty array"),
        ({"messages": []}, "'messages' must be a non-empty array"),
        ({"messages": ["hi"]}, "'messages.0' must be an object"),
        ({"messages": [{"role": "system", "content": []}]}, "'messages.0.role' must be 'user' or 'assistant'"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "'messages.0.content' must be an array"),
        ({"messages": [{"role": "user", "content": [], "name": "x"}]}, "'messages.0.name' cannot be translated"),
        (
            converse_block({"text": "a", "cachePoint": {}}),
            "'messages.0.content.0' must be an object with exactly one key",
        ),
        (converse_block({}), "'messages.0.content.0' must be an object with exactly one key"),
        (converse_block("Hi"), "'messages.0.content.0' must be an object with exactly one key"),
        (converse_block({"cachePoint": {"type": "default"}}), "'messages.0.content.0.cachePoint' cannot be translated"),
        (converse_block({"video": {}}), "'messages.0.content.0.video' cannot be translated"),
        (converse_block({"guardContent": {}}), "'messages.0.content.0.guardContent' cannot be translated"),
        (converse_block({"text": 5}), "'messages.0.content.0.text' must be a string"),
        (converse_block({"image": "x"}), "'messages.0.content.0.image' must be an object"),
        (
            converse_block({"image": {"format": "bmp", "source": {"bytes": "AA=="}}}),
            "'messages.0.content.0.image.format' 'bmp' cannot be translated",
        ),
        (
            converse_block({"image": {"format": "png", "source": {"s3Location": {"uri": "s3://b/k"}}}}),
            "'messages.0.content.0.image.source.s3Location' cannot be translated",
        ),
        (
            converse_block({"image": {"format": "png", "source": {"bytes": 5}}}),
            "'messages.0.content.0.image.source.bytes' must be a string",
        ),
        (
            converse_block({"document": {"format": "txt", "name": "a", "source": {"bytes": "aGk="}}}),
            "'messages.0.content.0.document.format': only PDF documents can be translated",
        ),
        (
            converse_block({"document": {**CONVERSE_PDF["document"], "citations": {"enabled": True}}}),
            "'messages.0.content.0.document.citations' cannot be translated",
        ),
        (
            converse_block({"document": {"format": "pdf", "source": {"bytes": PDF_B64}}}),
            "'messages.0.content.0.document.name' must be a string",
        ),
        (
            converse_block({"toolUse": {"toolUseId": "t", "name": "n", "input": [1]}}),
            "'messages.0.content.0.toolUse.input' must be an object",
        ),
        (
            converse_block({"toolUse": {"toolUseId": "t", "name": "n", "input": {"big": 2**70}}}),
            "'messages.0.content.0.toolUse.input' holds an integer beyond 64 bits",
        ),
        (
            converse_block({"toolUse": {"name": "n", "input": {}}}),
            "'messages.0.content.0.toolUse.toolUseId' must be a string",
        ),
        (converse_result({"json": {"a": 1}}), "'messages.0.content.0.toolResult.content.0.json' cannot be translated"),
        (converse_result({"video": {}}), "'messages.0.content.0.toolResult.content.0.video' cannot be translated"),
        (converse_result(status="partial"), "'messages.0.content.0.toolResult.status' must be 'success' or 'error'"),
        (
            converse_block({"toolResult": {"toolUseId": "t"}}),
            "'messages.0.content.0.toolResult.content' must be an array",
        ),
        (
            converse_block({"reasoningContent": {"summary": "x"}}),
            "'messages.0.content.0.reasoningContent.summary' cannot be translated",
        ),
        (
            converse_block({"reasoningContent": {"reasoningText": {"text": "x", "signature": 5}}}),
            "'messages.0.content.0.reasoningContent.reasoningText.signature' must be a string",
        ),
        (converse_with(system="Be brief."), "'system' must be an array"),
        (converse_with(system=[{"guardContent": {}}]), "'system.0.guardContent' cannot be translated"),
        (converse_with(system=[{"text": "a"}, {"cachePoint": {}}]), "'system.1.cachePoint' cannot be translated"),
        (converse_with(inferenceConfig=[]), "'inferenceConfig' must be an object"),
        (converse_with(inferenceConfig={"maxTokens": 0}), "'inferenceConfig.maxTokens' must be an integer from 1 to"),
        (converse_with(inferenceConfig={"topP": "x"}), "'inferenceConfig.topP' must be a number"),
        (converse_with(inferenceConfig={"temperature": True}), "'inferenceConfig.temperature' must be a number"),
        (converse_with(inferenceConfig={"stopSequences": "END"}), "'inferenceConfig.stopSequences' must be an array"),
        (converse_with(inferenceConfig={"topK": 3}), "'inferenceConfig.topK' cannot be translated"),
        (
            converse_with(additionalModelRequestFields={"reasoning_effort": "low"}),
            "'additionalModelRequestFields.reasoning_effort' cannot be translated",
        ),
        (
            converse_with(additionalModelRequestFields={"top_k": -1}),
            "'additionalModelRequestFields.top_k' must be an integer",
        ),
        (
            converse_with(additionalModelRequestFields={"thinking": "on"}),
            "'additionalModelRequestFields.thinking' must be an object with a string 'type'",
        ),
        (converse_with(toolConfig={"tools": []}), "'toolConfig.tools' must be a non-empty array"),
        (converse_with(toolConfig={"toolChoice": {"auto": {}}}), "'toolConfig.tools' must be a non-empty array"),
        (
            converse_with(toolConfig={"tools": [{"cachePoint": {}}]}),
            "'toolConfig.tools.0.cachePoint' cannot be translated",
        ),
        (
            converse_with(toolConfig={"tools": [{"toolSpec": {"name": "n"}}]}),
            "'toolConfig.tools.0.toolSpec.inputSchema' must be an object",
        ),
        (
            converse_with(toolConfig={"tools": [{"toolSpec": {"name": "n", "inputSchema": {"json": "{}"}}}]}),
            "'toolConfig.tools.0.toolSpec.inputSchema.json' must be an object",
        ),
        (
            converse_with(
                toolConfig={"tools": [{"toolSpec": {"name": "n", "strict": True, "inputSchema": {"json": {}}}}]}
            ),
            "'toolConfig.tools.0.toolSpec.strict' cannot be translated",
        ),
        (
            converse_with(toolConfig={"tools": CONVERSE_TOOLS, "toolChoice": {"none": {}}}),
            "'toolConfig.toolChoice.none' cannot be translated",
        ),
        (
            converse_with(toolConfig={"tools": CONVERSE_TOOLS, "toolChoice": {"auto": {"x": 1}}}),
            "'toolConfig.toolChoice.auto.x' cannot be translated",
        ),
        (
            converse_with(toolConfig={"tools": CONVERSE_TOOLS, "toolChoice": {"tool": {}}}),
            "'toolConfig.toolChoice.tool.name' must be a string",
        ),
        (
            converse_with(toolConfig={"tools": CONVERSE_TOOLS, "toolChoice": "auto"}),
            "'toolConfig.toolChoice' must be an object with exactly one key",
        ),
    ],
)
def test_what_canonical_request_cannot_read_back_is_refused(body: Any, match: str) -> None:
    with pytest.raises(TranslationError, match=match):
        br.canonical_request(body, model="m", stream=False, default_max_tokens=5)


def test_any_value_at_any_path_of_a_converse_body_reads_back_or_is_refused_cleanly() -> None:
    """Crafted Converse bodies: a canonical request (which ``request`` takes or refuses), never a crash."""
    bodies = [br.request(body, model=bedrock_model) for body, bedrock_model in ROUND_TRIPS.values()]
    seen = {"translated": 0, "refused": 0}
    for body in bodies:
        for path in paths(body):
            for value in [*VALUES, _DELETE] if path else VALUES:
                crafted = replaced(body, path, value)
                try:
                    result = outcome(read_back, crafted)
                    if result == "translated":
                        outcome(lambda canonical: br.request(canonical, model=CLAUDE), read_back(crafted))
                except AssertionError:
                    raise
                except Exception as exc:
                    pytest.fail(f"{type(exc).__name__}: {exc} at {path!r} = {value!r}")
                seen[result] += 1
    assert seen["translated"] > 100 and seen["refused"] > 100, seen


def read_back(body: Any) -> dict[str, Any]:
    return br.canonical_request(body, model="m", stream=False, default_max_tokens=5)


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


# ---------------------------------------------------------------------------------------------------
# response and error


CONVERSE_ANSWER = {
    "output": {
        "message": {
            "role": "assistant",
            "content": [
                {"reasoningContent": {"reasoningText": {"text": "User wants weather.", "signature": "sig=="}}},
                {"reasoningContent": {"redactedContent": "b3BhcXVl"}},
                {"text": "Let me check."},
                {"toolUse": {"toolUseId": "tooluse_abc", "name": "weather", "input": {"city": "Paris"}}},
            ],
        }
    },
    "stopReason": "tool_use",
    "usage": {
        "inputTokens": 12,
        "outputTokens": 30,
        "totalTokens": 142,
        "cacheReadInputTokens": 80,
        "cacheWriteInputTokens": 20,
    },
    "metrics": {"latencyMs": 812},
}


def test_converse_answer_becomes_anthropic_message() -> None:
    out = br.response(CONVERSE_ANSWER, requested_model="fraud_detector")
    assert out.pop("id").startswith("msg_bdrk_")
    assert out == {
        "type": "message",
        "role": "assistant",
        "model": "fraud_detector",
        "content": [
            {"type": "thinking", "thinking": "User wants weather.", "signature": "sig=="},
            {"type": "redacted_thinking", "data": "b3BhcXVl"},
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "tooluse_abc", "name": "weather", "input": {"city": "Paris"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 12,
            "output_tokens": 30,
            "cache_read_input_tokens": 80,
            "cache_creation_input_tokens": 20,
        },
    }


def test_anthropic_sdk_parses_translated_answer() -> None:
    body = orjson.dumps(br.response(CONVERSE_ANSWER, requested_model="fraud_detector"))
    message = anthropic_client(serve(body)).messages.create(model="fraud_detector", max_tokens=5, messages=[USER])
    assert [block.type for block in message.content] == ["thinking", "redacted_thinking", "text", "tool_use"]
    tool = message.content[3]
    assert tool.type == "tool_use" and (tool.id, tool.name, tool.input) == ("tooluse_abc", "weather", {"city": "Paris"})
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (12, 80)
    assert (message.usage.cache_creation_input_tokens, message.usage.output_tokens) == (20, 30)


@pytest.mark.parametrize(
    ("bedrock", "anthropic_reason"),
    [
        ("end_turn", "end_turn"),
        ("tool_use", "tool_use"),
        ("max_tokens", "max_tokens"),
        ("stop_sequence", "stop_sequence"),
        ("guardrail_intervened", "refusal"),
        ("content_filtered", "refusal"),
        ("model_context_window_exceeded", "model_context_window_exceeded"),
        ("malformed_model_output", "end_turn"),
        (None, "end_turn"),
        (7, "end_turn"),
    ],
)
def test_stop_reasons(bedrock: Any, anthropic_reason: str) -> None:
    answer = {"output": {"message": {"role": "assistant", "content": [{"text": "x"}]}}, "stopReason": bedrock}
    out = br.response(answer, requested_model="m")
    assert out["stop_reason"] == anthropic_reason
    assert out["usage"] == {  # no usage: zero counts
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
    }


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ([], "the answer is not a JSON object"),
        ({"output": {}}, "'output.message' is not an object"),
        ({"output": {"message": {"content": "hi"}}}, "'output.message.content' is not an array"),
        ({"output": {"message": {"content": ["hi"]}}}, "'output.message.content.0' is not an object"),
        ({"output": {"message": {"content": [{"text": 1}]}}}, "'output.message.content.0.text' is not a string"),
        (
            {"output": {"message": {"content": [{"toolUse": {"toolUseId": "t", "name": "n", "input": [1]}}]}}},
            "'output.message.content.0.toolUse.input' is not an object",
        ),
        (
            {"output": {"message": {"content": [{"toolUse": {"name": "n"}}]}}},
            "'output.message.content.0.toolUse.toolUseId' is not a string",
        ),
        (
            {
                "output": {
                    "message": {"content": [{"reasoningContent": {"reasoningText": {"text": "t", "signature": 1}}}]}
                }
            },
            "signature' is not a string",
        ),
        (
            {"output": {"message": {"content": [{"citationsContent": {}}]}}},
            "is a block Anthropic has no counterpart for \\('citationsContent'\\)",
        ),
    ],
)
def test_answers_of_the_wrong_shape_raise(body: Any, match: str) -> None:
    with pytest.raises(TranslationError, match=match):
        br.response(body, requested_model="m")


def test_answer_without_content_and_tool_without_input() -> None:
    empty = br.response({"output": {"message": {"role": "assistant"}}, "stopReason": "end_turn"}, requested_model="m")
    assert empty["content"] == []
    tool = {"toolUse": {"toolUseId": "t", "name": "n"}}
    out = br.response({"output": {"message": {"content": [tool]}}}, requested_model="m")
    assert out["content"] == [{"type": "tool_use", "id": "t", "name": "n", "input": {}}]


@pytest.mark.parametrize(
    ("status", "body", "err_type", "message"),
    [
        (400, b'{"message":"Malformed input request"}', "invalid_request_error", "Malformed input request"),
        (
            401,
            b'{"Message":"The security token included in the request is invalid."}',
            "authentication_error",
            "The security token included in the request is invalid.",
        ),
        (
            403,
            b'{"message":"You don\'t have access to the model"}',
            "permission_error",
            "You don't have access to the model",
        ),
        (404, b'{"message":"Model not found"}', "not_found_error", "Model not found"),
        (408, b'{"message":"Model timeout"}', "api_error", "Model timeout"),
        (424, b'{"message":"Model error"}', "api_error", "Model error"),
        (429, b'{"message":"Too many requests"}', "rate_limit_error", "Too many requests"),
        (500, b'{"message":"Internal"}', "api_error", "Internal"),
        (502, b"<html>Bad Gateway</html>", "api_error", "Upstream provider error (HTTP 502)"),
        (503, b'{"message":"Service unavailable"}', "overloaded_error", "Service unavailable"),
        (504, b"", "api_error", "Upstream provider error (HTTP 504)"),
        (418, b'{"message":""}', "invalid_request_error", "Upstream provider error (HTTP 418)"),
        (599, b'["message"]', "api_error", "Upstream provider error (HTTP 599)"),
    ],
)
def test_error_bodies(status: int, body: bytes, err_type: str, message: str) -> None:
    assert orjson.loads(br.error(status, body)) == {"type": "error", "error": {"type": err_type, "message": message}}


def test_anthropic_sdk_reads_translated_error() -> None:
    body = br.error(429, b'{"message":"Too many requests, please wait before trying again."}')
    client = anthropic_client(serve(body, status=429))
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model="m", max_tokens=5, messages=[USER])
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Too many requests, please wait before trying again."},
    }


def test_untranslatable_body_and_event() -> None:
    expected = {"type": "error", "error": {"type": "api_error", "message": br._UNTRANSLATABLE_MESSAGE}}
    assert orjson.loads(br.untranslatable_body()) == expected
    assert events_of(br.untranslatable_event()) == [("error", expected)]


# ---------------------------------------------------------------------------------------------------
# streams


def events_of(stream: bytes) -> list[tuple[str | None, Any]]:
    """(event name, JSON data) of a translated stream, read with the project's SSE parser."""
    parser = SseParser()
    parsed = parser.feed(stream)
    assert parser.pending == b""
    return [(e.event, orjson.loads(e.data or b"")) for e in parsed]


def run(frames: list[bytes], how: str = "whole") -> tuple[br.StreamTranslator, bytes]:
    translator = br.StreamTranslator(requested_model="fraud_detector")
    out = b"".join(translator.feed(chunk) for chunk in split(b"".join(frames), how)) + translator.finish()
    return translator, out


USAGE = {
    "inputTokens": 25,
    "outputTokens": 40,
    "totalTokens": 215,
    "cacheReadInputTokens": 100,
    "cacheWriteInputTokens": 50,
}
TOOL_STREAM = [
    event("messageStart", {"role": "assistant"}),
    event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Let me "}}),
    event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "chéck 🎉."}}),
    event("contentBlockStop", {"contentBlockIndex": 0}),
    event(
        "contentBlockStart",
        {"contentBlockIndex": 1, "start": {"toolUse": {"toolUseId": "tooluse_A", "name": "weather"}}},
    ),
    event("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": '{"city": "Pa'}}}),
    event("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": 'ris"}'}}}),
    event("contentBlockStop", {"contentBlockIndex": 1}),
    event(
        "contentBlockStart", {"contentBlockIndex": 2, "start": {"toolUse": {"toolUseId": "tooluse_B", "name": "time"}}}
    ),
    event("contentBlockDelta", {"contentBlockIndex": 2, "delta": {"toolUse": {"input": ""}}}),
    event("contentBlockStop", {"contentBlockIndex": 2}),
    event("messageStop", {"stopReason": "tool_use"}),
    event("metadata", {"usage": USAGE, "metrics": {"latencyMs": 1200}}),
]
FINAL_USAGE = {
    "input_tokens": 25,
    "output_tokens": 40,
    "cache_read_input_tokens": 100,
    "cache_creation_input_tokens": 50,
}


@pytest.mark.parametrize("how", [*CHUNKINGS, "seed-4"])
def test_converse_stream_becomes_anthropic_stream(how: str) -> None:
    translator, out = run(TOOL_STREAM, how)
    assert translator.complete and translator.failure is None
    events = events_of(out)
    message_id = events[0][1]["message"]["id"]
    assert message_id.startswith("msg_bdrk_")
    assert events == [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": "fraud_detector",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                },
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me "}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "chéck 🎉."}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "tool_use", "id": "tooluse_A", "name": "weather", "input": {}},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'},
            },
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": 'ris"}'}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 2,
                "content_block": {"type": "tool_use", "id": "tooluse_B", "name": "time", "input": {}},
            },
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 2}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": FINAL_USAGE,
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    assert translator.feed(event("metadata", {"usage": USAGE})) == b"" and translator.finish() == b""


def test_anthropic_sdk_accumulates_translated_stream() -> None:
    _, out = run(TOOL_STREAM, "bytes")
    client = anthropic_client(serve(out, sse=True))
    with client.messages.stream(model="fraud_detector", max_tokens=50, messages=[USER]) as stream:
        streamed = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert streamed == "Let me chéck 🎉."
    assert message.model == "fraud_detector" and message.id.startswith("msg_bdrk_")
    assert message.content[0].type == "text" and message.content[0].text == "Let me chéck 🎉."
    assert [(b.id, b.name, b.input) for b in message.content[1:] if b.type == "tool_use"] == [
        ("tooluse_A", "weather", {"city": "Paris"}),
        ("tooluse_B", "time", {}),
    ]
    assert message.stop_reason == "tool_use"
    usage = message.usage
    assert (
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_input_tokens,
        usage.cache_creation_input_tokens,
    ) == (25, 40, 100, 50)


def test_usage_tracker_reads_the_final_counts() -> None:
    _, out = run(TOOL_STREAM)
    tracker = UsageTracker("anthropic", streaming=True)
    for chunk in split(out, "seed-2"):
        tracker.feed(chunk)
    tracker.finish()
    assert tracker.usage == Usage(175, 40, cached_input_tokens=100, cache_creation_input_tokens=50)


REASONING_STREAM = [
    event("messageStart", {"role": "assistant"}),
    event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": "The user "}}}),
    event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": "greets."}}}),
    event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"signature": "EqQBCg=="}}}),
    event("contentBlockStop", {"contentBlockIndex": 0}),
    event("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"reasoningContent": {"redactedContent": "b3Bh"}}}),
    event("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"reasoningContent": {"redactedContent": "cXVl"}}}),
    event("contentBlockStop", {"contentBlockIndex": 1}),
    event("contentBlockDelta", {"contentBlockIndex": 2, "delta": {"text": ""}}),
    event("contentBlockDelta", {"contentBlockIndex": 2, "delta": {"text": "Hello!"}}),
    event("contentBlockStop", {"contentBlockIndex": 2}),
    event("metadata", {"usage": {"inputTokens": 9, "outputTokens": 31}}),  # before messageStop: still works
    event("messageStop", {"stopReason": "end_turn", "additionalModelResponseFields": None}),
]


def test_reasoning_stream_becomes_thinking_blocks() -> None:
    translator, out = run(REASONING_STREAM, "seed-3")
    assert translator.failure is None
    events = events_of(out)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[1][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[4][1]["delta"] == {"type": "signature_delta", "signature": "EqQBCg=="}
    # Two redacted pieces go out as one block, re-encoded whole.
    assert events[6][1]["content_block"] == {"type": "redacted_thinking", "data": "b3BhcXVl"}
    client = anthropic_client(serve(out, sse=True))
    with client.messages.stream(model="m", max_tokens=50, messages=[USER]) as stream:
        message = stream.get_final_message()
    thinking, redacted, text = message.content
    assert thinking.type == "thinking" and (thinking.thinking, thinking.signature) == ("The user greets.", "EqQBCg==")
    assert redacted.type == "redacted_thinking" and redacted.data == "b3BhcXVl"
    assert text.type == "text" and text.text == "Hello!"
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (9, 31)


@pytest.mark.parametrize(
    ("kind", "err_type"),
    [
        ("throttlingException", "rate_limit_error"),
        ("serviceUnavailableException", "overloaded_error"),
        ("validationException", "invalid_request_error"),
        ("modelStreamErrorException", "api_error"),
        ("internalServerException", "api_error"),
    ],
)
def test_exception_frame_becomes_error_event(kind: str, err_type: str) -> None:
    frames = [*TOOL_STREAM[:3], exception(kind, "Something went wrong."), *TOOL_STREAM[3:]]
    translator, out = run(frames, "seed-1")
    assert translator.complete and translator.failure is None  # the provider's error, not ours
    events = events_of(out)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "error",
    ]
    assert events[-1][1] == {"type": "error", "error": {"type": err_type, "message": "Something went wrong."}}
    client = anthropic_client(serve(out, sse=True))
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        client.messages.stream(model="m", max_tokens=5, messages=[USER]) as stream,
    ):
        stream.get_final_message()
    assert caught.value.body == events[-1][1]


def test_exception_frame_without_a_readable_message_and_error_frames() -> None:
    odd = encode({":message-type": "exception", ":exception-type": "fooException"}, b"not json")
    translator, out = run([odd])
    assert translator.failure is None
    assert events_of(out) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": _anthropic.PROVIDER_ERROR_MESSAGE}})
    ]
    protocol_error = encode(
        {":message-type": "error", ":error-code": "InternalFailure", ":error-message": "Internal failure"}, b""
    )
    translator, out = run([TOOL_STREAM[0], protocol_error])
    assert events_of(out)[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": "Internal failure"}},
    )


def test_stream_cut_before_message_stop_ends_with_error_event() -> None:
    cut_error = ("error", {"type": "error", "error": {"type": "api_error", "message": _anthropic.CUT_MESSAGE}})
    stop_at = TOOL_STREAM.index(event("messageStop", {"stopReason": "tool_use"}))
    for cut in range(stop_at + 1):
        for tail in (b"", TOOL_STREAM[cut][: len(TOOL_STREAM[cut]) // 2]):
            translator, out = run([*TOOL_STREAM[:cut], tail])
            events = events_of(out)
            assert events[-1] == cut_error and "message_stop" not in [name for name, _ in events]
            assert translator.complete and translator.failure is None
            client = anthropic_client(serve(out, sse=True))
            with (
                pytest.raises(anthropic.APIStatusError),
                client.messages.stream(model="m", max_tokens=5, messages=[USER]) as stream,
            ):
                stream.get_final_message()


def test_stream_cut_after_message_stop_ends_with_what_is_known() -> None:
    for tail in (b"", TOOL_STREAM[-1][:20]):
        translator, out = run([*TOOL_STREAM[:-1], tail])
        events = events_of(out)
        assert [name for name, _ in events[-2:]] == ["message_delta", "message_stop"]
        assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
        assert events[-2][1]["usage"] == dict.fromkeys(FINAL_USAGE, 0)
        assert translator.failure is None


def test_corrupt_frame_sets_failure_and_keeps_what_went_out() -> None:
    corrupt = bytearray(TOOL_STREAM[4])
    corrupt[30] ^= 0xFF
    translator, out = run([*TOOL_STREAM[:4], bytes(corrupt), *TOOL_STREAM[5:]])
    assert translator.complete
    assert translator.failure is not None and translator.failure.startswith(
        "the provider's event stream is corrupt: message checksum mismatch"
    )
    events = events_of(out)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "error",
    ]
    assert out.endswith(br.untranslatable_event())
    assert translator.feed(TOOL_STREAM[5]) == b"" and translator.finish() == b""


def test_corrupt_frame_fed_on_its_own_chunk() -> None:
    translator = br.StreamTranslator(requested_model="m")
    first = translator.feed(TOOL_STREAM[0])
    assert [name for name, _ in events_of(first)] == ["message_start"]
    assert translator.feed(b"\x00" * 12) == br.untranslatable_event()  # a prelude whose CRC is wrong
    assert translator.failure is not None and "prelude checksum mismatch" in translator.failure


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (
            encode({":message-type": "event", ":event-type": "contentBlockDelta"}, b"{oops"),
            "a 'contentBlockDelta' event's payload is not a JSON object",
        ),
        (encode({":message-type": "surprise"}, b"{}"), "a frame of message type 'surprise' cannot be translated"),
        (encode({":event-type": "messageStart"}, b"{}"), "a frame of message type 'None' cannot be translated"),
        (event("messageStart", {"role": "user"}), "role 'user' is not assistant"),
        (
            event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"citation": {}}}),
            "a contentBlockDelta event holds a delta that cannot be translated \\('citation'\\)",
        ),
        (
            event("contentBlockDelta", {"contentBlockIndex": "0", "delta": {"text": "x"}}),
            "'contentBlockIndex' is not a non-negative integer",
        ),
        (event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": 5}}), "'text' is not a string"),
        (event("contentBlockDelta", {"contentBlockIndex": 0}), "'delta' is not an object"),
        (
            event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"toolUse": {"input": "{}"}}}),
            "a tool_use delta arrived for content block 0, which is not one",
        ),
        (
            event(
                "contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"redactedContent": "!!"}}}
            ),
            "a redactedContent delta is not base64",
        ),
        (
            event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"other": "x"}}}),
            "a reasoningContent delta cannot be translated",
        ),
        (
            event("contentBlockStart", {"contentBlockIndex": 0, "start": {"image": {}}}),
            "starts a block that cannot be translated \\('image'\\)",
        ),
        (
            event("contentBlockStart", {"contentBlockIndex": 0, "start": {"toolUse": {"name": "x"}}}),
            "toolUse has no string toolUseId and name",
        ),
        (event("contentBlockStop", {"contentBlockIndex": 3}), "content block 3 is stopped but was never started"),
    ],
)
def test_unreadable_events_set_failure(frame: bytes, match: str) -> None:
    translator, out = run([TOOL_STREAM[0], frame, *TOOL_STREAM[1:]])
    assert translator.failure is not None
    assert re.search(match, translator.failure), translator.failure
    events = events_of(out)
    assert [name for name, _ in events] == ["message_start", "error"]
    assert out.endswith(br.untranslatable_event())


def test_block_protocol_errors_set_failure() -> None:
    start = TOOL_STREAM[4]
    # A tool block started twice, a text delta into a tool block, a delta after the block stopped.
    for frames, reason in [
        ([start, start], "content block 1 is started twice"),
        (
            [start, event("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": "x"}})],
            "a text delta arrived for content block 1, which is not one",
        ),
        (
            [*TOOL_STREAM[1:4], event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "x"}})],
            "a delta arrived for content block 0 after it stopped",
        ),
    ]:
        translator, out = run([TOOL_STREAM[0], *frames])
        assert translator.failure == reason
        assert events_of(out)[-1][0] == "error"


def test_unknown_events_are_skipped_and_open_blocks_close_at_message_stop() -> None:
    frames = [
        event("somethingNew", {"x": 1}),
        event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hi"}}, pad=False),
        event("messageStop", {"stopReason": "max_tokens"}),  # block 0 never stopped
        event("metadata", {"usage": {"inputTokens": 3, "outputTokens": 1}}),
    ]
    translator, out = run(frames)
    assert translator.failure is None
    assert [name for name, _ in events_of(out)] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events_of(out)[-2][1]["delta"]["stop_reason"] == "max_tokens"


def _leaf(rng: random.Random) -> Any:
    return rng.choice([None, True, 0, -1, 1.5, 1e300, "", "x", "QUJD", "é!", '{"a"', [], {}])


def _random_payload(rng: random.Random) -> Any:
    """A ConverseStream-like payload: the right keys mostly, with values of every type."""
    leaf = _leaf(rng)
    delta = rng.choice(
        [
            {"text": leaf},
            {"toolUse": {"input": leaf}},
            {"reasoningContent": {rng.choice(["text", "signature", "redactedContent"]): leaf}},
            {"toolUse": leaf},
            leaf,
        ]
    )
    payload = rng.choice(
        [
            {"contentBlockIndex": rng.choice([0, 1, 2, 3, -1, "1"]), "delta": delta},
            {"contentBlockIndex": rng.randint(0, 3), "start": {"toolUse": {"toolUseId": leaf, "name": "n"}}},
            {"contentBlockIndex": rng.randint(0, 3)},
            {"stopReason": leaf},
            {"usage": {"inputTokens": leaf, "outputTokens": 3}},
            {"role": leaf},
        ]
    )
    return payload if rng.random() < 0.9 else leaf


@pytest.mark.parametrize("seed", range(60))
def test_random_frames_never_raise_and_always_end_visibly(seed: int) -> None:
    rng = random.Random(seed)
    names = ["messageStart", "contentBlockStart", "contentBlockDelta", "contentBlockStop", "messageStop", "metadata"]
    frames = list(TOOL_STREAM)
    for _ in range(rng.randint(1, 4)):
        payload = orjson.dumps(_random_payload(rng))
        frame = encode({":message-type": "event", ":event-type": rng.choice(names)}, payload)
        frames.insert(rng.randint(0, len(frames)), frame)
    data = b"".join(frames)
    if rng.random() < 0.3:
        data = data[: rng.randint(0, len(data))]
    translator = br.StreamTranslator(requested_model="m")
    out = b"".join(translator.feed(chunk) for chunk in split(data, f"seed-{seed}")) + translator.finish()
    events = events_of(out)
    assert events[-1][0] in ("message_stop", "error")
    assert translator.complete
    indexes = [payload["index"] for name, payload in events if name == "content_block_start"]
    assert indexes == list(range(len(indexes)))  # Anthropic's indexes: in the order blocks open


def test_redacted_content_that_is_not_even_ascii_sets_failure() -> None:
    frame = event(
        "contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"redactedContent": "é"}}}
    )
    translator, _ = run([TOOL_STREAM[0], frame])
    assert translator.failure == "a redactedContent delta is not base64"
