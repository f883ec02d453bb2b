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

Every request field read is type-checked (see ``_fields``): a wrong type raises
:class:`TranslationError` naming the field (``'messages.0.content.1.text' must be a string``). An
OpenAI answer of the wrong shape is never passed on half-translated: ``response`` raises
:class:`TranslationError` for content it cannot read (ids, finish reasons and usage of the wrong type
are defaulted instead), and the stream translator ends the stream with an ``error`` event at the first
chunk it cannot read, keeping what it already sent; ``error`` never raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import orjson

from extproc.translate import TranslationError, _anthropic, _fields
from extproc.translate.sse import SseEvent, SseParser, named_event

__all__ = ["StreamTranslator", "error", "request", "response", "untranslatable_body", "untranslatable_event"]

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

_CUT_MESSAGE: Final = _anthropic.CUT_MESSAGE
_UNTRANSLATABLE_MESSAGE: Final = _anthropic.untranslatable_message("Anthropic Messages")


# ---------------------------------------------------------------------------------------------------
# request


def request(body: dict[str, Any], *, model: str) -> dict[str, Any]:
    """Anthropic Messages request → OpenAI chat request for ``model``.

    Every field read is type-checked; a wrong type raises :class:`TranslationError` naming the field
    (with Anthropic's dotted paths: ``messages.0.content``).
    """
    if not isinstance(body, dict):
        raise TranslationError("the request body must be a JSON object")
    _refuse_unsupported(body)
    out: dict[str, Any] = {"model": model, "messages": _messages(body)}
    # In this order, so a request with several problems reports the same one first, and the fields
    # come out in a stable order.
    for fields in (_sampling_fields, _stop_fields, _stream_fields, _user_fields, _tool_fields):
        out.update(fields(body))
    return out


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages: the system prompt (if any), then each turn in order."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        content = _system_content(system)
        if content:
            messages.append({"role": "system", "content": content})
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise TranslationError("'messages' must be a non-empty array")
    if isinstance(raw[-1], dict) and raw[-1].get("role") == "assistant":
        raise TranslationError("a final assistant turn (prefill) cannot be continued by the OpenAI Chat API")
    for index, message in enumerate(raw):
        messages.extend(_turn_messages(message, index))
    return messages


def _turn_messages(message: Any, index: int) -> list[dict[str, Any]]:
    """One Anthropic turn → its chat messages (a user turn with tool results becomes several)."""
    if not isinstance(message, dict):
        raise _fields.wrong(f"messages.{index}", "an object")
    role = message.get("role")
    if role == "user":
        return _user_messages(message.get("content"), index)
    if role == "assistant":
        return [_assistant_message(message.get("content"), index)]
    if isinstance(role, str):
        raise TranslationError(f"'messages.{index}.role' {_fields.shown(role)} cannot be translated")
    raise _fields.wrong(f"messages.{index}.role", "a string")


def _sampling_fields(body: dict[str, Any]) -> dict[str, Any]:
    """``max_tokens`` → ``max_completion_tokens``; ``temperature`` and ``top_p`` as they are."""
    out: dict[str, Any] = {}
    max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        out["max_completion_tokens"] = _fields.max_tokens(max_tokens, "max_tokens")
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None:
            if not _fields.is_number(value):
                raise _fields.wrong(key, "a number")
            out[key] = value
    return out


def _stop_fields(body: dict[str, Any]) -> dict[str, Any]:
    """``stop_sequences`` → ``stop``, refused past OpenAI's limit rather than cut short."""
    stop = body.get("stop_sequences")
    if stop is None:
        return {}
    if not isinstance(stop, list) or not all(isinstance(item, str) for item in stop):
        raise _fields.wrong("stop_sequences", "an array of strings")
    if len(stop) > _MAX_STOP:
        raise TranslationError(f"OpenAI accepts at most {_MAX_STOP} stop sequences")
    return {"stop": list(stop)} if stop else {}


