"""OpenAI-, Anthropic-, Azure OpenAI-, Bedrock-, Gemini- and Vertex AI-compatible mock AI provider.

This is the only fake in the end-to-end tests: Envoy, the ext_proc processor and the official SDKs all
talk to it as if it were the real upstream, so the wire formats (JSON bodies, SSE framing, error
envelopes, status codes, headers) follow the real APIs closely.  Faults (error statuses, latency,
connection resets, truncated streams) are injected per request with `x-mock-*` headers so a single
instance can play every failure mode a test needs.

Routing is by path suffix so the same instance works behind a provider base path such as
`/openai/v1` or `/anthropic`. Served:
  OpenAI     POST /chat/completions, /completions (legacy), /embeddings, /responses (JSON and SSE);
             GET and DELETE /responses/{id}, GET /responses/{id}/input_items, POST /responses/{id}/cancel;
             GET /models, /models/{id}
  Anthropic  POST /messages (JSON and SSE), /messages/count_tokens; GET /models, /models/{id}
  Azure OpenAI  POST /openai/deployments/{deployment}/chat/completions, .../completions, .../embeddings
             (`?api-version=` required); /openai/v1/chat/completions, /openai/v1/completions,
             /openai/v1/responses, /openai/v1/embeddings (the deployment is the body's `model`);
             /openai/responses?api-version=...  Auth `api-key` (MockConfig.azure_key) or Entra ID
             `Authorization: Bearer` (azure_token); MockConfig.azure_deployments maps deployment -> model.
  Bedrock    POST /model/{modelId}/converse (JSON), /model/{modelId}/converse-stream (AWS event stream);
             SigV4-verified when MockConfig.aws_access_key_id is set
  Gemini     POST /v1beta/models/{model}:generateContent, :streamGenerateContent (`?alt=sse` for SSE,
             else a streamed JSON array); also under /v1/models/...  Auth `x-goog-api-key` or `?key=`
  Vertex AI  POST /v1/projects/{project}/locations/{location}/publishers/google/models/{model}:generateContent,
             :streamGenerateContent (also /v1beta1/...); needs a Bearer token issued by POST /token
  OAuth      POST /token: google-auth's service-account JWT-bearer grant (RS256, checked against
             MockConfig.google_public_key_pem when set)
The cloud formats live in devtools/mock_cloud.py; their records carry provider_api "azure_openai",
"bedrock", "gemini", "vertex" (and "google_oauth" for /token).  On an /openai/v1/ path a request is Azure's
when it carries `api-key` or `api-version`, or when Azure auth is configured and its Bearer token is not
MockConfig.openai_key; otherwise it is OpenAI's behind a base path.
GET /models answers in Anthropic's shape when the request carries `anthropic-version` or `x-api-key`.
Responses are kept in memory (the last 1000, unless `store: false`) for retrieval, deletion, input-item
listing and `previous_response_id`. Replies echo the first words of the last user message; with
function tools offered, each API calls a function instead by one rule (see "tool calls" below).

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
                            provider or model and succeed on its fallback (the model is the path's
                            on Bedrock, Gemini and Vertex; the deployment or its model on Azure)

Order of checks: record, latency, reset, auth (and anthropic-version), injected fault, body validation.
Every API answers an injected fault and its own errors in its own envelope (Bedrock's with
`x-amzn-ErrorType`, Google's `{"error": {"code", "message", "status"}}`).
Anthropic auth accepts `x-api-key` and also `Authorization: Bearer`, because the anthropic SDK sends
its api_key that way.  Run standalone with `python -m devtools.mock_provider --port 8080 ...` (see --help
for the cloud APIs' flags).
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
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import orjson
from aiohttp import web

__all__ = ["MockConfig", "build_app", "serve"]


DEFAULT_OPENAI_MODELS: Final = (
    "gpt-4",
    "gpt-4-turbo",
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-3.5-turbo-instruct",
    "text-embedding-3-small",
)
DEFAULT_ANTHROPIC_MODELS: Final = ("claude-3", "claude-3-5-sonnet-20241022", "claude-3-haiku-20240307")


@dataclass(frozen=True)
class MockConfig:
    openai_key: str | None = None
    anthropic_key: str | None = None
    name: str = "mock"
    latency_ms: int = 0
    fault_status: int | None = None
    record_limit: int = 200
    # What GET /models lists (every model is served regardless, as before).
    openai_models: tuple[str, ...] = DEFAULT_OPENAI_MODELS
    anthropic_models: tuple[str, ...] = DEFAULT_ANTHROPIC_MODELS
    # Azure OpenAI (devtools/mock_cloud.py). No key and no token: no auth check. No deployments: any
    # deployment is served, its name standing for the model.
    azure_key: str | None = None
    azure_token: str | None = None
    azure_deployments: Mapping[str, str] = field(default_factory=dict, hash=False)
    # Bedrock: SigV4 is verified when the access key id is set (the region too, when set).
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    aws_region: str | None = None
    # Gemini API key (None: no check); the PEM public key or certificate that verifies the service-account
    # JWTs POST /token receives (None: signatures unchecked); Vertex's project and location (None: any).
    gemini_key: str | None = None
    google_public_key_pem: str | None = None
    vertex_project: str | None = None
    vertex_location: str | None = None


_CONFIG_KEY: Final = web.AppKey("mock_config", MockConfig)
_RECORDS_KEY: Final = web.AppKey("mock_records", deque)
_RESPONSES_KEY: Final = web.AppKey("mock_responses", OrderedDict)

_OPENAI: Final = "openai"
_ANTHROPIC: Final = "anthropic"

_CHAT: Final = "chat"
_COMPLETIONS: Final = "completions"
_EMBEDDINGS: Final = "embeddings"
_RESPONSES: Final = "responses"
_RESPONSE: Final = "response"  # GET or DELETE /responses/{id}
_RESPONSE_ITEMS: Final = "response_input_items"
_RESPONSE_CANCEL: Final = "response_cancel"
_MODELS: Final = "models"  # GET /models and /models/{id}, in the API the caller's headers speak
_MESSAGES: Final = "messages"
_COUNT_TOKENS: Final = "count_tokens"

_JSON_CT: Final = "application/json"
_SSE_CT: Final = "text/event-stream"
_EVENTSTREAM_CT: Final = "application/vnd.amazon.eventstream"  # binary: no charset

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


# ---------------------------------------------------------------------------------------------------
# tool calls: when the mock calls a function instead of answering in text
#
# One rule for all three APIs, so a conversation moved between them (a fallback) behaves the same: with
# function tools offered, tool choice not "none", and the conversation ending in a user prompt (not in
# a tool's result), the mock calls
#   - the function the tool choice names, if it names one;
#   - else the first function whose name appears in the prompt's text (ask "use get_weather for Paris");
#   - else, when the tool choice requires a call (OpenAI "required", Anthropic "any"), the first function.
# Otherwise it answers in text. The arguments are built from the function's JSON schema (see
# _arguments_for), so they validate against it and stay deterministic.


_Name = TypeVar("_Name")


def _pick_tool(tools: list[tuple[_Name, Any]], forced: object, required: bool, prompt: str
               ) -> tuple[_Name, Any] | None:
    """(name, parameters schema) of the function to call, or None to answer in text. Names come from the
    caller's JSON unchecked: a name that is not a string is never matched against the prompt."""
    if not tools:
        return None
    if forced is not None:
        return next((tool for tool in tools if tool[0] == forced), None)
    named = next((tool for tool in tools if isinstance(tool[0], str) and tool[0] and tool[0] in prompt), None)
    if named is not None:
        return named
    return tools[0] if required else None


