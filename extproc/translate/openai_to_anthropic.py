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

Every request field read is type-checked (see ``_fields``): a wrong type raises
:class:`TranslationError` naming the field (``'messages[2].content[0].text' must be a string``).
An Anthropic answer of the wrong shape is never passed on half-translated: ``response`` raises
:class:`TranslationError` for content it cannot read (ids, stop reasons and usage of the wrong type
are defaulted instead, as they do not change the answer), and the stream translator ends the stream
with an error chunk of code ``provider_response_untranslatable`` at the first event it cannot read,
keeping what it already sent; ``error`` never raises.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Final

import orjson

from extproc.translate import TranslationError, _anthropic, _fields
from extproc.translate.sse import SseEvent, SseParser, data_event

__all__ = ["StreamTranslator", "error", "request", "response", "untranslatable_body", "untranslatable_event"]

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

_KNOWN: Final = _HANDLED | _DROPPED

_FINISH_REASONS: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_CUT_MESSAGE: Final = _anthropic.CUT_MESSAGE
_UNTRANSLATABLE_MESSAGE: Final = _anthropic.untranslatable_message("OpenAI Chat Completions")


# ---------------------------------------------------------------------------------------------------
# request


def request(body: dict[str, Any], *, model: str, default_max_tokens: int = 4096) -> dict[str, Any]:
    """OpenAI chat request → Anthropic Messages request for ``model``.

    Every field read is type-checked; a wrong type raises :class:`TranslationError` naming the field.
    """
    if not isinstance(body, dict):
        raise TranslationError("the request body must be a JSON object")
    _refuse_unsupported(body)
    system, messages = _messages(body.get("messages"))
    out: dict[str, Any] = {"model": model}
    if system is not None:
        out["system"] = system
    out["messages"] = messages

    max_tokens = default_max_tokens
    for key in ("max_tokens", "max_completion_tokens"):  # the newer name wins when both are given
        value = body.get(key)
        if value is not None:
            max_tokens = _fields.max_tokens(value, key)
    out["max_tokens"] = max_tokens

    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stops = [stop] if stop else []
        elif isinstance(stop, list) and all(isinstance(item, str) for item in stop):
            stops = list(stop)
        else:
            raise _fields.wrong("stop", "a string or an array of strings")
        if stops:
            out["stop_sequences"] = stops
    _anthropic.sampling(body, out)
    user = _fields.optional_str(body, "user") or _fields.optional_str(body, "safety_identifier")
    if user is not None:
        out["metadata"] = {"user_id": user}

    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _fields.wrong("tools", "an array")
        if tools:
            out["tools"] = [_tool(tool, index) for index, tool in enumerate(tools)]
    parallel = _fields.optional_bool(body, "parallel_tool_calls")
    choice = _tool_choice(body.get("tool_choice"), parallel, bool(tools))
    if choice is not None:
        out["tool_choice"] = choice
    return out


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Refuse a request Anthropic would answer differently from what the caller asked for."""
    # In this order, so a request with several problems always reports the same one first.
    for refuse in (_refuse_unknown, _refuse_n, _refuse_logprobs, _refuse_logit_bias, _refuse_response_format,
                   _refuse_modalities):
        refuse(body)


def _refuse_unknown(body: dict[str, Any]) -> None:
    _fields.only(body, _KNOWN, "", "cannot be translated to the Anthropic Messages API")


def _refuse_n(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is None:
        return
    if type(n) is not int:
        raise _fields.wrong("n", "an integer")
    if n != 1:
        raise TranslationError("'n' > 1 cannot be served by the Anthropic Messages API (one choice per call)")


def _refuse_logprobs(body: dict[str, Any]) -> None:
    if _fields.optional_bool(body, "logprobs") or body.get("top_logprobs") is not None:
        raise TranslationError("'logprobs' cannot be served by the Anthropic Messages API")


def _refuse_logit_bias(body: dict[str, Any]) -> None:
    logit_bias = body.get("logit_bias")
    if logit_bias is None:
        return
    if not isinstance(logit_bias, dict):
        raise _fields.wrong("logit_bias", "an object")
    if logit_bias:  # an empty bias changes nothing
        raise TranslationError("'logit_bias' cannot be served by the Anthropic Messages API")


def _refuse_response_format(body: dict[str, Any]) -> None:
    response_format = body.get("response_format")
    if response_format is None:
        return
    kind = _response_format_type(response_format)
    if kind != "text":
        raise TranslationError(
            f"'response_format' {_fields.shown(kind)} cannot be served by the Anthropic Messages API"
        )


def _response_format_type(response_format: Any) -> str:
    """The format's type: an object's ``type``, or a bare string as some clients send it."""
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if not isinstance(kind, str):
            raise _fields.wrong("response_format.type", "a string")
        return kind
    if isinstance(response_format, str):
        return response_format
    raise _fields.wrong("response_format", "an object")


def _refuse_modalities(body: dict[str, Any]) -> None:
    modalities = body.get("modalities")
    if modalities is None:
        return
    if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
        raise _fields.wrong("modalities", "an array of strings")
    if any(m != "text" for m in modalities):
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
        if not isinstance(message, dict):
            raise _fields.wrong(f"messages[{index}]", "an object")
        role = message.get("role")
        if role in ("system", "developer"):
            content = message.get("content")
            system_strings += isinstance(content, str)
            system.extend(_anthropic.text_blocks(content, f"messages[{index}]", ("text",), "text"))
        elif role == "user":
            _append(turns, "user", _user_content(message.get("content"), index))
        elif role == "assistant":
            _append(turns, "assistant", _assistant_blocks(message, index))
        elif role == "tool":
            _append(turns, "user", [_tool_result(message, index)])
        elif isinstance(role, str):
            raise TranslationError(f"'messages[{index}].role' {_fields.shown(role)} cannot be translated")
        else:
            raise _fields.wrong(f"messages[{index}].role", "a string")
    return _anthropic.system_prompt(system, system_strings), turns


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


def _user_content(content: Any, index: int) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    where = f"messages[{index}]"
    if not isinstance(content, list):
        raise TranslationError(f"'{where}.content' must be a string or an array")
    blocks: list[dict[str, Any]] = []
    for position in range(len(content)):
        part, kind = _anthropic.part(content, position, where)
        if kind == "text":
            blocks.append({"type": "text", "text": _fields.string(part, "text", f"{where}.content[{position}]")})
        elif kind == "image_url":
            image = part.get("image_url")
            # Officially {"url": ..., "detail": ...}; a bare URL string is accepted as well.
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise _fields.wrong(f"{where}.content[{position}].image_url.url", "a string")
            blocks.append(_image(url, index))
        elif kind == "file":
            file = part.get("file")
            if not isinstance(file, dict):
                raise _fields.wrong(f"{where}.content[{position}].file", "an object")
            blocks.append(_document(file, f"{where}.content[{position}].file", index))
        else:
            raise TranslationError(f"'{where}.content' part type {_fields.shown(kind)} cannot be translated")
    return blocks


_IMAGE_ERRORS: Final = _anthropic.ImageErrors(
    not_base64="'{where}' image data URL must be base64", not_url="'{where}' image url must be a data: or http(s) URL"
)


def _image(url: str, index: int) -> dict[str, Any]:
    return _anthropic.image(url, f"messages[{index}]", _IMAGE_ERRORS)


def _document(file: dict[str, Any], where: str, index: int) -> dict[str, Any]:
    # file_id refers to OpenAI's file store, which Anthropic cannot read.
    return _anthropic.document(file, where, f"'messages[{index}]' only inline PDF files can be translated")


def _assistant_blocks(message: dict[str, Any], index: int) -> list[dict[str, Any]]:
    """An assistant message → its text blocks, then a ``tool_use`` block per tool call."""
    where = f"messages[{index}]"
    if message.get("audio") is not None or message.get("function_call") is not None:
        raise TranslationError(f"'{where}' audio and legacy function_call cannot be translated")
    blocks = _assistant_text_blocks(message, where)
    calls = message.get("tool_calls")
    if calls is None:
        return blocks
    if not isinstance(calls, list):
        raise _fields.wrong(f"{where}.tool_calls", "an array")
    for position, call in enumerate(calls):
        blocks.append(_tool_use_block(call, f"{where}.tool_calls[{position}]", where))
    return blocks


def _assistant_text_blocks(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The text of an assistant message: its content, or its refusal when it has no content."""
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if isinstance(content, list):
        return [_assistant_text_block(content, position, where) for position in range(len(content))]
    if content is not None:
        raise TranslationError(f"'{where}.content' must be a string, an array or null")
    refusal = message.get("refusal")
    if isinstance(refusal, str):
        return [{"type": "text", "text": refusal}]
    if refusal is not None:
        raise _fields.wrong(f"{where}.refusal", "a string")
    return []


