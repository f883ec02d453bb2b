"""OpenAI- and Anthropic-compatible mock AI provider.

This is the only fake in the end-to-end tests: Envoy, the ext_proc processor and the official SDKs all
talk to it as if it were the real upstream, so the wire formats (JSON bodies, SSE framing, error
envelopes, status codes, headers) follow the real APIs closely.  Faults (error statuses, latency,
connection resets, truncated streams) are injected per request with `x-mock-*` headers so a single
instance can play every failure mode a test needs.

Routing is by path suffix so the same instance works behind a provider base path such as
`/openai/v1` or `/anthropic`.

Request headers understood (they override the MockConfig defaults):
  x-mock-status: N          error status N in the provider's envelope; a non-error value (e.g. 200)
                            switches off a MockConfig.fault_status default for that request
  x-mock-latency-ms: N      delay before the first byte
  x-mock-reset: 1           TCP RST after reading the request, no response at all
  x-mock-cut-after: N       streaming: close the connection after N SSE events (0 = after headers),
                            leaving the chunked body unterminated
  x-mock-event-delay-ms: N  streaming: pause between events
  x-mock-only: NAME[,NAME]  apply the x-mock-* faults only on the mock(s) so named (--name) or to
                            requests for the model(s) so named, so one request can fail on one
                            provider or model and succeed on its fallback

Order of checks: record, latency, reset, auth (and anthropic-version), injected fault, body validation.
Anthropic auth accepts `x-api-key` and also `Authorization: Bearer`, because the anthropic SDK sends
its api_key that way.  Run standalone with `python -m extproc.mock_provider --port 8080 ...`.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import hashlib
import json
import math
import random
import socket
import string
import struct
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

__all__ = ["MockConfig", "build_app", "serve"]


@dataclass(frozen=True)
class MockConfig:
    openai_key: str | None = None
    anthropic_key: str | None = None
    name: str = "mock"
    latency_ms: int = 0
    fault_status: int | None = None
    record_limit: int = 200


_CONFIG_KEY: Final = web.AppKey("mock_config", MockConfig)
_RECORDS_KEY: Final = web.AppKey("mock_records", deque)

_OPENAI: Final = "openai"
_ANTHROPIC: Final = "anthropic"

_CHAT: Final = "chat"
_EMBEDDINGS: Final = "embeddings"
_MESSAGES: Final = "messages"

_JSON_CT: Final = "application/json"
_SSE_CT: Final = "text/event-stream"

_ID_ALPHABET: Final = string.ascii_letters + string.digits
# A fixed fingerprint: clients only check that the field exists, and determinism helps golden tests.
_SYSTEM_FINGERPRINT: Final = "fp_6d6f636b70"
_REPLY_WORDS: Final = 8
_DEFAULT_EMBEDDING_DIMS: Final = 8
# Bounded so a typo in a test cannot make the mock allocate unbounded memory.
_MAX_EMBEDDING_DIMS: Final = 8192
# Real requests with long conversations or images exceed aiohttp's 1 MiB default.
_CLIENT_MAX_SIZE: Final = 64 * 1024 * 1024
_SO_LINGER_RST: Final = struct.pack("ii", 1, 0)


class _Reject(Exception):
    """Carries a ready-made error response out of validation code."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


# ---------------------------------------------------------------------------------------------------
# small helpers


def _rand_id(prefix: str, length: int) -> str:
    # `random` is enough: ids only need to be unique-looking, and it is much cheaper than `secrets`.
    return prefix + "".join(random.choices(_ID_ALPHABET, k=length))


def _int_header(request: web.Request, name: str) -> int | None:
    raw = _fault(request, name)
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError:
        # A malformed fault header is treated as absent rather than failing the request, so the
        # mock never invents errors the test did not ask for.
        return None


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson rejects integers wider than 64 bits that the stdlib (and the real APIs) accept;
        # only pay for the slow parser on that rare path.
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ValueError("invalid JSON") from exc


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value).encode()


def _json_response(status: int, payload: Any, headers: dict[str, str]) -> web.Response:
    return web.Response(status=status, body=_dumps(payload), headers=headers, content_type=_JSON_CT)