def _value_for(schema: Any, depth: int = 0) -> Any:
    if not isinstance(schema, dict) or depth > 4:
        return "mock"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object":
        return _arguments_for(schema, depth + 1)
    if kind == "array":
        return []
    if not isinstance(kind, str):
        return "mock"
    return {"integer": 1, "number": 1, "boolean": True, "null": None}.get(kind, "mock")


def _arguments_for(schema: Any, depth: int = 0) -> dict[str, Any]:
    """Arguments for a call: every required property (all of them under strict mode) with a plain value."""
    if not isinstance(schema, dict):
        return {}
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    required = schema.get("required")
    names = [name for name in required if name in properties] if isinstance(required, list) else []
    return {name: _value_for(properties[name], depth) for name in names}


def _argument_deltas(arguments: str) -> list[str]:
    """Arguments JSON in short fragments, as models stream them (token-sized, splitting strings and keys)."""
    return [arguments[i : i + 7] for i in range(0, len(arguments), 7)] or [""]


def _call_tokens(name: str, arguments: str) -> int:
    return max(1, math.ceil((len(name) + len(arguments)) / 4))


def _openai_chat_tool(payload: dict[str, Any], messages: list[Any]) -> tuple[str, str] | None:
    """(name, JSON arguments) when the chat mock calls a function (see the rule above), else None."""
    tools = payload.get("tools")
    choice = payload.get("tool_choice")
    last = messages[-1] if messages else None
    if not isinstance(tools, list) or choice == "none" or not isinstance(last, dict) or last.get("role") != "user":
        return None
    functions = [
        (function.get("name"), function.get("parameters"))
        for tool in tools
        if isinstance(tool, dict) and isinstance(function := tool.get("function"), dict)
    ]
    forced = None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        forced = choice["function"].get("name")
    picked = _pick_tool(functions, forced, choice == "required", _text_of(last.get("content")))
    if picked is None or not isinstance(picked[0], str):
        return None
    return picked[0], _dumps(_arguments_for(picked[1])).decode()


def _anthropic_tool(payload: dict[str, Any], messages: list[Any]) -> tuple[str, dict[str, Any]] | None:
    """(name, input) when the Messages mock calls a tool (see the rule above), else None."""
    tools = payload.get("tools")
    choice = payload.get("tool_choice")
    choice_type = choice.get("type") if isinstance(choice, dict) else None
    last = messages[-1] if messages else None
    if not isinstance(tools, list) or choice_type == "none" or not isinstance(last, dict):
        return None
    content = last.get("content")
    if last.get("role") != "user" or (
        isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)
    ):
        return None
    functions = [(tool.get("name"), tool.get("input_schema")) for tool in tools if isinstance(tool, dict)]
    forced = choice.get("name") if isinstance(choice, dict) and choice_type == "tool" else None
    picked = _pick_tool(functions, forced, choice_type == "any", _text_of(content))
    if picked is None or not isinstance(picked[0], str):
        return None
    return picked[0], _arguments_for(picked[1])


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


def _anthropic_body(body: Any, headers: dict[str, str], *, count_tokens: bool = False) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _Reject(
            _anthropic_error(
                400, "invalid_request_error", "There was an issue with your request body.", headers
            )
        )
    # Field order mirrors the real API's error priority for a bare `{}` body; count_tokens takes no max_tokens.
    if not count_tokens:
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
    completion_id: str,
    created: int,
    model: str,
    reply: str,
    usage: dict[str, Any],
    include_usage: bool,
    call: tuple[str, str, str] | None = None,
) -> Iterator[bytes]:
    """The chat stream: the reply's words, or with ``call`` = (call id, name, arguments) one tool call."""
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

    if call is None:
        yield chunk({"role": "assistant", "content": "", "refusal": None}, None)
        for delta in _word_deltas(reply):
            yield chunk({"content": delta}, None)
        yield chunk({}, "stop")
    else:
        call_id, name, arguments = call
        start = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        yield chunk({"role": "assistant", "content": None, "tool_calls": [start], "refusal": None}, None)
        for fragment in _argument_deltas(arguments):
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}, None)
        yield chunk({}, "tool_calls")
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
    tool = _openai_chat_tool(payload, messages)
    call = None if tool is None else (_rand_id("call_", 24), *tool)
    usage = _chat_usage(prompt_tokens, len(reply.split()) if tool is None else _call_tokens(*tool))
    completion_id = _rand_id("chatcmpl-", 29)
    created = int(time.time())

    if payload.get("stream") is True:
        stream_options = payload.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        events = _chat_events(completion_id, created, model, reply, usage, include_usage, call)
        return await _stream(request, events, headers, started, openai=True)

    message: dict[str, Any] = {"role": "assistant", "content": reply, "refusal": None, "annotations": []}
    if call is not None:
        message["content"] = None
        message["tool_calls"] = [
            {"id": call[0], "type": "function", "function": {"name": call[1], "arguments": call[2]}}
        ]
    response = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "stop" if call is None else "tool_calls",
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


def _embedding_params(payload: dict[str, Any], headers: dict[str, str]) -> tuple[list[str | list[int]], int, str]:
    """(inputs, dimensions, encoding format) of an embeddings request, validated as OpenAI does."""
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
    return inputs, dims, encoding


def _encoded_embedding(vector: array.array[float], encoding: str) -> Any:
    if encoding != "base64":
        return vector.tolist()
    if sys.byteorder != "little":
        vector.byteswap()
    return base64.b64encode(vector.tobytes()).decode("ascii")