def _assistant_text_block(content: list[Any], position: int, where: str) -> dict[str, Any]:
    part, kind = _anthropic.part(content, position, where)
    if kind not in ("text", "refusal"):
        raise TranslationError(f"'{where}.content' part type {_fields.shown(kind)} cannot be translated")
    return {"type": "text", "text": _fields.string(part, kind, f"{where}.content[{position}]")}


def _tool_use_block(call: Any, at: str, where: str) -> dict[str, Any]:
    """One of an assistant message's ``tool_calls`` (at ``at``) → a ``tool_use`` block."""
    if not isinstance(call, dict):
        raise _fields.wrong(at, "an object")
    if call.get("type", "function") != "function":
        raise TranslationError(f"'{where}.tool_calls' only function calls can be translated")
    function = call.get("function")
    if not isinstance(function, dict):
        raise _fields.wrong(f"{at}.function", "an object")
    call_id, name = call.get("id"), function.get("name")
    if not isinstance(call_id, str):
        raise _fields.wrong(f"{at}.id", "a string")
    if not isinstance(name, str):
        raise _fields.wrong(f"{at}.function.name", "a string")
    arguments = _anthropic.arguments(function.get("arguments"), f"{at}.function.arguments")
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def _tool_result(message: dict[str, Any], index: int) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        raise _fields.wrong(f"messages[{index}].tool_call_id", "a string")
    content = message.get("content")
    # A string stays a string so the round trip is exact; text parts stay parts.
    if not isinstance(content, str):
        content = _anthropic.text_blocks(content, f"messages[{index}]", ("text",), "text")
    return {"type": "tool_result", "tool_use_id": call_id, "content": content}