def _text_of(content: Any) -> str:
    """Text of an OpenAI content value or Anthropic content/system value (str or list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
                elif "content" in part:
                    # Anthropic tool_result blocks nest their own content.
                    parts.append(_text_of(part["content"]))
        return " ".join(p for p in parts if p)
    return ""


def _prompt_tokens(total_chars: int) -> int:
    return max(1, math.ceil(total_chars / 4))


def _reply_for(model: str, messages: list[Any]) -> str:
    last_user = ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            last_user = _text_of(message.get("content"))
            break
    words = last_user.split()[:_REPLY_WORDS]
    return f"mock reply from {model}: {' '.join(words)}".rstrip()


def _word_deltas(reply: str) -> list[str]:
    # Leading spaces ride on each delta so that concatenating deltas reproduces the reply exactly,
    # which is what clients (and our tests) rely on.
    pieces = reply.split(" ")
    return [pieces[0], *(" " + piece for piece in pieces[1:])]


def _abort(request: web.Request, *, reset: bool) -> None:
    transport = request.transport
    if transport is None:
        return
    if reset:
        # SO_LINGER 0 makes close() send a TCP RST, which is what "connection reset" means to
        # Envoy's retry and outlier-detection logic; a plain close would be a FIN instead.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _SO_LINGER_RST)
    transport.abort()


async def _flush_then_abort(request: web.Request) -> None:
    # transport.abort() drops asyncio's userspace write buffer; wait for it to reach the kernel so
    # the client deterministically receives every event written before the cut.
    transport = request.transport
    if transport is None:
        return
    deadline = time.monotonic() + 2.0
    while transport.get_write_buffer_size() > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    _abort(request, reset=False)


# ---------------------------------------------------------------------------------------------------
# error envelopes


def _mask_key(key: str) -> str:
    if len(key) <= 8:
        return "*" * len(key)
    return f"{key[:3]}{'*' * 4}{key[-4:]}"


def _openai_error(
    status: int,
    message: str,
    headers: dict[str, str],
    *,
    err_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return _json_response(status, body, headers)


def _anthropic_error(status: int, err_type: str, message: str, headers: dict[str, str]) -> web.Response:
    body = {
        "type": "error",
        "error": {"type": err_type, "message": message},
        "request_id": headers["request-id"],
    }
    return _json_response(status, body, headers)


def _openai_fault(status: int, headers: dict[str, str]) -> web.Response:
    if status == 429:
        headers["retry-after"] = "1"
        return _openai_error(
            429,
            "Rate limit reached for requests (injected by mock provider). Please try again in 1s.",
            headers,
            err_type="requests",
            code="rate_limit_exceeded",
        )
    if status >= 500:
        return _openai_error(
            status,
            "The server had an error while processing your request. Sorry about that!",
            headers,
            err_type="server_error",
        )
    if status == 401:
        return _openai_error(
            401, "Incorrect API key provided (injected by mock provider).", headers, code="invalid_api_key"
        )
    return _openai_error(status, f"Injected error status {status} from mock provider.", headers)


_ANTHROPIC_FAULT_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_ANTHROPIC_FAULT_MESSAGES: Final = {
    "rate_limit_error": "Number of requests has exceeded your per-minute rate limit (injected by mock).",
    "overloaded_error": "Overloaded",
    "api_error": "Internal server error",
}


def _anthropic_fault(status: int, headers: dict[str, str]) -> web.Response:
    err_type = _ANTHROPIC_FAULT_TYPES.get(status) or (
        "api_error" if status >= 500 else "invalid_request_error"
    )
    if status == 429:
        headers["retry-after"] = "1"
    message = _ANTHROPIC_FAULT_MESSAGES.get(err_type, f"Injected error status {status} from mock provider.")
    return _anthropic_error(status, err_type, message, headers)


# ---------------------------------------------------------------------------------------------------
# authentication and validation


def _check_openai_auth(request: web.Request, config: MockConfig, headers: dict[str, str]) -> None:
    if config.openai_key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _Reject(
            _openai_error(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                headers,
                code="invalid_api_key",
            )
        )
    if token != config.openai_key:
        raise _Reject(
            _openai_error(
                401,
                f"Incorrect API key provided: {_mask_key(token)}. "
                "You can find your API key at https://platform.openai.com/account/api-keys.",
                headers,
                code="invalid_api_key",
            )
        )


def _check_anthropic_auth(request: web.Request, config: MockConfig, headers: dict[str, str]) -> None:
    if config.anthropic_key is None:
        return
    key = request.headers.get("x-api-key")
    if key is None:
        # Current anthropic SDKs send `api_key` as `Authorization: Bearer`, not `x-api-key`, and the
        # real API accepts both; refusing Bearer would make the unmodified SDK fail against the mock.
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            key = token.strip()
    if not key:
        raise _Reject(_anthropic_error(401, "authentication_error", "x-api-key header is required", headers))
    if key != config.anthropic_key:
        raise _Reject(_anthropic_error(401, "authentication_error", "invalid x-api-key", headers))


def _openai_body(body: Any, headers: dict[str, str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _Reject(
            _openai_error(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
                "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was "
                "not valid JSON.)",
                headers,
            )
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Reject(_openai_error(400, "you must provide a model parameter", headers))
    return body


def _validate_chat(body: dict[str, Any], headers: dict[str, str]) -> list[Any]:
    if "messages" not in body:
        raise _Reject(
            _openai_error(
                400,
                "Missing required parameter: 'messages'.",
                headers,
                param="messages",
                code="missing_required_parameter",
            )
        )
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _Reject(
            _openai_error(400, "Invalid 'messages': expected a non-empty array.", headers, param="messages")
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _Reject(
                _openai_error(
                    400,
                    f"Invalid 'messages[{index}]': expected an object with a 'role'.",
                    headers,
                    param=f"messages[{index}]",
                )
            )
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise _Reject(
            _openai_error(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is set to true.",
                headers,
                param="stream_options",
            )
        )
    return messages


def _anthropic_body(body: Any, headers: dict[str, str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _Reject(
            _anthropic_error(
                400, "invalid_request_error", "There was an issue with your request body.", headers
            )
        )
    # Field order mirrors the real API's error priority for a bare `{}` body.
    if not isinstance(body.get("max_tokens"), int) or isinstance(body.get("max_tokens"), bool):
        raise _Reject(_anthropic_error(400, "invalid_request_error", "max_tokens: Field required", headers))
    if body["max_tokens"] < 1:
        raise _Reject(
            _anthropic_error(
                400, "invalid_request_error", "max_tokens: must be greater than or equal to 1", headers
            )
        )
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _Reject(_anthropic_error(400, "invalid_request_error", "messages: Field required", headers))
    if not messages:
        raise _Reject(
            _anthropic_error(
                400, "invalid_request_error", "messages: at least one message is required", headers
            )
        )
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            # Catches a proxy that forwards an OpenAI-style system message to Anthropic unchanged.
            raise _Reject(
                _anthropic_error(
                    400,
                    "invalid_request_error",
                    f'messages.{index}.role: Input should be "user" or "assistant"',
                    headers,
                )
            )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Reject(_anthropic_error(400, "invalid_request_error", "model: Field required", headers))
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise _Reject(
            _anthropic_error(400, "invalid_request_error", "system: Input should be a valid string", headers)
        )
    return body


# ---------------------------------------------------------------------------------------------------
# OpenAI chat completions


def _chat_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_events(
    completion_id: str, created: int, model: str, reply: str, usage: dict[str, Any], include_usage: bool
) -> Iterator[bytes]:
    base: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": _SYSTEM_FINGERPRINT,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        payload: dict[str, Any] = {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            # OpenAI only adds the key (as null) once usage reporting was requested.
            payload["usage"] = None
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    yield chunk({"role": "assistant", "content": "", "refusal": None}, None)
    for delta in _word_deltas(reply):
        yield chunk({"content": delta}, None)
    yield chunk({}, "stop")
    if include_usage:
        yield b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def _chat_completions(
    request: web.Request, body: Any, headers: dict[str, str], started: float
) -> web.StreamResponse:
    payload = _openai_body(body, headers)
    messages = _validate_chat(payload, headers)
    model: str = payload["model"]
    reply = _reply_for(model, messages)
    prompt_tokens = _prompt_tokens(sum(len(_text_of(m.get("content"))) for m in messages))
    usage = _chat_usage(prompt_tokens, len(reply.split()))
    completion_id = _rand_id("chatcmpl-", 29)
    created = int(time.time())

    if payload.get("stream") is True:
        stream_options = payload.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        events = _chat_events(completion_id, created, model, reply, usage, include_usage)
        return await _stream(request, events, headers, started, openai=True)

    response = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": _SYSTEM_FINGERPRINT,
    }
    headers["openai-processing-ms"] = _elapsed_ms(started)
    return _json_response(200, response, headers)


# ---------------------------------------------------------------------------------------------------
# OpenAI embeddings


def _embedding_inputs(value: Any) -> list[str | list[int]] | None:
    """Normalise the four accepted `input` shapes; None means the shape is invalid."""
    if isinstance(value, str):
        return [value] if value else None
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(item, str) and item for item in value):
        return list(value)
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return [list(value)]
    if all(
        isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
        for item in value
    ):
        return list(value)
    return None


def _embedding_vector(model: str, item: str | list[int], dims: int) -> array.array[float]:
    material = item.encode() if isinstance(item, str) else b"\x00tokens:" + ",".join(map(str, item)).encode()
    digest = hashlib.shake_256(model.encode() + b"\x00" + material).digest(4 * dims)
    raw = [(n / 0xFFFFFFFF) * 2.0 - 1.0 for n in struct.unpack(f"<{dims}I", digest)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    # Rounding through float32 up front makes the float and base64 encodings carry identical values.
    return array.array("f", [v / norm for v in raw])


def _embeddings(body: Any, headers: dict[str, str], started: float) -> web.Response:
    payload = _openai_body(body, headers)
    model: str = payload["model"]
    if "input" not in payload:
        raise _Reject(
            _openai_error(
                400,
                "Missing required parameter: 'input'.",
                headers,
                param="input",
                code="missing_required_parameter",
            )
        )
    inputs = _embedding_inputs(payload["input"])
    if inputs is None:
        raise _Reject(
            _openai_error(
                400, "'$.input' is invalid. Please check the API reference.", headers, param="input"
            )
        )
    dims = payload.get("dimensions")
    if dims is None:
        dims = _DEFAULT_EMBEDDING_DIMS
    elif not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= _MAX_EMBEDDING_DIMS:
        raise _Reject(_openai_error(400, f"Invalid 'dimensions': {dims!r}.", headers, param="dimensions"))
    encoding = payload.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _Reject(
            _openai_error(
                400,
                f"Invalid value for 'encoding_format': {encoding!r}. Expected 'float' or 'base64'.",
                headers,
                param="encoding_format",
            )
        )

    data: list[dict[str, Any]] = []
    tokens = 0
    for index, item in enumerate(inputs):
        vector = _embedding_vector(model, item, dims)
        tokens += _prompt_tokens(len(item)) if isinstance(item, str) else len(item)
        if encoding == "base64":
            if sys.byteorder != "little":
                vector.byteswap()
            embedding: Any = base64.b64encode(vector.tobytes()).decode("ascii")
        else:
            embedding = vector.tolist()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    response = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    headers["openai-processing-ms"] = _elapsed_ms(started)
    return _json_response(200, response, headers)


# ---------------------------------------------------------------------------------------------------
# Anthropic messages


def _anthropic_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _message_events(message_id: str, model: str, reply: str, input_tokens: int) -> Iterator[bytes]:
    start = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _anthropic_usage(input_tokens, 1),
    }
    yield _sse("message_start", {"type": "message_start", "message": start})
    yield _sse(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    yield _sse("ping", {"type": "ping"})
    for delta in _word_deltas(reply):
        yield _sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": delta}},
        )
    yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": len(reply.split())},
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})


async def _messages(
    request: web.Request, body: Any, headers: dict[str, str], started: float
) -> web.StreamResponse:
    payload = _anthropic_body(body, headers)
    model: str = payload["model"]
    messages: list[Any] = payload["messages"]
    reply = _reply_for(model, messages)
    # The system prompt is prompt text too, so it counts towards input tokens as on the real API.
    chars = len(_text_of(payload.get("system"))) + sum(len(_text_of(m.get("content"))) for m in messages)
    input_tokens = _prompt_tokens(chars)
    message_id = _rand_id("msg_01", 22)

    if payload.get("stream") is True:
        events = _message_events(message_id, model, reply, input_tokens)
        return await _stream(request, events, headers, started, openai=False)

    response = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": reply}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": _anthropic_usage(input_tokens, len(reply.split())),
    }
    return _json_response(200, response, headers)


# ---------------------------------------------------------------------------------------------------
# streaming and dispatch


def _elapsed_ms(started: float) -> str:
    return str(int((time.monotonic() - started) * 1000))


async def _stream(
    request: web.Request, events: Iterator[bytes], headers: dict[str, str], started: float, *, openai: bool
) -> web.StreamResponse:
    cut_after = _int_header(request, "x-mock-cut-after")
    delay_ms = _int_header(request, "x-mock-event-delay-ms") or 0
    if openai:
        headers["openai-processing-ms"] = _elapsed_ms(started)
    headers["cache-control"] = "no-cache"
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = _SSE_CT
    response.charset = "utf-8"
    try:
        # prepare() flushes the status line and headers immediately for a StreamResponse, so a
        # cut at 0 events still shows the client a 200 whose body never completes.
        await response.prepare(request)
        if cut_after is not None and cut_after <= 0:
            await _flush_then_abort(request)
            return response
        for written, event in enumerate(events, start=1):
            if written > 1 and delay_ms > 0:
                await asyncio.sleep(delay_ms / 1000)
            await response.write(event)
            if cut_after is not None and written >= cut_after:
                # Returning after abort leaves the chunked body without its terminator; aiohttp's
                # write_eof then hits the closed transport and swallows the ConnectionError quietly.
                await _flush_then_abort(request)
                return response
    except ConnectionError:
        # The client went away mid-stream (benchmarks and tests cancel streams routinely); that is
        # not a server error worth a traceback in the log.
        return response
    return response


def _api_route(method: str, path: str) -> tuple[str, str] | None:
    if method != "POST":
        return None
    if path.endswith("/chat/completions"):
        return _OPENAI, _CHAT
    if path.endswith("/embeddings"):
        return _OPENAI, _EMBEDDINGS
    if path.endswith("/messages"):
        return _ANTHROPIC, _MESSAGES
    return None


def _record(request: web.Request, records: deque[dict[str, Any]], body: Any, provider_api: str) -> None:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        # Repeated headers are folded as HTTP allows, so nothing the proxy sent is lost.
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    records.append(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "host": request.host,
            "headers": headers,
            "body": body,
            "provider_api": provider_api,
        }
    )


_UNTARGETED = "mock_untargeted"  # request key: the x-mock-* faults are aimed at another mock or model


def _mark_untargeted(request: web.Request, name: str, body: Any) -> None:
    """Ignore this request's fault headers when x-mock-only names other mocks and models."""
    only = request.headers.get("x-mock-only")
    if only is None:
        return
    targets = {part.strip() for part in only.split(",")}
    model = body.get("model") if isinstance(body, dict) else None
    if name not in targets and model not in targets:
        request[_UNTARGETED] = True