def _embeddings(body: Any, headers: dict[str, str], started: float) -> web.Response:
    payload = _openai_body(body, headers)
    model: str = payload["model"]
    inputs, dims, encoding = _embedding_params(payload, headers)
    data: list[dict[str, Any]] = []
    tokens = 0
    for index, item in enumerate(inputs):
        tokens += _prompt_tokens(len(item)) if isinstance(item, str) else len(item)
        embedding = _encoded_embedding(_embedding_vector(model, item, dims), encoding)
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
    start: dict[str, Any] = {
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


def _tool_use_events(
    message_id: str, model: str, tool_id: str, name: str, arguments: dict[str, Any], input_tokens: int
) -> Iterator[bytes]:
    """A Messages stream whose answer is one tool_use block, its input JSON in fragments as Claude sends it."""
    start: dict[str, Any] = {
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
    block = {"type": "tool_use", "id": tool_id, "name": name, "input": {}}
    yield _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
    text = _dumps(arguments).decode()
    for fragment in ["", *_argument_deltas(text)]:  # Claude's first input_json_delta is empty
        delta = {"type": "input_json_delta", "partial_json": fragment}
        yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
    yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": _call_tokens(name, text)},
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})


def _anthropic_input_tokens(payload: dict[str, Any]) -> int:
    # The system prompt is prompt text too, so it counts towards input tokens as on the real API.
    messages = payload["messages"]
    return _prompt_tokens(len(_text_of(payload.get("system"))) + sum(len(_text_of(m.get("content"))) for m in messages))


async def _messages(
    request: web.Request, body: Any, headers: dict[str, str], started: float
) -> web.StreamResponse:
    payload = _anthropic_body(body, headers)
    model: str = payload["model"]
    messages: list[Any] = payload["messages"]
    reply = _reply_for(model, messages)
    input_tokens = _anthropic_input_tokens(payload)
    message_id = _rand_id("msg_01", 22)
    tool = _anthropic_tool(payload, messages)

    if tool is not None:
        tool_id = _rand_id("toolu_01", 22)
        if payload.get("stream") is True:
            events = _tool_use_events(message_id, model, tool_id, *tool, input_tokens)
            return await _stream(request, events, headers, started, openai=False)
        response = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "tool_use", "id": tool_id, "name": tool[0], "input": tool[1]}],
            "stop_reason": "tool_use",
            "stop_sequence": None,
            "usage": _anthropic_usage(input_tokens, _call_tokens(tool[0], _dumps(tool[1]).decode())),
        }
        return _json_response(200, response, headers)

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
# OpenAI Responses API
#
# POST /responses answers in JSON or, with `stream: true`, in typed events (`event: response.created`
# ... `response.completed`, each with a `sequence_number`) as OpenAI sends them. Created responses are
# kept in memory (unless `store: false`, as on the real API) for GET and DELETE /responses/{id},
# GET /responses/{id}/input_items and `previous_response_id`, which continues the stored conversation:
# its input and output count as input again, and a function_call_output may answer a call made there.
# The reply follows the chat mock: the first words of the last user message (or of the last function
# call output), or a function call by the tool-call rule above.

_RESPONSE_STORE_LIMIT: Final = 1000
_HEX: Final = "0123456789abcdef"
_MESSAGE_ROLES: Final = ("user", "assistant", "system", "developer")
# Item types the real API accepts in `input` (those the mock does not model are still stored and listed).
_INPUT_ITEM_TYPES: Final = frozenset(
    (
        "message",
        "function_call",
        "function_call_output",
        "reasoning",
        "item_reference",
        "file_search_call",
        "web_search_call",
        "computer_call",
        "computer_call_output",
        "code_interpreter_call",
        "image_generation_call",
        "local_shell_call",
        "local_shell_call_output",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
        "mcp_call",
        "custom_tool_call",
        "custom_tool_call_output",
    )
)
_ITEM_ID_PREFIX: Final = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_"}


@dataclass
class _StoredResponse:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]  # this response's own input, each with an id, oldest first
    context: list[dict[str, Any]]  # the whole conversation through this response: earlier turns, input, output


def _hex_id(prefix: str) -> str:
    return prefix + "".join(random.choices(_HEX, k=48))


def _type_name(value: Any) -> str:
    """How OpenAI names a JSON value's type in its validation messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _invalid_type(param: str, expected: str, value: Any, headers: dict[str, str]) -> _Reject:
    return _Reject(
        _openai_error(
            400,
            f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)} instead.",
            headers,
            param=param,
            code="invalid_type",
        )
    )


def _missing(param: str, headers: dict[str, str]) -> _Reject:
    return _Reject(
        _openai_error(
            400, f"Missing required parameter: '{param}'.", headers, param=param, code="missing_required_parameter"
        )
    )


def _invalid_value(param: str, value: Any, supported: tuple[str, ...], headers: dict[str, str]) -> _Reject:
    listed = ", ".join(f"'{v}'" for v in supported[:-1]) + f", and '{supported[-1]}'"
    return _Reject(
        _openai_error(
            400,
            f"Invalid value: {_dumps(value).decode()}. Supported values are: {listed}.",
            headers,
            param=param,
            code="invalid_value",
        )
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _normalise_items(raw: Any, headers: dict[str, str]) -> list[dict[str, Any]]:
    """The request's `input` as items in the shape the API lists them (content as parts), validated."""
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": raw}]}]
    if not isinstance(raw, list):
        raise _invalid_type("input", "one of a string or an array of input items", raw, headers)
    items: list[dict[str, Any]] = []
    for index, item in enumerate(raw):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise _invalid_type(where, "an object", item, headers)
        kind = item.get("type", "message" if "role" in item else None)
        if kind is None:
            raise _missing(f"{where}.type", headers)
        if kind not in _INPUT_ITEM_TYPES:
            raise _invalid_value(f"{where}.type", kind, tuple(sorted(_INPUT_ITEM_TYPES)), headers)
        if kind == "message":
            items.append(_normalise_message(item, where, headers))
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if key not in item:
                    raise _missing(f"{where}.{key}", headers)
                if not isinstance(item[key], str):
                    raise _invalid_type(f"{where}.{key}", "a string", item[key], headers)
            items.append({**item, "type": "function_call", "status": item.get("status") or "completed"})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _missing(f"{where}.call_id", headers)
            output = item.get("output")
            if not isinstance(output, str | list):
                raise _invalid_type(f"{where}.output", "one of a string or an array", output, headers)
            items.append({**item, "status": item.get("status") or "completed"})
        else:
            items.append(dict(item))
    return items


