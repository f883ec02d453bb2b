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
from extproc.translate._anthropic import untranslatable_body, untranslatable_event
from extproc.translate.sse import SseEvent

__all__ = ["StreamTranslator", "error", "request", "response", "untranslatable_body", "untranslatable_event"]

_MAX_STOP: Final = 4  # OpenAI's limit; more would be a 400 from the provider with a less useful message

_DROPPED: Final = frozenset(("top_k", "service_tier"))
_KNOWN: Final = _anthropic.REQUEST_FIELDS | {"stream"} | _DROPPED

_STOP_REASONS: Final = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

# HTTP status → Anthropic error type; OpenAI's own error types are too coarse to tell these apart.
_ERROR_TYPES: Final = _anthropic.HTTP_ERROR_TYPES | {402: "billing_error", 529: "overloaded_error"}

_CUT_MESSAGE: Final = _anthropic.CUT_MESSAGE
_UNTRANSLATABLE_MESSAGE: Final = _anthropic.UNTRANSLATABLE_ANTHROPIC


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
    raw = _anthropic.turns(body.get("messages"), prefill_by="the OpenAI Chat API")
    for index, message in enumerate(raw):
        messages.extend(_turn_messages(message, index))
    return messages


def _turn_messages(message: Any, index: int) -> list[dict[str, Any]]:
    """One Anthropic turn → its chat messages (a user turn with tool results becomes several)."""
    role, content = _anthropic.turn(message, index)
    if role == "user":
        return _user_messages(content, index)
    return [_assistant_message(content, index)]


def _sampling_fields(body: dict[str, Any]) -> dict[str, Any]:
    """``max_tokens`` → ``max_completion_tokens``; ``temperature`` and ``top_p`` as they are."""
    return _anthropic.sampling_config(body, "max_completion_tokens", "top_p")


def _stop_fields(body: dict[str, Any]) -> dict[str, Any]:
    """``stop_sequences`` → ``stop``, refused past OpenAI's limit rather than cut short."""
    stop = _anthropic.stop_sequences(body.get("stop_sequences"), _MAX_STOP, "OpenAI")
    return {"stop": stop} if stop else {}


def _stream_fields(body: dict[str, Any]) -> dict[str, Any]:
    """``stream``, asking for the usage chunk so the stream can report usage back."""
    if _fields.optional_bool(body, "stream"):
        return {"stream": True, "stream_options": {"include_usage": True}}
    return {}


def _user_fields(body: dict[str, Any]) -> dict[str, Any]:
    """``metadata.user_id`` → ``user``; the rest of ``metadata`` has no OpenAI counterpart."""
    metadata = body.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise _fields.wrong("metadata", "an object")
    user = _fields.optional_str(metadata, "user_id", "metadata")
    return {} if user is None else {"user": user}


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
    _fields.only(body, _KNOWN, "", "cannot be translated to the OpenAI Chat Completions API")
    thinking = body.get("thinking")
    if thinking is not None and _fields.typed(thinking, "thinking")[1] != "disabled":
        raise TranslationError("extended 'thinking' cannot be served by the OpenAI Chat Completions API")


def _system_content(system: Any) -> str | list[dict[str, Any]]:
    if isinstance(system, str):
        return system
    return _text_parts(_anthropic.system_texts(system))


def _text_parts(texts: list[str]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text} for text in texts]