def _fault(request: web.Request, name: str) -> str | None:
    return None if request.get(_UNTARGETED) else request.headers.get(name)


async def _handle_api(request: web.Request, provider_api: str, kind: str) -> web.StreamResponse:
    started = time.monotonic()
    config = request.app[_CONFIG_KEY]
    raw = await request.read()
    try:
        body: Any = _loads(raw) if raw else None
    except ValueError:
        body = None
    _mark_untargeted(request, config.name, body)
    _record(request, request.app[_RECORDS_KEY], body, provider_api)

    latency_ms = _int_header(request, "x-mock-latency-ms")
    if latency_ms is None:
        latency_ms = config.latency_ms
    if latency_ms > 0:
        await asyncio.sleep(latency_ms / 1000)

    if (_fault(request, "x-mock-reset") or "").strip() in ("1", "true", "yes"):
        # The body has been read, so the client has finished sending and sees the reset while
        # waiting for a response, which is the failure mode being simulated.  The returned object
        # is never written: aiohttp's write on the aborted transport raises ConnectionError, which
        # it treats as a client disconnect.
        _abort(request, reset=True)
        return web.Response(status=502)

    model = body.get("model") if isinstance(body, dict) else None
    headers: dict[str, str] = {
        "x-mock-provider": config.name,
        "x-mock-received-model": model if isinstance(model, str) else "",
    }
    request_id = request.headers.get("x-request-id")
    if request_id is not None:
        headers["x-request-id"] = request_id

    fault = _int_header(request, "x-mock-status")
    if fault is None:
        fault = config.fault_status
    if fault is not None and not 400 <= fault <= 599:
        fault = None

    try:
        if provider_api == _OPENAI:
            # Auth precedes fault injection, as on the real APIs: an unauthenticated caller never
            # learns about rate limits.
            _check_openai_auth(request, config, headers)
            if fault is not None:
                headers["openai-processing-ms"] = _elapsed_ms(started)
                return _openai_fault(fault, headers)
            if kind == _CHAT:
                return await _chat_completions(request, body, headers, started)
            return _embeddings(body, headers, started)

        headers["request-id"] = _rand_id("req_011C", 20)
        _check_anthropic_auth(request, config, headers)
        if "anthropic-version" not in request.headers:
            return _anthropic_error(
                400, "invalid_request_error", "anthropic-version: header is required", headers
            )
        if fault is not None:
            return _anthropic_fault(fault, headers)
        return await _messages(request, body, headers, started)
    except _Reject as reject:
        if provider_api == _OPENAI:
            reject.response.headers["openai-processing-ms"] = _elapsed_ms(started)
        return reject.response