def _normalise_message(item: dict[str, Any], where: str, headers: dict[str, str]) -> dict[str, Any]:
    role = item.get("role")
    if role is None:
        raise _missing(f"{where}.role", headers)
    if role not in _MESSAGE_ROLES:
        raise _invalid_value(f"{where}.role", role, _MESSAGE_ROLES, headers)
    content = item.get("content")
    text_type = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        part: dict[str, Any] = {"type": text_type, "text": content}
        if role == "assistant":
            part["annotations"] = []
        parts = [part]
    elif isinstance(content, list):
        parts = []
        for position, part in enumerate(content):
            at = f"{where}.content[{position}]"
            if not isinstance(part, dict):
                raise _invalid_type(at, "an object", part, headers)
            kind = part.get("type")
            if kind in ("input_text", "output_text") and not isinstance(part.get("text"), str):
                raise _invalid_type(f"{at}.text", "a string", part.get("text"), headers)
            if not isinstance(kind, str):
                raise _missing(f"{at}.type", headers)
            parts.append(dict(part))
    elif content is None:
        raise _missing(f"{where}.content", headers)
    else:
        raise _invalid_type(f"{where}.content", "one of a string or an array of input content", content, headers)
    return {"type": "message", "role": role, "content": parts, "status": item.get("status") or "completed",
            **({"id": item["id"]} if isinstance(item.get("id"), str) else {})}


def _item_text(item: dict[str, Any]) -> str:
    """The text an item carries: a message's parts, a call's name and arguments, a call output."""
    kind = item.get("type")
    if kind == "message":
        return _text_of(item.get("content"))
    if kind == "function_call":
        return f"{item.get('name', '')} {item.get('arguments', '')}".strip()
    if kind == "function_call_output":
        return _text_of(item.get("output"))
    return ""


def _responses_tools(payload: dict[str, Any], headers: dict[str, str]) -> list[dict[str, Any]]:
    tools = payload.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid_type("tools", "an array", tools, headers)
    echoed: list[dict[str, Any]] = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise _invalid_type(f"tools[{index}]", "an object", tool, headers)
        kind = tool.get("type")
        if not isinstance(kind, str):
            raise _missing(f"tools[{index}].type", headers)
        if kind == "function":
            if not isinstance(tool.get("name"), str):
                raise _missing(f"tools[{index}].name", headers)
            # Echoed as the API does: strict defaults to true for Responses function tools.
            echoed.append(
                {
                    "type": "function",
                    "name": tool["name"],
                    "description": tool.get("description"),
                    "parameters": tool.get("parameters"),
                    "strict": True if tool.get("strict") is None else tool["strict"],
                }
            )
        else:
            echoed.append(dict(tool))
    return echoed


def _validate_responses(payload: dict[str, Any], headers: dict[str, str]) -> None:
    if "input" not in payload and not any(payload.get(k) for k in ("previous_response_id", "prompt", "conversation")):
        raise _missing("input", headers)
    for key in ("instructions", "previous_response_id", "user", "safety_identifier", "prompt_cache_key"):
        value = payload.get(key)
        if value is not None and not isinstance(value, str):
            raise _invalid_type(key, "a string", value, headers)
    for key in ("stream", "store", "background", "parallel_tool_calls"):
        value = payload.get(key)
        if value is not None and not isinstance(value, bool):
            raise _invalid_type(key, "a boolean", value, headers)
    _validate_responses_numbers(payload, headers)
    choice = payload.get("tool_choice")
    if choice is not None and not isinstance(choice, dict) and choice not in ("none", "auto", "required"):
        raise _invalid_value("tool_choice", choice, ("none", "auto", "required"), headers)
    for key in ("metadata", "text", "reasoning", "stream_options"):
        value = payload.get(key)
        if value is not None and not isinstance(value, dict):
            raise _invalid_type(key, "an object", value, headers)
    if payload.get("stream_options") is not None and payload.get("stream") is not True:
        raise _Reject(
            _openai_error(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is set to true.",
                headers,
                param="stream_options",
            )
        )


def _validate_responses_numbers(payload: dict[str, Any], headers: dict[str, str]) -> None:
    limit = payload.get("max_output_tokens")
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise _invalid_type("max_output_tokens", "an integer", limit, headers)
        if limit < 16:
            raise _Reject(
                _openai_error(
                    400,
                    "Invalid 'max_output_tokens': integer below minimum value. "
                    f"Expected a value >= 16, but got {limit} instead.",
                    headers,
                    param="max_output_tokens",
                    code="integer_below_min_value",
                )
            )
    for key, top in (("temperature", 2), ("top_p", 1)):
        value = payload.get(key)
        if value is None:
            continue
        if not _is_number(value):
            raise _invalid_type(key, "a decimal", value, headers)
        if not 0 <= value <= top:
            raise _Reject(
                _openai_error(
                    400,
                    f"Invalid '{key}': decimal {'below minimum' if value < 0 else 'above maximum'} value. "
                    f"Expected a value {'>= 0' if value < 0 else f'<= {top}'}, but got {value} instead.",
                    headers,
                    param=key,
                    code="decimal_below_min_value" if value < 0 else "decimal_above_max_value",
                )
            )


def _responses_call(payload: dict[str, Any], tools: list[dict[str, Any]], conversation: list[dict[str, Any]]
                    ) -> tuple[str, str] | None:
    """(name, JSON arguments) when the Responses mock calls a function (the tool-call rule above)."""
    choice = payload.get("tool_choice")
    last = conversation[-1] if conversation else None
    if choice == "none" or last is None or last.get("type") != "message" or last.get("role") != "user":
        return None
    functions = [(tool["name"], tool.get("parameters")) for tool in tools if tool.get("type") == "function"]
    forced = choice.get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    picked = _pick_tool(functions, forced, choice == "required", _item_text(last))
    if picked is None:
        return None
    return picked[0], _dumps(_arguments_for(picked[1])).decode()


def _responses_reply(model: str, conversation: list[dict[str, Any]]) -> str:
    """The chat mock's reply, from the last user message or function call output."""
    source = ""
    for item in reversed(conversation):
        if item.get("type") == "function_call_output" or (
            item.get("type") == "message" and item.get("role") == "user"
        ):
            source = _item_text(item)
            break
    words = source.split()[:_REPLY_WORDS]
    return f"mock reply from {model}: {' '.join(words)}".rstrip()