def _stream_fields(body: dict[str, Any]) -> dict[str, Any]:
    """``stream``, asking for the usage chunk so the stream can report usage back."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _fields.wrong("stream", "a boolean")
    if stream:
        return {"stream": True, "stream_options": {"include_usage": True}}
    return {}


def _user_fields(body: dict[str, Any]) -> dict[str, Any]:
    """``metadata.user_id`` → ``user``; the rest of ``metadata`` has no OpenAI counterpart."""
    metadata = body.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise _fields.wrong("metadata", "an object")
    user = metadata.get("user_id")
    if user is None:
        return {}
    if not isinstance(user, str):
        raise _fields.wrong("metadata.user_id", "a string")
    return {"user": user}


def _tool_fields(body: dict[str, Any]) -> dict[str, Any]:
    """``tools`` and ``tool_choice`` (which needs to know whether there are tools)."""
    out: dict[str, Any] = {}
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _fields.wrong("tools", "an array")
        if tools:
            out["tools"] = [_tool(tool, index) for index, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice is not None:
        out.update(_tool_choice(choice, bool(tools)))
    return out


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for key, value in body.items():
        if value is None or key in _DROPPED:
            continue
        if key not in _HANDLED:
            raise TranslationError(f"{_fields.shown(key)} cannot be translated to the OpenAI Chat Completions API")
    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict):
            raise _fields.wrong("thinking", "an object")
        if not isinstance(thinking.get("type"), str):
            raise _fields.wrong("thinking.type", "a string")
        if thinking["type"] != "disabled":
            raise TranslationError("extended 'thinking' cannot be served by the OpenAI Chat Completions API")


def _system_content(system: Any) -> str | list[dict[str, Any]]:
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return [_text_part(system, position, "system") for position in range(len(system))]
    raise TranslationError("'system' must be a string or an array of text blocks")


def _block(content: list[Any], position: int, where: str) -> tuple[dict[str, Any], str]:
    """A content block and its type, both checked."""
    block = content[position]
    if not isinstance(block, dict):
        raise _fields.wrong(f"{where}.{position}", "an object")
    kind = block.get("type")
    if not isinstance(kind, str):
        raise _fields.wrong(f"{where}.{position}.type", "a string")
    return block, kind


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise _fields.wrong(f"{where}.text", "a string")
    return text


def _text_part(blocks: list[Any], position: int, where: str) -> dict[str, Any]:
    block, kind = _block(blocks, position, where)
    if kind != "text":
        raise TranslationError(f"'{where}' may only hold text blocks")
    return {"type": "text", "text": _text(block, f"{where}.{position}")}


def _user_messages(content: Any, index: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    where = f"messages.{index}.content"
    if not isinstance(content, list):
        raise TranslationError(f"'{where}' must be a string or an array")
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for position in range(len(content)):
        block, kind = _block(content, position, where)
        at = f"{where}.{position}"
        if kind == "tool_result":
            results.append(_tool_message(block, at))
        elif kind == "text":
            parts.append({"type": "text", "text": _text(block, at)})
        elif kind == "image":
            parts.append(_image_part(block.get("source"), at, index))
        elif kind == "document":
            parts.append(_file_part(block, at, index))
        else:
            raise TranslationError(f"'{where}' block type {_fields.shown(kind)} cannot be translated")
    if parts:
        results.append({"role": "user", "content": parts})
    return results


def _source_str(source: dict[str, Any], key: str, at: str) -> str:
    value = source.get(key)
    if not isinstance(value, str):
        raise _fields.wrong(f"{at}.source.{key}", "a string")
    return value


def _image_part(source: Any, at: str, index: int) -> dict[str, Any]:
    if not isinstance(source, dict):
        raise _fields.wrong(f"{at}.source", "an object")
    kind = source.get("type")
    if kind == "base64":
        media_type = _source_str(source, "media_type", at)
        url = f"data:{media_type};base64,{_source_str(source, 'data', at)}"
    elif kind == "url":
        url = _source_str(source, "url", at)
    else:
        shown = _fields.shown(kind) if isinstance(kind, str) else "without a type"
        raise TranslationError(f"'messages.{index}' image source {shown} cannot be translated")
    return {"type": "image_url", "image_url": {"url": url}}


def _file_part(block: dict[str, Any], at: str, index: int) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") != "base64" or source.get("media_type") != "application/pdf":
        raise TranslationError(f"'messages.{index}' only base64 PDF documents can be translated")
    file: dict[str, Any] = {"file_data": f"data:application/pdf;base64,{_source_str(source, 'data', at)}"}
    title = block.get("title")
    if title is not None:
        if not isinstance(title, str):
            raise _fields.wrong(f"{at}.title", "a string")
        file["filename"] = title
    return {"type": "file", "file": file}


def _tool_message(block: dict[str, Any], at: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise _fields.wrong(f"{at}.tool_use_id", "a string")
    content = block.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        content = [_text_part(content, position, f"{at}.content") for position in range(len(content))]
    elif not isinstance(content, str):
        raise _fields.wrong(f"{at}.content", "a string or an array of text blocks")
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def _assistant_message(content: Any, index: int) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    where = f"messages.{index}.content"
    if not isinstance(content, list):
        raise TranslationError(f"'{where}' must be a string or an array")
    texts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for position in range(len(content)):
        block, kind = _block(content, position, where)
        at = f"{where}.{position}"
        if kind == "text":
            texts.append({"type": "text", "text": _text(block, at)})
        elif kind == "tool_use":
            call_id, name, tool_input = block.get("id"), block.get("name"), block.get("input")
            if not isinstance(call_id, str):
                raise _fields.wrong(f"{at}.id", "a string")
            if not isinstance(name, str):
                raise _fields.wrong(f"{at}.name", "a string")
            if tool_input is None:
                tool_input = {}
            elif not isinstance(tool_input, dict):
                raise _fields.wrong(f"{at}.input", "an object")
            arguments = _fields.writable(tool_input, f"{at}.input")
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise TranslationError(f"'{where}' block type {_fields.shown(kind)} cannot be translated")
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


def _tool(tool: Any, index: int) -> dict[str, Any]:
    where = f"tools.{index}"
    if not isinstance(tool, dict):
        raise _fields.wrong(where, "an object")
    kind = tool.get("type")
    if kind is not None and not isinstance(kind, str):
        raise _fields.wrong(f"{where}.type", "a string")
    if kind not in (None, "custom") or "input_schema" not in tool:
        shown = _fields.shown(kind) if kind is not None else _fields.shown(str(tool.get("name")))
        raise TranslationError(f"tool {shown} is an Anthropic server tool and cannot be translated")
    name = tool.get("name")
    if not isinstance(name, str):
        raise _fields.wrong(f"{where}.name", "a string")
    function: dict[str, Any] = {"name": name}
    description = tool.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise _fields.wrong(f"{where}.description", "a string")
        function["description"] = description
    schema = tool["input_schema"]
    if not isinstance(schema, dict):
        raise _fields.wrong(f"{where}.input_schema", "an object")
    _fields.writable(schema, f"{where}.input_schema")
    function["parameters"] = schema
    return {"type": "function", "function": function}


def _tool_choice(choice: Any, has_tools: bool) -> dict[str, Any]:
    if not isinstance(choice, dict):
        raise _fields.wrong("tool_choice", "an object")
    kind = choice.get("type")
    out: dict[str, Any]
    if kind == "auto":
        out = {"tool_choice": "auto"}
    elif kind == "none":
        out = {"tool_choice": "none"}
    elif kind == "any":
        out = {"tool_choice": "required"}
    elif kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise _fields.wrong("tool_choice.name", "a string")
        out = {"tool_choice": {"type": "function", "function": {"name": name}}}
    elif isinstance(kind, str):
        raise TranslationError(f"'tool_choice' type {_fields.shown(kind)} cannot be translated")
    else:
        raise _fields.wrong("tool_choice.type", "a string")
    disable = choice.get("disable_parallel_tool_use")
    if disable is not None and not isinstance(disable, bool):
        raise _fields.wrong("tool_choice.disable_parallel_tool_use", "a boolean")
    # OpenAI rejects parallel_tool_calls without tools.
    if disable and has_tools:
        out["parallel_tool_calls"] = False
    return out


# ---------------------------------------------------------------------------------------------------
# response and error


def message_id(completion_id: str) -> str:
    """``chatcmpl-X`` → ``msg_X``: deterministic, and inverted by openai_to_anthropic.completion_id."""
    return "msg_" + completion_id.removeprefix("chatcmpl-")


def stop_reason(finish_reason: Any) -> str:
    if not isinstance(finish_reason, str):
        finish_reason = "stop"
    return _STOP_REASONS.get(finish_reason, "end_turn")


def usage(raw: Any) -> dict[str, Any]:
    """OpenAI usage → Anthropic usage; OpenAI's prompt_tokens include the cached ones, Anthropic's do not."""
    if not isinstance(raw, dict):
        raw = {}
    details = raw.get("prompt_tokens_details")
    cached = _fields.count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    prompt = _fields.count(raw.get("prompt_tokens"))
    return {
        "input_tokens": max(prompt - cached, 0),
        "output_tokens": _fields.count(raw.get("completion_tokens")),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def response(body: Any, *, requested_model: str) -> dict[str, Any]:
    """OpenAI chat.completion → Anthropic message, as if ``requested_model`` had answered.

    Content of the wrong shape raises :class:`TranslationError` (the answer cannot be passed on);
    an id, finish reason or usage of the wrong type is defaulted, as it does not change the answer.
    """
    if not isinstance(body, dict):
        raise TranslationError("the answer is not a JSON object")
    choice = _first_choice(body)
    message = _choice_message(choice)
    text, refusal = _message_str(message, "content"), _message_str(message, "refusal")
    content: list[dict[str, Any]] = [{"type": "text", "text": part} for part in (text, refusal) if part]
    content += _tool_uses(message)
    reason = "refusal" if refusal else stop_reason(choice.get("finish_reason"))
    completion_id = body.get("id")
    return {
        "id": message_id(completion_id if isinstance(completion_id, str) else ""),
        "type": "message",
        "role": "assistant",
        "model": requested_model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": None,
        "usage": usage(body.get("usage")),
    }


def _first_choice(body: dict[str, Any]) -> dict[str, Any]:
    """The answer's first choice; none at all reads as an empty answer."""
    choices = body.get("choices")
    if choices is None or choices == []:
        return {}
    if not isinstance(choices, list):
        raise TranslationError("'choices' is not an array")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise TranslationError("'choices.0' is not an object")
    return choice