def _user_messages(content: Any, index: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    where = f"messages.{index}.content"
    if not isinstance(content, list):
        raise TranslationError(f"'{where}' must be a string or an array")
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for position in range(len(content)):
        block, kind = _anthropic.block(content, position, where)
        at = f"{where}.{position}"
        if kind == "tool_result":
            results.append(_tool_message(block, at))
        elif kind == "text":
            parts.append({"type": "text", "text": _fields.string(block, "text", at)})
        elif kind == "image":
            parts.append(_image_part(block, at, index))
        elif kind == "document":
            parts.append(_file_part(block, at, index))
        else:
            raise TranslationError(f"'{where}' block type {_fields.shown(kind)} cannot be translated")
    if parts:
        results.append({"role": "user", "content": parts})
    return results


def _image_part(block: dict[str, Any], at: str, index: int) -> dict[str, Any]:
    source = _anthropic.source(block, at)
    kind = source.get("type")
    if kind == "base64":
        media_type = _fields.string(source, "media_type", f"{at}.source")
        url = f"data:{media_type};base64,{_fields.string(source, 'data', f'{at}.source')}"
    elif kind == "url":
        url = _fields.string(source, "url", f"{at}.source")
    else:
        shown = _fields.shown(kind) if isinstance(kind, str) else "without a type"
        raise TranslationError(f"'messages.{index}' image source {shown} cannot be translated")
    return {"type": "image_url", "image_url": {"url": url}}


def _file_part(block: dict[str, Any], at: str, index: int) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") != "base64" or source.get("media_type") != "application/pdf":
        raise TranslationError(f"'messages.{index}' only base64 PDF documents can be translated")
    data = _fields.string(source, "data", f"{at}.source")
    file: dict[str, Any] = {"file_data": f"data:application/pdf;base64,{data}"}
    title = _fields.optional_str(block, "title", at)
    if title is not None:
        file["filename"] = title
    return {"type": "file", "file": file}


def _tool_message(block: dict[str, Any], at: str) -> dict[str, Any]:
    call_id = _fields.string(block, "tool_use_id", at)
    content = block.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        content = _text_parts(_anthropic.texts(content, f"{at}.content"))
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
        block, kind = _anthropic.block(content, position, where)
        at = f"{where}.{position}"
        if kind == "text":
            texts.append({"type": "text", "text": _fields.string(block, "text", at)})
        elif kind == "tool_use":
            call_id, name = _fields.string(block, "id", at), _fields.string(block, "name", at)
            arguments = _fields.writable(_anthropic.tool_use_input(block, at), f"{at}.input")
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
    tool = _anthropic.client_tool(tool, where, "cannot be translated")
    name, description, schema = _anthropic.tool_definition(tool, where)
    function: dict[str, Any] = {"name": name}
    if description is not None:
        function["description"] = description
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
    disable = _fields.optional_bool(choice, "disable_parallel_tool_use", "tool_choice")
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
    output = _fields.count(raw.get("completion_tokens"))
    return _anthropic.cached_usage(_fields.count(raw.get("prompt_tokens")), cached, output)


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
    answer_id = message_id(completion_id if isinstance(completion_id, str) else "")
    return _anthropic.message_object(answer_id, requested_model, content, reason, usage(body.get("usage")))


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


def error(status: int, body: bytes) -> bytes:
    """OpenAI error body → Anthropic error body (the status is passed through by the caller).

    Never raises: a body that is not OpenAI's error shape gives a message naming the HTTP status.
    """
    err_type = _anthropic.status_error_type(status, _ERROR_TYPES)
    return _anthropic.provider_error(status, body, err_type, _body_message)


def _body_message(parsed: Any) -> str | None:
    return _error_message(parsed.get("error") if isinstance(parsed, dict) else None)


def _error_message(inner: Any) -> str | None:
    """The message of OpenAI's error object (or of a bare error string some compatible servers send)."""
    if isinstance(inner, dict):
        message = inner.get("message")
        return message if isinstance(message, str) else None
    return inner if isinstance(inner, str) else None


# ---------------------------------------------------------------------------------------------------
# streaming


class StreamTranslator(_anthropic.AnthropicStream):
    """OpenAI chat.completion.chunk SSE → Anthropic Messages SSE, one event at a time.

    Content blocks open and close as OpenAI switches between text and tool calls. ``finish_reason``
    closes the open block at once, but ``message_delta`` waits for ``[DONE]``: OpenAI's usage chunk
    comes after the finish chunk, and the Anthropic client reads final usage from ``message_delta``.

    A chunk that cannot be translated (not JSON, not an object, fields of the wrong shape) ends the
    stream with an ``error`` event after the events already sent, and ``failure`` says why.
    """

    def __init__(self, *, requested_model: str) -> None:
        super().__init__(requested_model=requested_model)  # the open block's kind is "text" or "tool"
        self._tools: dict[int, int] = {}  # OpenAI tool_calls index → Anthropic block index
        self._id = "msg_"
        self._finish: str | None = None
        self._refused = False
        self._usage: dict[str, Any] = {}

    def finish(self) -> bytes:
        if self._ended:
            return b""
        self._ended = True
        return _anthropic.error_event("api_error", _CUT_MESSAGE)

    def _event(self, event: SseEvent) -> Iterable[bytes]:  # OpenAI's events have no name
        if event.data == b"[DONE]":
            return self._done()
        payload = _anthropic.chunk_payload(event)
        if payload.get("error") is not None:
            # The provider's own error, passed on as such (not a translation failure), whatever its shape.
            self._ended = True
            message = _error_message(payload["error"]) or "The upstream provider failed."
            return [_anthropic.error_event("api_error", message)]
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
        return _anthropic.message_start_event(self._id, self._model, {"input_tokens": 0, "output_tokens": 0})

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

    def _done(self) -> list[bytes]:
        self._ended = True
        out: list[bytes] = []
        if not self._started:
            out.append(self._start({}))
        out.extend(self._close_block())
        reason = "refusal" if self._refused else stop_reason(self._finish)
        out.extend(_anthropic.message_end_events(reason, usage(self._usage)))
        return out