def _responses_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _response_object(
    payload: dict[str, Any],
    response_id: str,
    created_at: int,
    tools: list[dict[str, Any]],
) -> dict[str, Any]:
    """A response object with the request's settings echoed, as the API returns them; status in_progress."""
    text = payload.get("text")
    if not isinstance(text, dict):
        text = {}
    reasoning = payload.get("reasoning")
    if not isinstance(reasoning, dict):
        reasoning = {}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": payload.get("background") is True,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": payload.get("instructions"),
        "max_output_tokens": payload.get("max_output_tokens"),
        "max_tool_calls": payload.get("max_tool_calls"),
        "model": payload["model"],
        "output": [],
        "parallel_tool_calls": payload.get("parallel_tool_calls") is not False,
        "previous_response_id": payload.get("previous_response_id"),
        "prompt_cache_key": payload.get("prompt_cache_key"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "safety_identifier": payload.get("safety_identifier"),
        "service_tier": "default",
        "store": payload.get("store") is not False,
        "temperature": payload.get("temperature", 1.0),
        "text": {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity") or "medium"},
        "tool_choice": payload.get("tool_choice") or "auto",
        "tools": tools,
        "top_logprobs": payload.get("top_logprobs") or 0,
        "top_p": payload.get("top_p", 1.0),
        "truncation": payload.get("truncation") or "disabled",
        "usage": None,
        "user": payload.get("user"),
        "metadata": payload.get("metadata") or {},
    }


def _response_events(final: dict[str, Any], obfuscate: bool = False) -> Iterator[bytes]:
    """The typed event stream whose end state is ``final`` (a completed response), as OpenAI streams it.

    With ``obfuscate`` (the API's default, off with ``stream_options.include_obfuscation: false``) each
    delta event carries an ``obfuscation`` field of random characters padding its size, as OpenAI does.
    """
    sequence = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        if obfuscate and "delta" in fields:
            payload["obfuscation"] = "".join(random.choices(_ID_ALPHABET, k=random.randint(1, 16)))
        sequence += 1
        return _sse(kind, payload)

    start = {**final, "status": "in_progress", "completed_at": None, "output": [], "usage": None}
    yield event("response.created", response=start)
    yield event("response.in_progress", response=start)
    for index, item in enumerate(final["output"]):
        if item["type"] == "message":
            text = item["content"][0]["text"]
            yield event("response.output_item.added", output_index=index,
                        item={**item, "status": "in_progress", "content": []})
            yield event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                        part=_output_text_part(""))
            for delta in _word_deltas(text):
                yield event("response.output_text.delta", item_id=item["id"], output_index=index, content_index=0,
                            delta=delta, logprobs=[])
            yield event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                        text=text, logprobs=[])
            yield event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=_output_text_part(text))
        else:
            arguments = item["arguments"]
            yield event("response.output_item.added", output_index=index,
                        item={**item, "status": "in_progress", "arguments": ""})
            for fragment in _argument_deltas(arguments):
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=fragment)
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        name=item["name"], arguments=arguments)
        yield event("response.output_item.done", output_index=index, item=item)
    yield event("response.completed", response=final)


def _response_store(request: web.Request) -> OrderedDict[str, _StoredResponse]:
    return request.app[_RESPONSES_KEY]


def _responses_history(
    store: OrderedDict[str, _StoredResponse], payload: dict[str, Any], headers: dict[str, str]
) -> list[dict[str, Any]]:
    """The conversation so far, when the request continues a stored response (previous_response_id)."""
    previous_id = payload.get("previous_response_id")
    if not previous_id:
        return []
    previous = store.get(previous_id)
    if previous is None:
        raise _Reject(
            _openai_error(
                400,
                f"Previous response with id '{previous_id}' not found.",
                headers,
                param="previous_response_id",
                code="previous_response_not_found",
            )
        )
    return previous.context


def _check_call_outputs(history: list[dict[str, Any]], items: list[dict[str, Any]], headers: dict[str, str]) -> None:
    called = {item.get("call_id") for item in history + items if item.get("type") == "function_call"}
    for item in items:
        if item.get("type") == "function_call_output" and item["call_id"] not in called:
            raise _Reject(
                _openai_error(
                    400, f"No tool call found for function call output with call_id {item['call_id']}.", headers,
                    param="input",
                )
            )


def _responses_output(
    payload: dict[str, Any], tools: list[dict[str, Any]], conversation: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """The response's output items (a message, or a function call) and their token count."""
    call = _responses_call(payload, tools, conversation)
    if call is None:
        reply = _responses_reply(payload["model"], conversation)
        message = {
            "id": _hex_id("msg_"),
            "type": "message",
            "status": "completed",
            "content": [_output_text_part(reply)],
            "role": "assistant",
        }
        return [message], len(reply.split())
    name, arguments = call
    function_call = {
        "id": _hex_id("fc_"),
        "type": "function_call",
        "status": "completed",
        "arguments": arguments,
        "call_id": _rand_id("call_", 24),
        "name": name,
    }
    return [function_call], _call_tokens(name, arguments)


async def _responses(
    request: web.Request, body: Any, headers: dict[str, str], started: float
) -> web.StreamResponse:
    payload = _openai_body(body, headers)
    _validate_responses(payload, headers)
    store = _response_store(request)
    history = _responses_history(store, payload, headers)
    items = _normalise_items(payload.get("input", []), headers)
    tools = _responses_tools(payload, headers)
    _check_call_outputs(history, items, headers)
    for item in items:
        if "id" not in item or not isinstance(item["id"], str):
            item["id"] = _hex_id(_ITEM_ID_PREFIX.get(str(item.get("type")), "item_"))

    conversation = history + items
    instructions = payload.get("instructions") or ""
    input_tokens = _prompt_tokens(len(instructions) + sum(len(_item_text(item)) for item in conversation))
    output, output_tokens = _responses_output(payload, tools, conversation)
    created_at = int(time.time())
    final = _response_object(payload, _hex_id("resp_"), created_at, tools)
    final.update(status="completed", completed_at=created_at, output=output,
                 usage=_responses_usage(input_tokens, output_tokens))
    if final["store"]:
        store[final["id"]] = _StoredResponse(final, items, conversation + output)
        while len(store) > _RESPONSE_STORE_LIMIT:
            store.popitem(last=False)
    if payload.get("stream") is True:
        options = payload.get("stream_options") or {}
        events = _response_events(final, obfuscate=options.get("include_obfuscation") is not False)
        return await _stream(request, events, headers, started, openai=True)
    headers["openai-processing-ms"] = _elapsed_ms(started)
    return _json_response(200, final, headers)


def _response_not_found(response_id: str, headers: dict[str, str]) -> web.Response:
    return _openai_error(404, f"Response with id '{response_id}' not found.", headers, param=None)


def _stored_response(request: web.Request, method: str, response_id: str, headers: dict[str, str]) -> web.Response:
    """GET (retrieve) or DELETE of a stored response."""
    store = _response_store(request)
    stored = store.get(response_id)
    if stored is None:
        return _response_not_found(response_id, headers)
    if method == "DELETE":
        del store[response_id]
        return _json_response(200, {"id": response_id, "object": "response", "deleted": True}, headers)
    return _json_response(200, stored.response, headers)


def _response_input_items(request: web.Request, response_id: str, headers: dict[str, str]) -> web.Response:
    stored = _response_store(request).get(response_id)
    if stored is None:
        return _response_not_found(response_id, headers)
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        return _openai_error(400, f"Invalid value for 'order': {order!r}.", headers, param="order",
                             code="invalid_value")
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        return _openai_error(400, "Invalid 'limit': expected an integer from 1 to 100.", headers, param="limit")
    items = stored.input_items if order == "asc" else stored.input_items[::-1]
    after = request.query.get("after")
    if after:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return _json_response(
        200,
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        },
        headers,
    )