def _choice_message(choice: dict[str, Any]) -> dict[str, Any]:
    message = choice.get("message")
    if message is None:
        return {}
    if not isinstance(message, dict):
        raise TranslationError("'choices.0.message' is not an object")
    return message


def _tool_uses(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The message's ``tool_calls`` → ``tool_use`` blocks, in order."""
    calls = message.get("tool_calls")
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise TranslationError("'choices.0.message.tool_calls' is not an array")
    return [_tool_use(call, f"choices.0.message.tool_calls.{position}") for position, call in enumerate(calls)]


def _tool_use(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise TranslationError(f"'{where}' is not an object with a function")
    call_id, name = call.get("id"), function.get("name")
    if not isinstance(call_id, str) or not isinstance(name, str):
        raise TranslationError(f"'{where}' has no string id and name")
    tool_input = _arguments(function.get("arguments"))
    return {"type": "tool_use", "id": call_id, "name": name, "input": tool_input}


def _message_str(message: dict[str, Any], key: str) -> str | None:
    value = message.get(key)
    if value is not None and not isinstance(value, str):
        raise TranslationError(f"'choices.0.message.{key}' is not a string")
    return value


def _arguments(raw: Any) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if not isinstance(raw, str):
        raise TranslationError("the provider returned tool-call arguments that are not a string")
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


_UNTRANSLATABLE: Final = _anthropic_error("api_error", _UNTRANSLATABLE_MESSAGE)


def untranslatable_body() -> bytes:
    """The Anthropic error body that replaces a provider answer this module could not translate."""
    return orjson.dumps(_UNTRANSLATABLE)


def untranslatable_event() -> bytes:
    """The Anthropic stream's last event when the provider's stream could not be translated further."""
    return named_event("error", _UNTRANSLATABLE)


def error(status: int, body: bytes) -> bytes:
    """OpenAI error body → Anthropic error body (the status is passed through by the caller).

    Never raises: a body that is not OpenAI's error shape gives a message naming the HTTP status.
    """
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    message = _error_message(parsed.get("error") if isinstance(parsed, dict) else None)
    err_type = _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps(_anthropic_error(err_type, message or f"Upstream provider error (HTTP {status})"))


def _error_message(inner: Any) -> str | None:
    """The message of OpenAI's error object (or of a bare error string some compatible servers send)."""
    if isinstance(inner, dict):
        message = inner.get("message")
        return message if isinstance(message, str) else None
    return inner if isinstance(inner, str) else None


# ---------------------------------------------------------------------------------------------------
# streaming


class StreamTranslator(_anthropic.EventStream):
    """OpenAI chat.completion.chunk SSE → Anthropic Messages SSE, one event at a time.

    Content blocks open and close as OpenAI switches between text and tool calls. ``finish_reason``
    closes the open block at once, but ``message_delta`` waits for ``[DONE]``: OpenAI's usage chunk
    comes after the finish chunk, and the Anthropic client reads final usage from ``message_delta``.

    A chunk that cannot be translated (not JSON, not an object, fields of the wrong shape) ends the
    stream with an ``error`` event after the events already sent, and ``failure`` says why.
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
        self.failure: str | None = None  # why the stream could not be translated, if it could not

    def finish(self) -> bytes:
        if self._ended:
            return b""
        self._ended = True
        return named_event("error", _anthropic_error("api_error", _CUT_MESSAGE))

    def _untranslatable(self) -> bytes:
        self._ended = True
        return untranslatable_event()

    def _event(self, event: SseEvent) -> Iterable[bytes]:  # OpenAI's events have no name
        if event.data == b"[DONE]":
            return self._done()
        try:
            payload = event.json()
        except orjson.JSONDecodeError:
            raise TranslationError("a chunk is not JSON") from None
        if not isinstance(payload, dict):
            raise TranslationError("a chunk is not a JSON object")
        if payload.get("error") is not None:
            # The provider's own error, passed on as such (not a translation failure), whatever its shape.
            self._ended = True
            message = _error_message(payload["error"]) or "The upstream provider failed."
            return [named_event("error", _anthropic_error("api_error", message))]
        choices = payload.get("choices")
        if choices is None:
            choices = ()
        elif not isinstance(choices, list):
            raise TranslationError("a chunk's 'choices' is not an array")
        out: list[bytes] = []
        if not self._started:
            out.append(self._start(payload))
        if isinstance(payload.get("usage"), dict):
            self._usage = payload["usage"]
        for choice in choices:
            if not isinstance(choice, dict):
                raise TranslationError("a chunk's choice is not an object")
            if choice.get("index", 0) == 0:  # n > 1 is refused on the way in
                out.extend(self._choice(choice))
        return out

    def _start(self, payload: dict[str, Any]) -> bytes:
        self._started = True
        if isinstance(payload.get("id"), str):
            self._id = message_id(payload["id"])
        message: dict[str, Any] = {
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
        delta = choice.get("delta")
        if delta is None:
            delta = {}
        elif not isinstance(delta, dict):
            raise TranslationError("a chunk's 'delta' is not an object")
        for key in ("content", "refusal"):
            text = delta.get(key)
            if text is not None and not isinstance(text, str):
                raise TranslationError(f"a chunk's delta {key!r} is not a string")
            if text:
                self._refused |= key == "refusal"
                if self._open_kind != "text":
                    out.extend(self._open_block("text", {"type": "text", "text": ""}))
                out.append(self._delta({"type": "text_delta", "text": text}))
        calls = delta.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise TranslationError("a chunk's 'tool_calls' is not an array")
            for call in calls:
                out.extend(self._tool_delta(call))
        if choice.get("finish_reason") is not None:
            # Anything but a string (which no provider sends) reads as an ordinary stop.
            self._finish = choice["finish_reason"] if isinstance(choice["finish_reason"], str) else "stop"
            out.extend(self._close_block())
        return out

    def _tool_delta(self, call: Any) -> list[bytes]:
        if not isinstance(call, dict):
            raise TranslationError("a tool call is not an object")
        out: list[bytes] = []
        position = call.get("index", 0)
        function = call.get("function")
        if function is None:
            function = {}
        if type(position) is not int or not isinstance(function, dict):
            raise TranslationError("a tool call's 'index' is not an integer or its 'function' not an object")
        tool_id, name, arguments = call.get("id"), function.get("name"), function.get("arguments")
        if (
            (tool_id is not None and not isinstance(tool_id, str))
            or (name is not None and not isinstance(name, str))
            or (arguments is not None and not isinstance(arguments, str))
        ):
            raise TranslationError("a tool call's id, name or arguments is not a string")
        block = self._tools.get(position)
        if block is None:
            tool_id = tool_id or f"toolu_{self._id.removeprefix('msg_')}_{position}"
            start = {"type": "tool_use", "id": tool_id, "name": name or "", "input": {}}
            out.extend(self._open_block("tool", start))
            block = self._tools[position] = self._blocks - 1
        if arguments:
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
