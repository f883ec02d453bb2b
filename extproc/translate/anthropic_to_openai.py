"""An Anthropic Messages caller served by an OpenAI Chat Completions provider.

``request`` turns the caller's Messages request into a chat request; ``response``, ``error`` and
``StreamTranslator`` turn OpenAI's answer back into what the Anthropic SDK expects, with ``model`` set
to the name the caller asked for and ids derived from OpenAI's (``chatcmpl-X`` → ``msg_X``). Tool-call
ids pass through unchanged in both directions, so a conversation can move between providers.

Mapped: ``system`` (string → one system message, text blocks → one system message with text parts),
user/assistant turns, text, images (base64 source → ``data:`` URL, url source → URL), base64 PDF
``document`` blocks → ``file`` parts, ``tool_use`` blocks → assistant ``tool_calls`` (input object →
JSON-string arguments), ``tool_result`` blocks → ``role: tool`` messages (placed before the rest of
that user turn, as OpenAI wants results right after the calls), tools and ``tool_choice`` (``any`` →
``required``; ``disable_parallel_tool_use`` → ``parallel_tool_calls: false``), ``stop_sequences`` →
``stop``, ``max_tokens`` → ``max_completion_tokens``, ``temperature``, ``top_p``, ``stream`` (with
``stream_options.include_usage`` so the stream can report usage back), ``metadata.user_id`` → ``user``.

Dropped because they do not change what the caller gets back: ``top_k`` (a sampling knob OpenAI does
not have), ``service_tier``, ``thinking: {"type": "disabled"}``, ``cache_control`` and ``citations``
on blocks, ``thinking``/``redacted_thinking`` blocks in earlier assistant turns (they only exist when
thinking was enabled, which is refused), a tool result's ``is_error`` flag (its text still says what
went wrong).

Raising :class:`TranslationError` because the answer would differ from what the caller asked for:
enabled ``thinking``, server tools (web search, code execution, computer use, ...), ``mcp_servers``,
``container``, ``context_management``, structured ``output_format``, a final assistant turn (a prefill
Anthropic continues but OpenAI would answer anew), images or documents inside a tool result (OpenAI
tool messages hold text only), document sources other than a base64 PDF, more than 4 stop sequences,
and any request field this module does not know.

In streams, an OpenAI ``refusal`` delta becomes text with stop reason ``refusal``. ``message_start``
has to go out before OpenAI reports usage (its usage chunk comes last), so it carries zero input
tokens and the final ``message_delta`` carries the real counts, which the SDK takes as cumulative
totals. A source stream that ends without ``[DONE]`` ends the Anthropic stream with an ``error`` event
and no ``message_stop``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import orjson

from extproc.translate import TranslationError
from extproc.translate.sse import SseParser, named_event

__all__ = ["StreamTranslator", "error", "request", "response"]

_MAX_STOP: Final = 4  # OpenAI's limit; more would be a 400 from the provider with a less useful message

_DROPPED: Final = frozenset(("top_k", "service_tier"))
_HANDLED: Final = frozenset(
    (
        "model",
        "messages",
        "system",
        "max_tokens",
        "temperature",
        "top_p",
        "stop_sequences",
        "stream",
        "metadata",
        "tools",
        "tool_choice",
        "thinking",
    )
)

_STOP_REASONS: Final = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

# HTTP status → Anthropic error type; OpenAI's own error types are too coarse to tell these apart.
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_CUT_MESSAGE: Final = "The upstream provider's stream ended before the response was complete."


# ---------------------------------------------------------------------------------------------------
# request


def request(body: dict[str, Any], *, model: str) -> dict[str, Any]:
    """Anthropic Messages request → OpenAI chat request for ``model``."""
    _refuse_unsupported(body)
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _system_content(system)})
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise TranslationError("'messages' must be a non-empty array")
    if isinstance(raw[-1], dict) and raw[-1].get("role") == "assistant":
        raise TranslationError("a final assistant turn (prefill) cannot be continued by the OpenAI Chat API")
    for index, message in enumerate(raw):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user":
            messages.extend(_user_messages(message.get("content"), index))
        elif role == "assistant":
            messages.append(_assistant_message(message.get("content"), index))
        else:
            raise TranslationError(f"'messages.{index}.role' {role!r} cannot be translated")

    out: dict[str, Any] = {"model": model, "messages": messages}
    if body.get("max_tokens") is not None:
        out["max_completion_tokens"] = body["max_tokens"]
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop_sequences")
    if stop:
        if len(stop) > _MAX_STOP:
            raise TranslationError(f"OpenAI accepts at most {_MAX_STOP} stop sequences")
        out["stop"] = list(stop)
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and metadata.get("user_id") is not None:
        out["user"] = metadata["user_id"]

    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool(tool) for tool in tools]
    choice = body.get("tool_choice")
    if choice is not None:
        out.update(_tool_choice(choice, bool(tools)))
    return out


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for key, value in body.items():
        if value is None or key in _DROPPED:
            continue
        if key not in _HANDLED:
            raise TranslationError(f"'{key}' cannot be translated to the OpenAI Chat Completions API")
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") != "disabled":
        raise TranslationError("extended 'thinking' cannot be served by the OpenAI Chat Completions API")


def _system_content(system: Any) -> str | list[dict[str, Any]]:
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return [_text_part(block, "system") for block in system]
    raise TranslationError("'system' must be a string or an array of text blocks")


def _text_part(block: Any, where: str) -> dict[str, Any]:
    if not isinstance(block, dict) or block.get("type") != "text":
        raise TranslationError(f"'{where}' may only hold text blocks")
    return {"type": "text", "text": block.get("text", "")}


def _user_messages(content: Any, index: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise TranslationError(f"'messages.{index}.content' must be a string or an array")
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result":
            results.append(_tool_message(block, index))
        elif kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append(_image_part(block.get("source"), index))
        elif kind == "document":
            parts.append(_file_part(block, index))
        else:
            raise TranslationError(f"'messages.{index}.content' block type {kind!r} cannot be translated")
    if parts:
        results.append({"role": "user", "content": parts})
    return results


def _image_part(source: Any, index: int) -> dict[str, Any]:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif kind == "url":
        url = source.get("url")
    else:
        raise TranslationError(f"'messages.{index}' image source {kind!r} cannot be translated")
    return {"type": "image_url", "image_url": {"url": url}}


def _file_part(block: dict[str, Any], index: int) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") != "base64" or source.get("media_type") != "application/pdf":
        raise TranslationError(f"'messages.{index}' only base64 PDF documents can be translated")
    file: dict[str, Any] = {"file_data": f"data:application/pdf;base64,{source.get('data')}"}
    if isinstance(block.get("title"), str):
        file["filename"] = block["title"]
    return {"type": "file", "file": file}


def _tool_message(block: dict[str, Any], index: int) -> dict[str, Any]:
    content = block.get("content")
    if content is None:
        content = ""
    elif not isinstance(content, str):
        content = [_text_part(part, f"messages.{index} tool_result content") for part in content]
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": content}


def _assistant_message(content: Any, index: int) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise TranslationError(f"'messages.{index}.content' must be a string or an array")
    texts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise TranslationError(f"'messages.{index}.content' block type {kind!r} cannot be translated")
    message: dict[str, Any] = {"role": "assistant"}
    # One text block is the usual shape and reads best as a plain string; several stay separate parts.
    if len(texts) == 1:
        message["content"] = texts[0]["text"]
    elif texts:
        message["content"] = texts
    else:
        message["content"] = None
    if calls:
        message["tool_calls"] = calls
    return message


def _tool(tool: Any) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") not in (None, "custom") or "input_schema" not in tool:
        name = tool.get("type") if isinstance(tool, dict) else tool
        raise TranslationError(f"tool {name!r} is an Anthropic server tool and cannot be translated")
    function: dict[str, Any] = {"name": tool.get("name")}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    function["parameters"] = tool["input_schema"]
    return {"type": "function", "function": function}


def _tool_choice(choice: Any, has_tools: bool) -> dict[str, Any]:
    kind = choice.get("type") if isinstance(choice, dict) else None
    out: dict[str, Any]
    if kind == "auto":
        out = {"tool_choice": "auto"}
    elif kind == "none":
        out = {"tool_choice": "none"}
    elif kind == "any":
        out = {"tool_choice": "required"}
    elif kind == "tool":
        out = {"tool_choice": {"type": "function", "function": {"name": choice.get("name")}}}
    else:
        raise TranslationError(f"'tool_choice' {choice!r} cannot be translated")
    # OpenAI rejects parallel_tool_calls without tools.
    if choice.get("disable_parallel_tool_use") and has_tools:
        out["parallel_tool_calls"] = False
    return out


# ---------------------------------------------------------------------------------------------------
# response and error


def message_id(completion_id: str) -> str:
    """``chatcmpl-X`` → ``msg_X``: deterministic, and inverted by openai_to_anthropic.completion_id."""
    return "msg_" + completion_id.removeprefix("chatcmpl-")


def stop_reason(finish_reason: str | None) -> str:
    return _STOP_REASONS.get(finish_reason or "stop", "end_turn")


def usage(raw: dict[str, Any]) -> dict[str, Any]:
    """OpenAI usage → Anthropic usage; OpenAI's prompt_tokens include the cached ones, Anthropic's do not."""
    details = raw.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    prompt = _count(raw.get("prompt_tokens"))
    return {
        "input_tokens": max(prompt - cached, 0),
        "output_tokens": _count(raw.get("completion_tokens")),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def response(body: dict[str, Any], *, requested_model: str) -> dict[str, Any]:
    """OpenAI chat.completion → Anthropic message, as if ``requested_model`` had answered."""
    choices = body.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        content.append({"type": "text", "text": refusal})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": _arguments(function.get("arguments")),
            }
        )
    reason = "refusal" if refusal else stop_reason(choice.get("finish_reason"))
    return {
        "id": message_id(str(body.get("id", ""))),
        "type": "message",
        "role": "assistant",
        "model": requested_model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": None,
        "usage": usage(body.get("usage") or {}),
    }


def _arguments(raw: Any) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # Anthropic's tool_use input is an object by contract; a client could not use anything else.
        raise TranslationError("the provider returned tool-call arguments that are not valid JSON") from exc
    if not isinstance(value, dict):
        raise TranslationError("the provider returned tool-call arguments that are not a JSON object")
    return value


def _anthropic_error(err_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": err_type, "message": message}}


def error(status: int, body: bytes) -> bytes:
    """OpenAI error body → Anthropic error body (the status is passed through by the caller)."""
    message: str | None = None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    inner = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(inner, dict) and isinstance(inner.get("message"), str):
        message = inner["message"]
    elif isinstance(inner, str):
        message = inner
    err_type = _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps(_anthropic_error(err_type, message or f"Upstream provider error (HTTP {status})"))


# ---------------------------------------------------------------------------------------------------
# streaming


class StreamTranslator:
    """OpenAI chat.completion.chunk SSE → Anthropic Messages SSE, one event at a time.

    Content blocks open and close as OpenAI switches between text and tool calls. ``finish_reason``
    closes the open block at once, but ``message_delta`` waits for ``[DONE]``: OpenAI's usage chunk
    comes after the finish chunk, and the Anthropic client reads final usage from ``message_delta``.
    """

    def __init__(self, *, requested_model: str) -> None:
        self._model = requested_model
        self._parser = SseParser()
        self._started = False
        self._open: int | None = None  # Anthropic index of the open content block
        self._open_kind: str | None = None  # "text" or "tool"
        self._blocks = 0
        self._tools: dict[int, int] = {}  # OpenAI tool_calls index → Anthropic block index
        self._id = "msg_"
        self._finish: str | None = None
        self._refused = False
        self._usage: dict[str, Any] = {}
        self._ended = False

    @property
    def complete(self) -> bool:
        """True once the stream ended cleanly or with an error event the client has already seen."""
        return self._ended

    def feed(self, chunk: bytes) -> bytes:
        if self._ended:
            return b""
        out: list[bytes] = []
        for event in self._parser.feed(chunk):
            out.extend(self._event(event.data))
            if self._ended:
                break
        return b"".join(out)

    def finish(self) -> bytes:
        if self._ended:
            return b""
        self._ended = True
        return named_event("error", _anthropic_error("api_error", _CUT_MESSAGE))

    def _event(self, data: bytes) -> Iterable[bytes]:
        if data == b"[DONE]":
            return self._done()
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._ended = True
            return [named_event("error", _anthropic_error("api_error", "The upstream provider sent unreadable data."))]
        if not isinstance(payload, dict):
            return ()
        if payload.get("error") is not None:
            self._ended = True
            inner = payload["error"]
            message = inner.get("message") if isinstance(inner, dict) else None
            return [named_event("error", _anthropic_error("api_error", message or "The upstream provider failed."))]
        out: list[bytes] = []
        if not self._started:
            out.append(self._start(payload))
        if isinstance(payload.get("usage"), dict):
            self._usage = payload["usage"]
        for choice in payload.get("choices") or ():
            if choice.get("index", 0) == 0:  # n > 1 is refused on the way in
                out.extend(self._choice(choice))
        return out

    def _start(self, payload: dict[str, Any]) -> bytes:
        self._started = True
        if isinstance(payload.get("id"), str):
            self._id = message_id(payload["id"])
        message = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return named_event("message_start", {"type": "message_start", "message": message})

    def _choice(self, choice: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        delta = choice.get("delta") or {}
        for key in ("content", "refusal"):
            text = delta.get(key)
            if isinstance(text, str) and text:
                self._refused |= key == "refusal"
                if self._open_kind != "text":
                    out.extend(self._open_block("text", {"type": "text", "text": ""}))
                out.append(self._delta({"type": "text_delta", "text": text}))
        for call in delta.get("tool_calls") or ():
            out.extend(self._tool_delta(call))
        if choice.get("finish_reason") is not None:
            self._finish = choice["finish_reason"]
            out.extend(self._close_block())
        return out

    def _tool_delta(self, call: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        position = call.get("index", 0)
        function = call.get("function") or {}
        block = self._tools.get(position)
        if block is None:
            tool_id = call.get("id") or f"toolu_{self._id.removeprefix('msg_')}_{position}"
            start = {"type": "tool_use", "id": tool_id, "name": function.get("name") or "", "input": {}}
            out.extend(self._open_block("tool", start))
            block = self._tools[position] = self._blocks - 1
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            # OpenAI sends each call's argument fragments in order; should a provider interleave calls,
            # the fragments still land on the right block because the SDK accumulates by index.
            out.append(self._delta({"type": "input_json_delta", "partial_json": arguments}, block))
        return out

    def _open_block(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        out = self._close_block()
        self._open, self._open_kind = self._blocks, kind
        self._blocks += 1
        out.append(
            named_event(
                "content_block_start", {"type": "content_block_start", "index": self._open, "content_block": block}
            )
        )
        return out

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        index, self._open, self._open_kind = self._open, None, None
        return [named_event("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _delta(self, delta: dict[str, Any], index: int | None = None) -> bytes:
        payload = {"type": "content_block_delta", "index": self._open if index is None else index, "delta": delta}
        return named_event("content_block_delta", payload)

    def _done(self) -> list[bytes]:
        self._ended = True
        out: list[bytes] = []
        if not self._started:
            out.append(self._start({}))
        out.extend(self._close_block())
        reason = "refusal" if self._refused else stop_reason(self._finish)
        message_delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": None},
            "usage": usage(self._usage),
        }
        out.append(named_event("message_delta", message_delta))
        out.append(named_event("message_stop", {"type": "message_stop"}))
        return out