def _cancel_response(request: web.Request, response_id: str, headers: dict[str, str]) -> web.Response:
    stored = _response_store(request).get(response_id)
    if stored is None:
        return _response_not_found(response_id, headers)
    if not stored.response.get("background"):
        return _openai_error(400, "Only responses created with background=true can be cancelled.", headers)
    return _json_response(200, stored.response, headers)  # already finished: cancelling changes nothing


# ---------------------------------------------------------------------------------------------------
# OpenAI legacy completions


def _completion_prompts(value: Any) -> list[str | list[int]] | None:
    """The prompts of a legacy completion (one choice each); None when the shape is invalid."""
    if isinstance(value, str):
        return [value]
    return _embedding_inputs(value)


def _completion_events(
    completion_id: str,
    created: int,
    model: str,
    choices: list[tuple[str, str]],
    usage: dict[str, Any],
    include_usage: bool,
) -> Iterator[bytes]:
    base = {"id": completion_id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": _SYSTEM_FINGERPRINT}

    def chunk(index: int, text: str, finish_reason: str | None) -> bytes:
        payload: dict[str, Any] = {
            **base,
            "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            payload["usage"] = None
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    for index, (text, finish_reason) in enumerate(choices):
        for delta in _word_deltas(text):
            yield chunk(index, delta, None)
        yield chunk(index, "", finish_reason)
    if include_usage:
        yield b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n"
    yield b"data: [DONE]\n\n"


def _completion_params(payload: dict[str, Any], headers: dict[str, str]) -> tuple[list[str | list[int]], int, int]:
    """(prompts, max_tokens, n) of a legacy completion request, validated as OpenAI does."""
    if "prompt" not in payload:
        raise _missing("prompt", headers)
    prompts = _completion_prompts(payload["prompt"])
    if prompts is None:
        raise _invalid_type("prompt", "one of a string, an array of strings or an array of tokens",
                            payload["prompt"], headers)
    max_tokens = payload.get("max_tokens")
    if max_tokens is None:
        max_tokens = 16  # the legacy API's default
    elif not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise _invalid_type("max_tokens", "an integer", max_tokens, headers)
    n = payload.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise _invalid_type("n", "an integer from 1 to 128", n, headers)
    if payload.get("stream_options") is not None and payload.get("stream") is not True:
        raise _Reject(
            _openai_error(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is set to true.",
                headers,
                param="stream_options",
            )
        )
    return prompts, max_tokens, n


def _completion_choices(
    model: str, prompts: list[str | list[int]], max_tokens: int, n: int, echo: bool
) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """The (text, finish reason) of every choice, n per prompt, and the usage they add up to."""
    choices: list[tuple[str, str]] = []
    prompt_tokens = completion_tokens = 0
    for prompt in prompts:
        prompt_tokens += _prompt_tokens(len(prompt)) if isinstance(prompt, str) else len(prompt)
        words = (prompt if isinstance(prompt, str) else "").split()[:_REPLY_WORDS]
        reply = f"mock reply from {model}: {' '.join(words)}".rstrip().split(" ")
        finish_reason = "length" if len(reply) > max_tokens else "stop"
        text = " ".join(reply[:max_tokens])
        for _ in range(n):
            completion_tokens += len(text.split())
            choices.append(((prompt if echo and isinstance(prompt, str) else "") + text, finish_reason))
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return choices, usage


async def _completions(
    request: web.Request, body: Any, headers: dict[str, str], started: float
) -> web.StreamResponse:
    payload = _openai_body(body, headers)
    prompts, max_tokens, n = _completion_params(payload, headers)
    model: str = payload["model"]
    choices, usage = _completion_choices(model, prompts, max_tokens, n, payload.get("echo") is True)
    completion_id = _rand_id("cmpl-", 29)
    created = int(time.time())
    if payload.get("stream") is True:
        stream_options = payload.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        events = _completion_events(completion_id, created, model, choices, usage, include_usage)
        return await _stream(request, events, headers, started, openai=True)
    response = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
            for index, (text, finish_reason) in enumerate(choices)
        ],
        "usage": usage,
        "system_fingerprint": _SYSTEM_FINGERPRINT,
    }
    headers["openai-processing-ms"] = _elapsed_ms(started)
    return _json_response(200, response, headers)


# ---------------------------------------------------------------------------------------------------
# models lists (both APIs) and Anthropic token counting

_MODEL_CREATED: Final = 1_686_935_002  # a fixed timestamp: clients only read it


def _openai_model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _MODEL_CREATED, "owned_by": "system"}


def _anthropic_model(model_id: str) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": model_id.replace("-", " ").title(),
        "created_at": "2024-06-20T00:00:00Z",
        "lifecycle": "active",
    }