async def _dispatch(request: web.Request) -> web.StreamResponse:
    path = request.path
    method = request.method
    route = _api_route(method, path)
    if route is not None:
        return await _handle_api(request, *route)

    if path.endswith("/_mock/requests"):
        records = request.app[_RECORDS_KEY]
        if method == "GET":
            return web.Response(body=_dumps(list(records)), content_type=_JSON_CT)
        if method == "DELETE":
            records.clear()
            return web.Response(body=b'{"cleared":true}', content_type=_JSON_CT)
    elif path.endswith("/_mock/health") and method in ("GET", "HEAD"):
        return web.Response(body=b'{"status":"ok"}', content_type=_JSON_CT)

    config = request.app[_CONFIG_KEY]
    return _openai_error(404, f"Invalid URL ({method} {path})", {"x-mock-provider": config.name})


def build_app(config: MockConfig) -> web.Application:
    app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
    app[_CONFIG_KEY] = config
    app[_RECORDS_KEY] = deque(maxlen=max(0, config.record_limit))
    # One catch-all route: suffix matching is cheaper than aiohttp's router for the handful of
    # paths we serve, and it lets any base-path prefix through unchanged.
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    return app


async def serve(host: str, port: int, config: MockConfig) -> None:
    """Serve until cancelled.  Port 0 picks a free port; the printed line shows the real one."""
    runner = web.AppRunner(build_app(config), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        bound_port = runner.addresses[0][1] if runner.addresses else port
        print(f"mock-provider listening on {host}:{bound_port}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OpenAI/Anthropic-compatible mock AI provider")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--openai-key")
    parser.add_argument("--anthropic-key")
    parser.add_argument("--name", default="mock")
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--fault-status", type=int)
    parser.add_argument("--record-limit", type=int, default=200)
    args = parser.parse_args(argv)
    config = MockConfig(
        openai_key=args.openai_key,
        anthropic_key=args.anthropic_key,
        name=args.name,
        latency_ms=args.latency_ms,
        fault_status=args.fault_status,
        record_limit=args.record_limit,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, config))


if __name__ == "__main__":
    main()