def _tool(tool: Any, index: int) -> dict[str, Any]:
    where = f"tools[{index}]"
    function = _anthropic.function_object(tool, where, "tool").get("function")
    if not isinstance(function, dict):
        raise _fields.wrong(f"{where}.function", "an object")
    return _anthropic.function_tool(function, f"{where}.function")


def _tool_choice(choice: Any, parallel: bool | None, has_tools: bool) -> dict[str, Any] | None:
    return _anthropic.tool_choice(choice, parallel, has_tools, _named_tool_choice)


def _named_tool_choice(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
    if kind != "function":
        raise TranslationError(f"'tool_choice' type {_fields.shown(kind)} cannot be translated")
    function = choice.get("function")
    if not isinstance(function, dict):
        raise _fields.wrong("tool_choice.function", "an object")
    name = function.get("name")
    if not isinstance(name, str):
        raise _fields.wrong("tool_choice.function.name", "a string")
    return {"type": "tool", "name": name}


# ---------------------------------------------------------------------------------------------------
# response and error


def completion_id(message_id: str) -> str:
    """``msg_X`` → ``chatcmpl-X``: deterministic, and inverted by anthropic_to_openai.message_id."""
    return "chatcmpl-" + message_id.removeprefix("msg_")


def finish_reason(stop_reason: Any) -> str:
    if not isinstance(stop_reason, str):
        stop_reason = "end_turn"
    return _FINISH_REASONS.get(stop_reason, "stop")


def usage(raw: Any) -> dict[str, Any]:
    """Anthropic usage → OpenAI usage; Anthropic's input_tokens leave out cache reads and writes."""
    uncached, read, written, output = _anthropic.usage_counts(raw)
    prompt = uncached + read + written
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": read},
    }