def _models(request: web.Request, provider_api: str, model_id: str | None, headers: dict[str, str]) -> web.Response:
    config = request.app[_CONFIG_KEY]
    if provider_api == _OPENAI:
        if model_id is None:
            data = [_openai_model(m) for m in config.openai_models]
            return _json_response(200, {"object": "list", "data": data}, headers)
        if model_id not in config.openai_models:
            return _openai_error(
                404,
                f"The model '{model_id}' does not exist or you do not have access to it.",
                headers,
                code="model_not_found",
            )
        return _json_response(200, _openai_model(model_id), headers)
    if model_id is not None:
        if model_id not in config.anthropic_models:
            return _anthropic_error(404, "not_found_error", f"model: {model_id}", headers)
        return _json_response(200, _anthropic_model(model_id), headers)
    models = list(config.anthropic_models)
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        return _anthropic_error(400, "invalid_request_error", "limit: Input should be between 1 and 1000", headers)
    after, before = request.query.get("after_id"), request.query.get("before_id")
    if after in models:
        models = models[models.index(after) + 1 :]
    if before in models:
        models = models[: models.index(before)]
    page = models[:limit]
    return _json_response(
        200,
        {
            "data": [_anthropic_model(m) for m in page],
            "has_more": len(models) > limit,
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None,
        },
        headers,
    )


def _count_tokens(body: Any, headers: dict[str, str]) -> web.Response:
    payload = _anthropic_body(body, headers, count_tokens=True)
    # Exactly what /messages charges for the same request, so estimates can be checked against it.
    return _json_response(200, {"input_tokens": _anthropic_input_tokens(payload)}, headers)


# ---------------------------------------------------------------------------------------------------
# streaming and dispatch


def _elapsed_ms(started: float) -> str:
    return str(int((time.monotonic() - started) * 1000))


async def _stream(
    request: web.Request,
    events: Iterator[bytes],
    headers: dict[str, str],
    started: float,
    *,
    openai: bool,
    content_type: str = _SSE_CT,
) -> web.StreamResponse:
    """Write ``events`` as a chunked body (SSE unless ``content_type`` says otherwise), honouring
    x-mock-cut-after and x-mock-event-delay-ms, which count the items of ``events``."""
    cut_after = _int_header(request, "x-mock-cut-after")
    delay_ms = _int_header(request, "x-mock-event-delay-ms") or 0
    if openai:
        headers["openai-processing-ms"] = _elapsed_ms(started)
    headers["cache-control"] = "no-cache"
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = content_type
    if content_type != _EVENTSTREAM_CT:
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


def _models_api(request: web.Request) -> str:
    # Both SDKs call GET /v1/models; only Anthropic's sends anthropic-version (or x-api-key).
    headers = request.headers
    return _ANTHROPIC if "anthropic-version" in headers or "x-api-key" in headers else _OPENAI


def _api_route(request: web.Request) -> tuple[str, str, str | None] | None:
    """(provider API, kind, the id in the path) of an API call, by method and path suffix."""
    method = request.method
    parts = request.path.rstrip("/").split("/")
    last = parts[-1]
    if method == "POST":
        if last == "completions":
            return (_OPENAI, _CHAT, None) if parts[-2:-1] == ["chat"] else (_OPENAI, _COMPLETIONS, None)
        if last == "embeddings":
            return _OPENAI, _EMBEDDINGS, None
        if last == "responses":
            return _OPENAI, _RESPONSES, None
        if last == "messages":
            return _ANTHROPIC, _MESSAGES, None
        if last == "count_tokens" and parts[-2:-1] == ["messages"]:
            return _ANTHROPIC, _COUNT_TOKENS, None
        if last == "cancel" and len(parts) >= 3 and parts[-3] == "responses" and parts[-2]:
            return _OPENAI, _RESPONSE_CANCEL, parts[-2]
        return None
    if method in ("GET", "DELETE") and len(parts) >= 2 and parts[-2] == "responses" and last:
        return _OPENAI, _RESPONSE, last
    if method != "GET":
        return None
    if last == "input_items" and len(parts) >= 3 and parts[-3] == "responses" and parts[-2]:
        return _OPENAI, _RESPONSE_ITEMS, parts[-2]
    if last == "models":
        return _models_api(request), _MODELS, None
    if len(parts) >= 2 and parts[-2] == "models" and last:
        return _models_api(request), _MODELS, last
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


def _mark_untargeted(request: web.Request, name: str, models: tuple[str, ...]) -> None:
    """Ignore this request's fault headers when x-mock-only names other mocks and models."""
    only = request.headers.get("x-mock-only")
    if only is None:
        return
    targets = {part.strip() for part in only.split(",")}
    if name not in targets and targets.isdisjoint(models):
        request[_UNTARGETED] = True


def _fault(request: web.Request, name: str) -> str | None:
    return None if request.get(_UNTARGETED) else request.headers.get(name)


@dataclass
class _Call:
    """What every API handler starts from (see _begin)."""

    body: Any  # the parsed JSON body, None when absent or not JSON
    headers: dict[str, str]  # the reply's headers so far
    fault: int | None  # the error status to inject (x-mock-status or MockConfig.fault_status)
    started: float


async def _begin(request: web.Request, provider_api: str, models: tuple[str, ...] | None = None) -> _Call | None:
    """Read, record, delay and maybe reset a request: the steps every API shares before its auth.

    ``models`` are the names x-mock-only may target, the first one reported in x-mock-received-model;
    None takes the body's `model`. None is returned when the connection was reset (see x-mock-reset)."""
    started = time.monotonic()
    config = request.app[_CONFIG_KEY]
    raw = await request.read()
    try:
        body: Any = _loads(raw) if raw else None
    except ValueError:
        body = None
    if models is None:
        model = body.get("model") if isinstance(body, dict) else None
        models = (model,) if isinstance(model, str) else ()
    _mark_untargeted(request, config.name, models)
    _record(request, request.app[_RECORDS_KEY], body, provider_api)

    latency_ms = _int_header(request, "x-mock-latency-ms")
    if latency_ms is None:
        latency_ms = config.latency_ms
    if latency_ms > 0:
        await asyncio.sleep(latency_ms / 1000)
    if (_fault(request, "x-mock-reset") or "").strip() in ("1", "true", "yes"):
        # The body has been read, so the client has finished sending and sees the reset while
        # waiting for a response, which is the failure mode being simulated.
        _abort(request, reset=True)
        return None

    headers: dict[str, str] = {"x-mock-provider": config.name, "x-mock-received-model": models[0] if models else ""}
    request_id = request.headers.get("x-request-id")
    if request_id is not None:
        headers["x-request-id"] = request_id
    fault = _int_header(request, "x-mock-status")
    if fault is None:
        fault = config.fault_status
    if fault is not None and not 400 <= fault <= 599:
        fault = None
    return _Call(body, headers, fault, started)


def _reset_response() -> web.Response:
    # Never written: aiohttp's write on the aborted transport raises ConnectionError, which it treats
    # as a client disconnect.
    return web.Response(status=502)


