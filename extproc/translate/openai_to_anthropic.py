"""An OpenAI Chat Completions caller served by an Anthropic Messages provider.

``request`` turns the caller's chat request into a Messages request; ``response``, ``error`` and
``StreamTranslator`` turn Anthropic's answer back into what the OpenAI SDK expects, with ``model`` set
to the name the caller asked for and ids derived from Anthropic's (``msg_X`` → ``chatcmpl-X``).

Mapped: system/developer messages → ``system`` (a string for one plain system message, text blocks
otherwise; system messages later in the conversation are hoisted there too, Anthropic has no other
place for them), user/assistant turns, text and image parts (``data:`` URLs → base64 source, http(s)
→ url source), PDF ``file`` parts with inline data → ``document`` blocks, tools and ``tool_choice``
(``required`` → ``any``), ``parallel_tool_calls: false`` → ``disable_parallel_tool_use``, assistant
``tool_calls`` → ``tool_use`` blocks, ``role: tool`` messages → ``tool_result`` blocks (consecutive
ones, and a user message right after them, merged into one user turn), ``stop`` → ``stop_sequences``,
``max_completion_tokens``/``max_tokens`` → ``max_tokens`` (``default_max_tokens`` when absent, as
Anthropic requires it), ``temperature`` (clamped to Anthropic's 0..1), ``top_p``, ``stream``,
``user``/``safety_identifier`` → ``metadata.user_id``.

Dropped because they do not change what the caller gets back: ``seed``, ``presence_penalty``,
``frequency_penalty``, ``service_tier``, ``store``, ``metadata`` (OpenAI's is for stored completions),
``prediction``, ``prompt_cache_key``, ``prompt_cache_retention``, ``verbosity``, ``reasoning_effort``,
``stream_options`` (the stream translator takes ``include_usage`` itself), a message's ``name``, an
image part's ``detail``, a tool's ``strict`` flag (the schema is still sent; Anthropic just does not
promise to follow it exactly), ``modalities: ["text"]``, ``n: 1`` and ``response_format: text``.

Raising :class:`TranslationError` because the answer would differ from what the caller asked for:
``n > 1``, ``logprobs``/``top_logprobs``, a non-empty ``logit_bias``, ``response_format`` other than
text (JSON mode and json_schema), audio (``audio``, ``modalities`` with audio, ``input_audio`` parts),
legacy ``functions``/``function_call``, ``web_search_options``, a final assistant message (Anthropic
would continue it as a prefill instead of answering it), non-function tools, ``file`` parts that are
not inline PDFs, image types Anthropic does not take, tool-call arguments that are not a JSON object,
and any request field this module does not know (new fields are refused rather than guessed at).

In streams, Anthropic's ``thinking``, ``signature`` and ``citations`` deltas are skipped (they only
appear when asked for, which this direction never does). ``[DONE]`` goes out as soon as
``message_stop`` arrives, so ``finish`` adds nothing to a clean stream; a source stream that ends
without ``message_stop`` ends the OpenAI stream with an error chunk (``data: {"error": ...}``, what
OpenAI itself sends mid-stream, and which makes the SDK raise) and no ``[DONE]``, as does an
Anthropic ``error`` event. Anthropic has no timestamp, so ``created`` is the translation time unless
given.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any, Final

import orjson

from extproc.translate import TranslationError
from extproc.translate.sse import SseParser, data_event

__all__ = ["StreamTranslator", "error", "request", "response"]

_MEDIA_TYPES: Final = frozenset(("image/jpeg", "image/png", "image/gif", "image/webp"))
_DATA_URL: Final = re.compile(r"data:([\w.+/-]+);base64,(.*)", re.DOTALL)
# Anthropic's temperature range is 0..1, OpenAI's 0..2: the top of OpenAI's range is "most random".
_MAX_TEMPERATURE: Final = 1.0

_DROPPED: Final = frozenset(
    (
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "service_tier",
        "store",
        "metadata",
        "prediction",
        "prompt_cache_key",
        "prompt_cache_retention",
        "verbosity",
        "reasoning_effort",
        "stream_options",
    )
)
_HANDLED: Final = frozenset(
    (
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "stream",
        "user",
        "safety_identifier",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "n",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "response_format",
        "modalities",
    )
)

_FINISH_REASONS: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic error type → (OpenAI error type, OpenAI code), as the OpenAI API spells the same failure.
_ERROR_TYPES: Final = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "permission_error": ("invalid_request_error", "permission_denied"),
    "not_found_error": ("invalid_request_error", "model_not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("requests", "rate_limit_exceeded"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "timeout_error": ("server_error", "timeout"),
    "api_error": ("server_error", None),
    "overloaded_error": ("server_error", "overloaded"),
}

_CUT_MESSAGE: Final = "The upstream provider's stream ended before the response was complete."


# ---------------------------------------------------------------------------------------------------
# request


def request(body: dict[str, Any], *, model: str, default_max_tokens: int = 4096) -> dict[str, Any]:
    """OpenAI chat request → Anthropic Messages request for ``model``."""
    _refuse_unsupported(body)
    system, messages = _messages(body.get("messages"))
    out: dict[str, Any] = {"model": model}
    if system is not None:
        out["system"] = system
    out["messages"] = messages

    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    out["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens

    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    temperature = body.get("temperature")
    if temperature is not None:
        out["temperature"] = min(temperature, _MAX_TEMPERATURE)
    top_p = body.get("top_p")
    if top_p is not None:
        out["top_p"] = top_p
    if body.get("stream"):
        out["stream"] = True
    user = body.get("user") or body.get("safety_identifier")
    if user is not None:
        out["metadata"] = {"user_id": user}

    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool(tool) for tool in tools]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"), bool(tools))
    if choice is not None:
        out["tool_choice"] = choice
    return out


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for key, value in body.items():
        # SDKs and hand-written clients send null for "not given"; it never means anything else here.
        if value is None or key in _DROPPED:
            continue
        if key not in _HANDLED:
            raise TranslationError(f"'{key}' cannot be translated to the Anthropic Messages API")
    n = body.get("n")
    if n is not None and n != 1:
        raise TranslationError("'n' > 1 cannot be served by the Anthropic Messages API (one choice per call)")
    if body.get("logprobs") or body.get("top_logprobs") is not None:
        raise TranslationError("'logprobs' cannot be served by the Anthropic Messages API")
    if body.get("logit_bias"):
        raise TranslationError("'logit_bias' cannot be served by the Anthropic Messages API")
    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else response_format
    if response_format is not None and kind != "text":
        raise TranslationError(f"'response_format' {kind!r} cannot be served by the Anthropic Messages API")
    modalities = body.get("modalities")
    if modalities is not None and any(m != "text" for m in modalities):
        raise TranslationError("audio output cannot be served by the Anthropic Messages API")


def _messages(raw: Any) -> tuple[str | list[dict[str, Any]] | None, list[dict[str, Any]]]:
    if not isinstance(raw, list) or not raw:
        raise TranslationError("'messages' must be a non-empty array")
    if isinstance(raw[-1], dict) and raw[-1].get("role") == "assistant":
        # OpenAI answers a trailing assistant message with a new message; Anthropic would continue it.
        raise TranslationError("a final assistant message would be continued (prefill) by the Anthropic API")
    system: list[dict[str, Any]] = []
    system_strings = 0
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(raw):
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            content = message.get("content")
            system_strings += isinstance(content, str)
            system.extend(_text_blocks(content, f"messages[{index}]"))
        elif role == "user":
            _append(turns, "user", _user_content(message.get("content"), index))
        elif role == "assistant":
            _append(turns, "assistant", _assistant_blocks(message, index))
        elif role == "tool":
            _append(turns, "user", [_tool_result(message, index)])
        else:
            raise TranslationError(f"'messages[{index}].role' {role!r} cannot be translated")
    if not system:
        return None, turns
    if system_strings == 1 and len(system) == 1:
        # The common case keeps the caller's plain string, which round-trips exactly.
        return system[0]["text"], turns
    return system, turns


def _append(turns: list[dict[str, Any]], role: str, content: str | list[dict[str, Any]]) -> None:
    """Add a turn, merging a user turn into a previous one that carries tool results.

    Anthropic wants every tool_result answering an assistant turn in the single user turn after it;
    OpenAI sends one ``tool`` message per result, and possibly a user message after them.
    """
    if turns and role == "user" and turns[-1]["role"] == "user":
        previous = turns[-1]["content"]
        if isinstance(previous, list) and any(block.get("type") == "tool_result" for block in previous):
            previous.extend([{"type": "text", "text": content}] if isinstance(content, str) else content)
            return
    turns.append({"role": role, "content": content})


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError(f"'{where}.content' must be a string or an array of text parts")
    blocks: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise TranslationError(f"'{where}.content' may only hold text parts here")
        blocks.append({"type": "text", "text": part.get("text", "")})
    return blocks


def _user_content(content: Any, index: int) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TranslationError(f"'messages[{index}].content' must be a string or an array")
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            blocks.append(_image(url, index))
        elif kind == "file":
            blocks.append(_document(part.get("file"), index))
        else:
            raise TranslationError(f"'messages[{index}].content' part type {kind!r} cannot be translated")
    return blocks


def _image(url: Any, index: int) -> dict[str, Any]:
    if not isinstance(url, str):
        raise TranslationError(f"'messages[{index}]' image_url has no url")
    if url.startswith("data:"):
        match = _DATA_URL.fullmatch(url)
        if match is None:
            raise TranslationError(f"'messages[{index}]' image data URL must be base64")
        media_type, data = match.groups()
        if media_type not in _MEDIA_TYPES:
            raise TranslationError(f"'messages[{index}]' image type {media_type!r} is not supported by Anthropic")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError(f"'messages[{index}]' image url must be a data: or http(s) URL")


def _document(file: Any, index: int) -> dict[str, Any]:
    data_url = file.get("file_data") if isinstance(file, dict) else None
    match = _DATA_URL.fullmatch(data_url) if isinstance(data_url, str) else None
    if match is None or match.group(1) != "application/pdf":
        # file_id refers to OpenAI's file store, which Anthropic cannot read.
        raise TranslationError(f"'messages[{index}]' only inline PDF files can be translated")
    block: dict[str, Any] = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": match.group(2)},
    }
    if isinstance(file.get("filename"), str):
        block["title"] = file["filename"]
    return block


def _assistant_blocks(message: dict[str, Any], index: int) -> list[dict[str, Any]]:
    if message.get("audio") is not None or message.get("function_call") is not None:
        raise TranslationError(f"'messages[{index}]' audio and legacy function_call cannot be translated")
    content = message.get("content")
    blocks: list[dict[str, Any]] = []
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                blocks.append({"type": "text", "text": part.get("text", "")})
            elif kind == "refusal":
                blocks.append({"type": "text", "text": part.get("refusal", "")})
            else:
                raise TranslationError(f"'messages[{index}].content' part type {kind!r} cannot be translated")
    elif isinstance(message.get("refusal"), str):
        blocks.append({"type": "text", "text": message["refusal"]})
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if call.get("type", "function") != "function" or not isinstance(function, dict):
            raise TranslationError(f"'messages[{index}].tool_calls' only function calls can be translated")
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": _arguments(function.get("arguments"), index),
            }
        )
    return blocks


def _arguments(raw: Any, index: int) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise TranslationError(f"'messages[{index}].tool_calls' arguments are not valid JSON") from exc
    if not isinstance(value, dict):
        raise TranslationError(f"'messages[{index}].tool_calls' arguments must be a JSON object")
    return value


def _tool_result(message: dict[str, Any], index: int) -> dict[str, Any]:
    content = message.get("content")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.get("tool_call_id")}
    # A string stays a string so the round trip is exact; text parts stay parts.
    block["content"] = content if isinstance(content, str) else _text_blocks(content, f"messages[{index}]")
    return block


def _tool(tool: Any) -> dict[str, Any]:
    kind = tool.get("type") if isinstance(tool, dict) else None
    function = tool.get("function") if isinstance(tool, dict) else None
    if kind != "function" or not isinstance(function, dict):
        raise TranslationError(f"tool type {kind!r} cannot be translated (only function tools)")
    out: dict[str, Any] = {"name": function.get("name")}
    if function.get("description") is not None:
        out["description"] = function["description"]
    # Anthropic requires an object schema; OpenAI allows leaving out parameters for a no-argument tool.
    out["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    return out


def _tool_choice(choice: Any, parallel: bool | None, has_tools: bool) -> dict[str, Any] | None:
    if choice is None:
        out: dict[str, Any] | None = {"type": "auto"} if parallel is False and has_tools else None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}  # Anthropic's "none" takes no parallel flag
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        out = {"type": "tool", "name": choice.get("function", {}).get("name")}
    else:
        raise TranslationError(f"'tool_choice' {choice!r} cannot be translated")
    if out is not None and parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


# ---------------------------------------------------------------------------------------------------
# response and error


def completion_id(message_id: str) -> str:
    """``msg_X`` → ``chatcmpl-X``: deterministic, and inverted by anthropic_to_openai.message_id."""
    return "chatcmpl-" + message_id.removeprefix("msg_")


def finish_reason(stop_reason: str | None) -> str:
    return _FINISH_REASONS.get(stop_reason or "end_turn", "stop")


def usage(raw: dict[str, Any]) -> dict[str, Any]:
    """Anthropic usage → OpenAI usage; Anthropic's input_tokens leave out cache reads and writes."""
    uncached = _count(raw.get("input_tokens"))
    read = _count(raw.get("cache_read_input_tokens"))
    written = _count(raw.get("cache_creation_input_tokens"))
    output = _count(raw.get("output_tokens"))
    prompt = uncached + read + written
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": read},
    }


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def response(body: dict[str, Any], *, requested_model: str, created: int | None = None) -> dict[str, Any]:
    """Anthropic message → OpenAI chat.completion, as if ``requested_model`` had answered."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in body.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            text.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": _json(block.get("input") or {})},
                }
            )
        # thinking and server-tool blocks only come back when asked for, which this direction never does.
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(text) if text or not calls else None,
        "refusal": None,
        "annotations": [],
    }
    if calls:
        message["tool_calls"] = calls
    return {
        "id": completion_id(str(body.get("id", ""))),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": requested_model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(body.get("stop_reason"))}
        ],
        "usage": usage(body.get("usage") or {}),
        "system_fingerprint": None,
    }


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _openai_error(message: str, err_type: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


def error(status: int, body: bytes) -> bytes:
    """Anthropic error body → OpenAI error body (the status is passed through by the caller)."""
    err_type, message = _anthropic_error_fields(body)
    if err_type is None:
        err_type = "api_error" if status >= 500 else "invalid_request_error"
    openai_type, code = _ERROR_TYPES.get(err_type, ("server_error" if status >= 500 else "invalid_request_error", None))
    if message is None:
        message = f"Upstream provider error (HTTP {status})"
    return orjson.dumps(_openai_error(message, openai_type, code))


def _anthropic_error_fields(body: bytes) -> tuple[str | None, str | None]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    inner = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(inner, dict):
        return None, None
    err_type, message = inner.get("type"), inner.get("message")
    return (err_type if isinstance(err_type, str) else None), (message if isinstance(message, str) else None)


# ---------------------------------------------------------------------------------------------------
# streaming


class StreamTranslator:
    """Anthropic SSE → OpenAI chat.completion.chunk SSE, one event at a time.

    Each Anthropic event becomes at most a few OpenAI chunks, emitted as soon as the event is
    complete. ``message_delta`` gives the finish chunk, ``message_stop`` the usage chunk (when the
    caller asked for ``include_usage``) and ``[DONE]``; ``finish`` then has nothing left to add unless
    the source was cut, when it adds an error chunk and never ``[DONE]``.
    """

    def __init__(self, *, requested_model: str, include_usage: bool, created: int | None = None) -> None:
        self._model = requested_model
        self._include_usage = include_usage
        self._created = int(time.time()) if created is None else created
        self._parser = SseParser()
        self._id = "chatcmpl-"
        self._usage: dict[str, Any] = {}
        self._tool_index: dict[int, int] = {}  # Anthropic block index → OpenAI tool_calls index
        self._tool_fed: set[int] = set()  # Anthropic tool blocks that streamed some input JSON
        self._ended = False  # message_stop or an error event: nothing more goes out

    @property
    def complete(self) -> bool:
        """True once the stream ended cleanly or with an error event the client has already seen."""
        return self._ended

    def feed(self, chunk: bytes) -> bytes:
        if self._ended:
            return b""
        out: list[bytes] = []
        for event in self._parser.feed(chunk):
            out.extend(self._event(event.event, event.data))
            if self._ended:
                break
        return b"".join(out)

    def finish(self) -> bytes:
        if self._ended:
            return b""
        self._ended = True
        return data_event(_openai_error(_CUT_MESSAGE, "server_error", None))

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self._include_usage:
            # OpenAI puts a null usage on every chunk once usage was asked for; mirrored so byte-level
            # consumers (the usage tracker's stripping) see the shape they know.
            payload["usage"] = None
        return data_event(payload)

    def _event(self, name: str | None, data: bytes) -> Iterable[bytes]:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._ended = True
            return [data_event(_openai_error("The upstream provider sent an unreadable event.", "server_error", None))]
        kind = payload.get("type", name) if isinstance(payload, dict) else name
        if kind == "message_start":
            message = payload.get("message") or {}
            self._id = completion_id(str(message.get("id", "")))
            self._usage = dict(message.get("usage") or {})
            return [self._chunk({"role": "assistant", "content": "", "refusal": None})]
        if kind == "content_block_start":
            return self._block_start(payload)
        if kind == "content_block_delta":
            return self._block_delta(payload)
        if kind == "message_delta":
            delta = payload.get("delta") or {}
            # message_delta usage counts are cumulative totals that overwrite message_start's.
            self._usage.update({k: v for k, v in (payload.get("usage") or {}).items() if v is not None})
            return [self._chunk({}, finish_reason(delta.get("stop_reason")))]
        if kind == "message_stop":
            self._ended = True
            out = []
            if self._include_usage:
                final = {
                    "id": self._id,
                    "object": "chat.completion.chunk",
                    "created": self._created,
                    "model": self._model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": usage(self._usage),
                }
                out.append(data_event(final))
            out.append(b"data: [DONE]\n\n")
            return out
        if kind == "error":
            self._ended = True
            inner = payload.get("error") or {}
            openai_type, code = _ERROR_TYPES.get(inner.get("type"), ("server_error", None))
            message = inner.get("message") or "The upstream provider reported an error mid-stream."
            return [data_event(_openai_error(message, openai_type, code))]
        if kind == "content_block_stop":
            return self._block_stop(payload)
        return ()  # ping and event types newer than this code

    def _block_start(self, payload: dict[str, Any]) -> list[bytes]:
        block = payload.get("content_block") or {}
        if block.get("type") == "tool_use":
            index = len(self._tool_index)
            self._tool_index[payload.get("index", 0)] = index
            call = {
                "index": index,
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": ""},
            }
            return [self._chunk({"tool_calls": [call]})]
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        return []

    def _block_delta(self, payload: dict[str, Any]) -> list[bytes]:
        delta = payload.get("delta") or {}
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if kind == "input_json_delta" and delta.get("partial_json"):
            index = self._tool_index.get(payload.get("index", 0))
            if index is None:
                return []
            self._tool_fed.add(payload.get("index", 0))
            return [self._chunk({"tool_calls": [{"index": index, "function": {"arguments": delta["partial_json"]}}]})]
        return []

    def _block_stop(self, payload: dict[str, Any]) -> list[bytes]:
        block = payload.get("index", 0)
        index = self._tool_index.get(block)
        if index is None or block in self._tool_fed:
            return []
        # A tool without input streams no JSON at all (its input is {}); OpenAI clients json.loads the
        # accumulated arguments, which fails on "", so send what OpenAI sends for such a call.
        return [self._chunk({"tool_calls": [{"index": index, "function": {"arguments": "{}"}}]})]