def response(body: Any, *, requested_model: str, created: int | None = None) -> dict[str, Any]:
    """Anthropic message → OpenAI chat.completion, as if ``requested_model`` had answered.

    Content of the wrong shape raises :class:`TranslationError` (the answer cannot be passed on);
    an id, stop reason or usage of the wrong type is defaulted, as it does not change the answer.
    """
    content = _anthropic.answer_content(body)
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for position, block in enumerate(content):
        if not isinstance(block, dict):
            raise TranslationError(f"'content.{position}' is not an object")
        kind = block.get("type")
        if kind == "text":
            text.append(_anthropic.block_str(block, "text", position))
        elif kind == "tool_use":
            call_id, name = _anthropic.block_str(block, "id", position), _anthropic.block_str(block, "name", position)
            arguments = _anthropic.tool_input(block, position)
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        elif not isinstance(kind, str):
            raise TranslationError(f"'content.{position}.type' is not a string")
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
        "id": completion_id(_str_or_empty(body.get("id"))),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": requested_model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(body.get("stop_reason"))}
        ],
        "usage": usage(body.get("usage")),
        "system_fingerprint": None,
    }


def _str_or_empty(value: Any) -> str:
    return value if isinstance(value, str) else ""


_UNTRANSLATABLE: Final = _anthropic.openai_error(
    _UNTRANSLATABLE_MESSAGE, "server_error", _anthropic.UNTRANSLATABLE_CODE
)


def untranslatable_body() -> bytes:
    """The OpenAI error body that replaces a provider answer this module could not translate."""
    return orjson.dumps(_UNTRANSLATABLE)


def untranslatable_event() -> bytes:
    """The OpenAI stream's last event when the provider's stream could not be translated further."""
    return data_event(_UNTRANSLATABLE)


def error(status: int, body: bytes) -> bytes:
    """Anthropic error body → OpenAI error body (the status is passed through by the caller).

    Never raises: a body that is not Anthropic's error shape gives a message naming the HTTP status.
    """
    return _anthropic.error(status, body)


# ---------------------------------------------------------------------------------------------------
# streaming