async def _openai_api(
    request: web.Request, kind: str, resource_id: str | None, call: _Call
) -> web.StreamResponse:
    """An authenticated, unfaulted OpenAI call (Azure's too); raises _Reject on a bad request."""
    body, headers, started = call.body, call.headers, call.started
    if kind == _CHAT:
        return await _chat_completions(request, body, headers, started)
    if kind == _RESPONSES:
        return await _responses(request, body, headers, started)
    if kind == _COMPLETIONS:
        return await _completions(request, body, headers, started)
    if kind == _RESPONSE:
        return _stored_response(request, request.method, str(resource_id), headers)
    if kind == _RESPONSE_ITEMS:
        return _response_input_items(request, str(resource_id), headers)
    if kind == _RESPONSE_CANCEL:
        return _cancel_response(request, str(resource_id), headers)
    if kind == _MODELS:
        return _models(request, _OPENAI, resource_id, headers)
    return _embeddings(body, headers, started)


async def _anthropic_api(
    request: web.Request, kind: str, resource_id: str | None, call: _Call
) -> web.StreamResponse:
    headers = call.headers
    headers["request-id"] = _rand_id("req_011C", 20)
    _check_anthropic_auth(request, request.app[_CONFIG_KEY], headers)
    if "anthropic-version" not in request.headers:
        return _anthropic_error(400, "invalid_request_error", "anthropic-version: header is required", headers)
    if call.fault is not None:
        return _anthropic_fault(call.fault, headers)
    if kind == _COUNT_TOKENS:
        return _count_tokens(call.body, headers)
    if kind == _MODELS:
        return _models(request, _ANTHROPIC, resource_id, headers)
    return await _messages(request, call.body, headers, call.started)


async def _handle_api(
    request: web.Request, provider_api: str, kind: str, resource_id: str | None
) -> web.StreamResponse:
    call = await _begin(request, provider_api)
    if call is None:
        return _reset_response()
    try:
        if provider_api == _ANTHROPIC:
            return await _anthropic_api(request, kind, resource_id, call)
        # Auth precedes fault injection, as on the real APIs: an unauthenticated caller never
        # learns about rate limits.
        _check_openai_auth(request, request.app[_CONFIG_KEY], call.headers)
        if call.fault is not None:
            call.headers["openai-processing-ms"] = _elapsed_ms(call.started)
            return _openai_fault(call.fault, call.headers)
        return await _openai_api(request, kind, resource_id, call)
    except _Reject as reject:
        if provider_api == _OPENAI:
            reject.response.headers["openai-processing-ms"] = _elapsed_ms(call.started)
        return reject.response


async def _dispatch(request: web.Request) -> web.StreamResponse:
    path = request.path
    method = request.method
    from devtools.mock_cloud import route as cloud_route  # it imports this module: the cycle is cut here

    cloud = cloud_route(request)
    if cloud is not None:
        return await cloud
    route = _api_route(request)
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
    # Recorded too: a test can see what reached the provider on a path it does not serve (and with which key).
    _record(request, request.app[_RECORDS_KEY], None, "unknown")
    return _openai_error(404, f"Invalid URL ({method} {path})", {"x-mock-provider": config.name})


def build_app(config: MockConfig) -> web.Application:
    app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
    app[_CONFIG_KEY] = config
    app[_RECORDS_KEY] = deque(maxlen=max(0, config.record_limit))
    app[_RESPONSES_KEY] = OrderedDict()
    from devtools.mock_cloud import setup as cloud_setup  # it imports this module: the cycle is cut here

    cloud_setup(app)
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


def _model_list(raw: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if raw is None:
        return default
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _deployments(raw: str | None) -> dict[str, str]:
    """`dep=model,dep2=model2` (a bare `dep` stands for itself)."""
    pairs = (part.strip().partition("=") for part in (raw or "").split(","))
    return {name.strip(): (model.strip() or name.strip()) for name, _, model in pairs if name.strip()}


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="OpenAI/Anthropic/Azure OpenAI/Bedrock/Gemini/Vertex AI-compatible mock AI provider"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--openai-key")
    parser.add_argument("--anthropic-key")
    parser.add_argument("--name", default="mock")
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--fault-status", type=int)
    parser.add_argument("--record-limit", type=int, default=200)
    parser.add_argument("--openai-models", help="comma-separated models GET /v1/models lists (OpenAI)")
    parser.add_argument("--anthropic-models", help="comma-separated models GET /v1/models lists (Anthropic)")
    parser.add_argument("--azure-key", help="Azure OpenAI `api-key`")
    parser.add_argument("--azure-token", help="Azure OpenAI Entra ID token (`Authorization: Bearer`)")
    parser.add_argument("--azure-deployments", help="comma-separated dep=model (default: any deployment)")
    parser.add_argument("--aws-access-key-id", help="Bedrock: verify SigV4 against this key")
    parser.add_argument("--aws-secret-access-key")
    parser.add_argument("--aws-session-token", help="Bedrock: require this x-amz-security-token")
    parser.add_argument("--aws-region", help="Bedrock: the region signatures must be scoped to")
    parser.add_argument("--gemini-key", help="Gemini API key (x-goog-api-key or ?key=)")
    parser.add_argument("--google-public-key-file", help="PEM public key or certificate checking /token's JWTs")
    parser.add_argument("--vertex-project")
    parser.add_argument("--vertex-location")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[str, int, MockConfig]:
    """(host, port, config) from the command line."""
    args = _parser().parse_args(argv)
    config = MockConfig(
        openai_key=args.openai_key,
        anthropic_key=args.anthropic_key,
        name=args.name,
        latency_ms=args.latency_ms,
        fault_status=args.fault_status,
        record_limit=args.record_limit,
        openai_models=_model_list(args.openai_models, DEFAULT_OPENAI_MODELS),
        anthropic_models=_model_list(args.anthropic_models, DEFAULT_ANTHROPIC_MODELS),
        azure_key=args.azure_key,
        azure_token=args.azure_token,
        azure_deployments=_deployments(args.azure_deployments),
        aws_access_key_id=args.aws_access_key_id,
        aws_secret_access_key=args.aws_secret_access_key,
        aws_session_token=args.aws_session_token,
        aws_region=args.aws_region,
        gemini_key=args.gemini_key,
        google_public_key_pem=_read_text(args.google_public_key_file),
        vertex_project=args.vertex_project,
        vertex_location=args.vertex_location,
    )
    return args.host, args.port, config


def main(argv: list[str] | None = None) -> None:
    host, port, config = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, port, config))


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy's: devtools.mock_cloud imports
    # devtools.mock_provider, and the app state keys must be that module's.
    from devtools.mock_provider import main as _main

    _main()