class StreamTranslator(_anthropic.EventStream):
    """Anthropic SSE → OpenAI chat.completion.chunk SSE, one event at a time.

    Each Anthropic event becomes at most a few OpenAI chunks, emitted as soon as the event is
    complete. ``message_delta`` gives the finish chunk, ``message_stop`` the usage chunk (when the
    caller asked for ``include_usage``) and ``[DONE]``; ``finish`` then has nothing left to add unless
    the source was cut, when it adds an error chunk and never ``[DONE]``.

    An event that cannot be translated (not JSON, not an object, a known event type with fields of the
    wrong shape) ends the stream with an error chunk (code ``provider_response_untranslatable``) after
    the chunks already sent, and ``failure`` says why; event types this code does not know are skipped.
    """

    def __init__(self, *, requested_model: str, include_usage: bool, created: int | None = None) -> None:
        self._model = requested_model
        self._include_usage = include_usage
        self._created = int(time.time()) if created is None else created
        self._parser = SseParser()
        self._id = "chatcmpl-"
        self._usage: dict[str, Any] = {}
        self._blocks: set[int] = set()  # Anthropic block indexes started so far
        self._tool_index: dict[int, int] = {}  # Anthropic block index → OpenAI tool_calls index
        self._tool_fed: set[int] = set()  # Anthropic tool blocks that streamed some input JSON
        self._ended = False  # message_stop or an error event: nothing more goes out
        self.failure: str | None = None  # why the stream could not be translated, if it could not

    def finish(self) -> bytes:
        if self._ended:
            return b""
        self._ended = True
        return data_event(_anthropic.openai_error(_CUT_MESSAGE, "server_error", None))

    def _untranslatable(self) -> bytes:
        self._ended = True
        return untranslatable_event()

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

    def _event(self, event: SseEvent) -> Iterable[bytes]:
        payload, kind = _anthropic.event_payload(event)
        if kind == "message_start":
            message_id, self._usage = _anthropic.message_start(payload)
            if message_id is not None:
                self._id = completion_id(message_id)
            return [self._chunk({"role": "assistant", "content": "", "refusal": None})]
        if kind == "content_block_start":
            return self._block_start(payload)
        if kind == "content_block_delta":
            return self._block_delta(payload)
        if kind == "message_delta":
            delta = _anthropic.message_delta(payload, self._usage)
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
            # The provider's own error, passed on as such (not a translation failure), whatever its shape.
            self._ended = True
            message, openai_type, code = _anthropic.stream_error(payload)
            message = message or _anthropic.PROVIDER_ERROR_MESSAGE
            return [data_event(_anthropic.openai_error(message, openai_type, code))]
        if kind == "content_block_stop":
            return self._block_stop(payload)
        return ()  # ping and event types newer than this code

    def _block_start(self, payload: dict[str, Any]) -> list[bytes]:
        block_index = _anthropic.event_index(payload, "content_block_start")
        if block_index in self._blocks:
            raise TranslationError(f"content block {block_index} started twice")
        self._blocks.add(block_index)
        block = _anthropic.event_object(payload, "content_block", "content_block_start")
        kind = block.get("type")
        if kind == "tool_use":
            call_id, name = block.get("id"), block.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise TranslationError("a tool_use block's id or name is not a string")
            index = self._tool_index[block_index] = len(self._tool_index)
            call = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
            return [self._chunk({"tool_calls": [call]})]
        if kind == "text":
            text = block.get("text")
            if text is None:
                return []
            if not isinstance(text, str):
                raise TranslationError("a text block's text is not a string")
            return [self._chunk({"content": text})] if text else []
        if not isinstance(kind, str):
            raise TranslationError("a content block's type is not a string")
        return []

    def _block_delta(self, payload: dict[str, Any]) -> list[bytes]:
        block_index = _anthropic.event_index(payload, "content_block_delta")
        delta = _anthropic.event_object(payload, "delta", "content_block_delta")
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            if not isinstance(text, str):
                raise TranslationError("a text_delta's text is not a string")
            return [self._chunk({"content": text})] if text else []
        if kind == "input_json_delta":
            fragment = delta.get("partial_json")
            if not isinstance(fragment, str):
                raise TranslationError("an input_json_delta's partial_json is not a string")
            index = self._tool_index.get(block_index)
            if index is None or not fragment:
                return []
            self._tool_fed.add(block_index)
            return [self._chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})]
        if not isinstance(kind, str):
            raise TranslationError("a content_block_delta's delta type is not a string")
        return []  # thinking, signature and citations deltas

    def _block_stop(self, payload: dict[str, Any]) -> list[bytes]:
        block = _anthropic.event_index(payload, "content_block_stop")
        index = self._tool_index.get(block)
        if index is None or block in self._tool_fed:
            return []
        self._tool_fed.add(block)  # a repeated stop adds nothing
        # A tool without input streams no JSON at all (its input is {}); OpenAI clients json.loads the
        # accumulated arguments, which fails on "", so send what OpenAI sends for such a call.
        return [self._chunk({"tool_calls": [{"index": index, "function": {"arguments": "{}"}}]})]

