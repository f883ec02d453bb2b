"""Building blocks shared by the translators to and from the canonical form (Anthropic Messages).

``openai_to_anthropic`` (Chat Completions callers) and ``responses_to_anthropic`` (Responses API
callers) both build Anthropic requests and read Anthropic answers; the pieces that do the same thing
for both live here: request field checks, image/document/tool/tool_choice conversion, tool-call
argument parsing, usage counts, error-type mapping, the stream event checks, and the stream feed loop.

The provider translators (``anthropic_to_openai``, ``bedrock``, ``gemini``) read canonical requests and
write Anthropic answers; what they share is here too: the checks of a canonical request's turns,
blocks, system prompt, sampling fields and tools, and the writers of Anthropic error bodies, messages
and stream events (with :class:`AnthropicStream` for the streams that open one block at a time).

Where the callers' error messages differ only in a name or path, the difference is a parameter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, NamedTuple

import orjson

from extproc.translate import TranslationError, _fields
from extproc.translate.sse import SseEvent, SseParser, named_event

MEDIA_TYPES: Final = frozenset(("image/jpeg", "image/png", "image/gif", "image/webp"))
DATA_URL: Final = re.compile(r"data:([\w.+/-]+);base64,(.*)", re.DOTALL)
# Anthropic's temperature range is 0..1, OpenAI's 0..2: the top of OpenAI's range is "most random".
MAX_TEMPERATURE: Final = 1.0

# Anthropic error type → (OpenAI error type, OpenAI code), as the OpenAI API spells the same failure.
ERROR_TYPES: Final = {
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

CUT_MESSAGE: Final = "The upstream provider's stream ended before the response was complete."
PROVIDER_ERROR_MESSAGE: Final = "The upstream provider reported an error mid-stream."
UNTRANSLATABLE_CODE: Final = "provider_response_untranslatable"


def untranslatable_message(caller_format: str) -> str:
    """What a client is told when the provider's answer could not be put into its ``caller_format``."""
    return f"The upstream provider's response could not be translated to the {caller_format} format."


UNTRANSLATABLE_ANTHROPIC: Final = untranslatable_message("Anthropic Messages")

# The canonical request fields every provider translator reads; each adds its own and those it drops.
REQUEST_FIELDS: Final = frozenset(
    (
        "model",
        "messages",
        "system",
        "max_tokens",
        "temperature",
        "top_p",
        "stop_sequences",
        "metadata",
        "tools",
        "tool_choice",
        "thinking",
    )
)
# HTTP status → Anthropic error type, for a provider whose error bodies do not tell these apart.
HTTP_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


# ---------------------------------------------------------------------------------------------------
# request


def sampling(body: dict[str, Any], out: dict[str, Any]) -> None:
    """``temperature`` (clamped to Anthropic's range), ``top_p`` and ``stream`` into ``out``, in that order."""
    numbers = _fields.numbers(body, (("temperature", "temperature"), ("top_p", "top_p")))
    if "temperature" in numbers:
        numbers["temperature"] = min(numbers["temperature"], MAX_TEMPERATURE)
    out.update(numbers)
    if _fields.optional_bool(body, "stream"):
        out["stream"] = True


def system_prompt(
    system: list[dict[str, Any]], system_strings: int
) -> str | list[dict[str, Any]] | None:
    """Anthropic's ``system``: none, the caller's one plain string (which round-trips exactly), or text blocks."""
    if not system:
        return None
    if system_strings == 1 and len(system) == 1:
        text: str = system[0]["text"]
        return text
    return system


def part(content: list[Any], position: int, where: str) -> tuple[dict[str, Any], str]:
    """A content part (OpenAI's path: ``{where}.content[{position}]``) and its type, both checked."""
    return _fields.typed(content[position], f"{where}.content[{position}]")


def text_blocks(content: Any, where: str, kinds: tuple[str, ...], kinds_name: str) -> list[dict[str, Any]]:
    """A string or an array of text parts (of ``kinds``, named ``kinds_name`` when refused) → text blocks."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError(f"'{where}.content' must be a string or an array of text parts")
    blocks: list[dict[str, Any]] = []
    for position in range(len(content)):
        found, kind = part(content, position, where)
        if kind not in kinds:
            raise TranslationError(f"'{where}.content' may only hold {kinds_name} parts here")
        blocks.append({"type": "text", "text": _fields.string(found, "text", f"{where}.content[{position}]")})
    return blocks


class ImageErrors(NamedTuple):
    """How a caller format words a refused image URL (``{where}`` is the path of the part or message)."""

    not_base64: str
    not_url: str


def image(url: str, where: str, errors: ImageErrors) -> dict[str, Any]:
    """An image URL → Anthropic image block (``data:`` URL → base64 source, http(s) → url source)."""
    if url.startswith("data:"):
        match = DATA_URL.fullmatch(url)
        if match is None:
            raise TranslationError(errors.not_base64.format(where=where))
        media_type, data = match.groups()
        if media_type not in MEDIA_TYPES:
            raise TranslationError(f"'{where}' image type {_fields.shown(media_type)} is not supported by Anthropic")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError(errors.not_url.format(where=where))


def document(file: dict[str, Any], where: str, refusal: str) -> dict[str, Any]:
    """An inline PDF (``file_data`` as a data: URL, optional ``filename``) → Anthropic document block.

    Anything else raises ``refusal``: file ids and URLs name files OpenAI stores or fetches.
    """
    data_url = file.get("file_data")
    match = DATA_URL.fullmatch(data_url) if isinstance(data_url, str) else None
    if match is None or match.group(1) != "application/pdf":
        raise TranslationError(refusal)
    block: dict[str, Any] = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": match.group(2)},
    }
    filename = file.get("filename")
    if filename is not None:
        if not isinstance(filename, str):
            raise _fields.wrong(f"{where}.filename", "a string")
        block["title"] = filename
    return block


def arguments(raw: Any, where: str) -> dict[str, Any]:
    """A function call's JSON-string arguments (at ``where``) → tool_use input; a JSON object or nothing."""
    if raw is None or raw == "":
        return {}
    if not isinstance(raw, str):
        raise _fields.wrong(where, "a string")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise TranslationError(f"'{where}' are not valid JSON") from exc
    if not isinstance(value, dict):
        raise TranslationError(f"'{where}' must be a JSON object")
    return value


def function_object(tool: Any, where: str, subject: str) -> dict[str, Any]:
    """``tool`` (at ``where``) checked to be an object of type function; ``subject`` names it when refused."""
    if not isinstance(tool, dict):
        raise _fields.wrong(where, "an object")
    kind = tool.get("type")
    if kind != "function":
        shown = _fields.shown(kind) if isinstance(kind, str) else "without a type"
        raise TranslationError(f"{subject} type {shown} cannot be translated (only function tools)")
    return tool


def function_tool(function: dict[str, Any], where: str, *, check_strict: bool = False) -> dict[str, Any]:
    """A function definition (``name``, ``description``, ``parameters``, at ``where``) → Anthropic tool.

    ``check_strict`` type-checks the ``strict`` flag too (it is dropped either way).
    """
    name = function.get("name")
    if not isinstance(name, str):
        raise _fields.wrong(f"{where}.name", "a string")
    out: dict[str, Any] = {"name": name}
    description = function.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise _fields.wrong(f"{where}.description", "a string")
        out["description"] = description
    if check_strict:
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _fields.wrong(f"{where}.strict", "a boolean")
    parameters = function.get("parameters")
    if parameters is None or parameters == {}:
        # Anthropic requires an object schema; OpenAI allows leaving out parameters for a no-argument tool.
        parameters = {"type": "object", "properties": {}}
    elif not isinstance(parameters, dict):
        raise _fields.wrong(f"{where}.parameters", "an object")
    else:
        _fields.writable(parameters, f"{where}.parameters")
    out["input_schema"] = parameters
    return out


def tool_choice(
    choice: Any,
    parallel: bool | None,
    has_tools: bool,
    from_object: Callable[[str, dict[str, Any]], dict[str, Any]],
) -> dict[str, Any] | None:
    """OpenAI's ``tool_choice`` → Anthropic's (``required`` → ``any``), with ``parallel_tool_calls: false``.

    ``from_object(type, choice)`` translates the object forms, whose shape differs between the APIs.
    """
    if choice is None:
        out: dict[str, Any] | None = {"type": "auto"} if parallel is False and has_tools else None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}  # Anthropic's "none" takes no parallel flag
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, str):
        raise TranslationError(f"'tool_choice' {_fields.shown(choice)} cannot be translated")
    elif isinstance(choice, dict):
        kind = choice.get("type")
        if not isinstance(kind, str):
            raise _fields.wrong("tool_choice.type", "a string")
        out = from_object(kind, choice)
    else:
        raise _fields.wrong("tool_choice", '"auto", "none", "required" or an object')
    if out is not None and parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


# ---------------------------------------------------------------------------------------------------
# canonical requests, as the provider translators read them (Anthropic's dotted paths)


def turns(raw: Any, prefill_by: str = "") -> list[Any]:
    """A canonical request's ``messages``, a non-empty array.

    With ``prefill_by`` (a provider that answers anew rather than continue), a final assistant turn is refused.
    """
    if not isinstance(raw, list) or not raw:
        raise TranslationError("'messages' must be a non-empty array")
    if prefill_by and isinstance(raw[-1], dict) and raw[-1].get("role") == "assistant":
        raise TranslationError(f"a final assistant turn (prefill) cannot be continued by {prefill_by}")
    return raw


def turn(message: Any, index: int) -> tuple[str, Any]:
    """(role, content) of the turn at ``messages.{index}``, whose role is checked to be user or assistant."""
    if not isinstance(message, dict):
        raise _fields.wrong(f"messages.{index}", "an object")
    role = message.get("role")
    if role not in ("user", "assistant"):
        if isinstance(role, str):
            raise TranslationError(f"'messages.{index}.role' {_fields.shown(role)} cannot be translated")
        raise _fields.wrong(f"messages.{index}.role", "a string")
    return role, message.get("content")


def content_blocks(content: Any, index: int) -> tuple[list[Any], str]:
    """A turn's content as a block list and its path (a string is one text block, an empty one none)."""
    where = f"messages.{index}.content"
    if isinstance(content, str):
        return ([{"type": "text", "text": content}] if content else []), where
    if not isinstance(content, list):
        raise TranslationError(f"'{where}' must be a string or an array")
    return content, where


def block(content: list[Any], position: int, where: str) -> tuple[dict[str, Any], str]:
    """A content block (at ``{where}.{position}``) and its type, both checked."""
    return _fields.typed(content[position], f"{where}.{position}")


def texts(blocks: list[Any], where: str) -> list[str]:
    """The texts of the text blocks at ``where``; a block of another type is refused."""
    out: list[str] = []
    for position in range(len(blocks)):
        found, kind = block(blocks, position, where)
        if kind != "text":
            raise TranslationError(f"'{where}' may only hold text blocks")
        out.append(_fields.string(found, "text", f"{where}.{position}"))
    return out


def system_texts(system: Any) -> list[str]:
    """The texts of a canonical ``system`` (a string, none if empty, or text blocks)."""
    if isinstance(system, str):
        return [system] if system else []
    if not isinstance(system, list):
        raise TranslationError("'system' must be a string or an array of text blocks")
    return texts(system, "system")


def system_of(found: list[str]) -> str | list[dict[str, Any]] | None:
    """A canonical ``system`` read back from a provider's system texts: one as a string, several as blocks."""
    if not found:
        return None
    return found[0] if len(found) == 1 else [{"type": "text", "text": text} for text in found]


def source(found: dict[str, Any], at: str) -> dict[str, Any]:
    """The ``source`` object of the image or document block at ``at``."""
    value = found.get("source")
    if not isinstance(value, dict):
        raise _fields.wrong(f"{at}.source", "an object")
    return value


def tool_use_input(found: dict[str, Any], at: str) -> dict[str, Any]:
    """The ``input`` of the tool_use block at ``at``: an object JSON can carry (absent: empty)."""
    value = found.get("input")
    if value is None:
        value = {}
    elif not isinstance(value, dict):
        raise _fields.wrong(f"{at}.input", "an object")
    _fields.writable(value, f"{at}.input")
    return value


def sampling_config(body: dict[str, Any], max_tokens: str, top_p: str) -> dict[str, Any]:
    """``max_tokens``, ``temperature`` and ``top_p``, each checked if set, under a provider's names."""
    out: dict[str, Any] = {}
    limit = body.get("max_tokens")
    if limit is not None:
        out[max_tokens] = _fields.max_tokens(limit, "max_tokens")
    out.update(_fields.numbers(body, (("temperature", "temperature"), ("top_p", top_p))))
    return out


def stop_sequences(stop: Any, limit: int, provider: str) -> list[str]:
    """``stop_sequences`` (null: none), refused past the ``provider``'s ``limit`` rather than cut short."""
    if stop is None:
        return []
    stop = _fields.strings(stop, "stop_sequences")
    if len(stop) > limit:
        raise TranslationError(f"{provider} accepts at most {limit} stop sequences")
    return list(stop)


def client_tool(tool: Any, where: str, refusal: str) -> dict[str, Any]:
    """The tool at ``where``, checked to be a client (custom) tool: a server tool ``refusal`` (cannot be ...)."""
    if not isinstance(tool, dict):
        raise _fields.wrong(where, "an object")
    kind = tool.get("type")
    if kind is not None and not isinstance(kind, str):
        raise _fields.wrong(f"{where}.type", "a string")
    if kind not in (None, "custom") or "input_schema" not in tool:
        shown = _fields.shown(kind) if kind is not None else _fields.shown(str(tool.get("name")))
        raise TranslationError(f"tool {shown} is an Anthropic server tool and {refusal}")
    return tool


def tool_definition(tool: dict[str, Any], where: str) -> tuple[str, str | None, dict[str, Any]]:
    """(name, description if set, input schema) of the client tool at ``where``, each checked."""
    name = _fields.string(tool, "name", where)
    description = _fields.optional_str(tool, "description", where)
    schema = tool.get("input_schema")
    if not isinstance(schema, dict):
        raise _fields.wrong(f"{where}.input_schema", "an object")
    _fields.writable(schema, f"{where}.input_schema")
    return name, description, schema


# ---------------------------------------------------------------------------------------------------
# response and error


def answer_content(body: Any) -> list[Any]:
    """The content blocks of an Anthropic answer, checked to be an object with an array (or no) ``content``."""
    if not isinstance(body, dict):
        raise TranslationError("the answer is not a JSON object")
    content = body.get("content")
    if content is None:
        return []
    if not isinstance(content, list):
        raise TranslationError("'content' is not an array")
    return content


def usage_counts(raw: Any) -> tuple[int, int, int, int]:
    """(uncached input, cache reads, cache writes, output) tokens of Anthropic usage, each 0 unless a count.

    Anthropic's input_tokens leave out cache reads and writes: OpenAI's input counts are their sum.
    """
    if not isinstance(raw, dict):
        raw = {}
    return (
        _fields.count(raw.get("input_tokens")),
        _fields.count(raw.get("cache_read_input_tokens")),
        _fields.count(raw.get("cache_creation_input_tokens")),
        _fields.count(raw.get("output_tokens")),
    )


def block_str(block: dict[str, Any], key: str, position: int) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise TranslationError(f"'content.{position}.{key}' is not a string")
    return value


def tool_input(block: dict[str, Any], position: int) -> str:
    """A tool_use block's input as OpenAI's JSON-string arguments; an object by Anthropic's contract."""
    value = block.get("input")
    if value is None:
        return "{}"
    if not isinstance(value, dict):
        raise TranslationError(f"'content.{position}.input' is not an object")
    return _fields.writable(value, f"content.{position}.input")


def openai_error(message: str, err_type: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


def error(status: int, body: bytes) -> bytes:
    """Anthropic error body → OpenAI error body (both OpenAI APIs use one envelope). Never raises."""
    err_type, message = _body_error_fields(body)
    if err_type is None:
        err_type = "api_error" if status >= 500 else "invalid_request_error"
    openai_type, code = ERROR_TYPES.get(err_type, ("server_error" if status >= 500 else "invalid_request_error", None))
    if not message:
        message = f"Upstream provider error (HTTP {status})"
    return orjson.dumps(openai_error(message, openai_type, code))


def _body_error_fields(body: bytes) -> tuple[str | None, str | None]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    return error_fields(parsed.get("error") if isinstance(parsed, dict) else None)


def error_fields(inner: Any) -> tuple[str | None, str | None]:
    """(type, message) of Anthropic's inner error object, each None unless a string."""
    if not isinstance(inner, dict):
        return None, None
    err_type, message = inner.get("type"), inner.get("message")
    return (err_type if isinstance(err_type, str) else None), (message if isinstance(message, str) else None)


def stream_error(payload: dict[str, Any]) -> tuple[str | None, str, str | None]:
    """(message, OpenAI error type, OpenAI code) of an Anthropic ``error`` event, whatever its shape."""
    err_type, message = error_fields(payload.get("error"))
    openai_type, code = ERROR_TYPES.get(err_type or "api_error", ("server_error", None))
    return message, openai_type, code


# ---------------------------------------------------------------------------------------------------
# Anthropic answers, as the provider translators write them


def anthropic_error(err_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": err_type, "message": message}}


def error_event(err_type: str, message: str) -> bytes:
    return named_event("error", anthropic_error(err_type, message))


_UNTRANSLATABLE: Final = anthropic_error("api_error", UNTRANSLATABLE_ANTHROPIC)


def untranslatable_body() -> bytes:
    """The Anthropic error body that replaces a provider answer the translator could not translate."""
    return orjson.dumps(_UNTRANSLATABLE)


def untranslatable_event() -> bytes:
    """The Anthropic stream's last event when the provider's stream could not be translated further."""
    return named_event("error", _UNTRANSLATABLE)


def status_error_type(status: int, types: Mapping[int, str]) -> str:
    """The Anthropic error type of an HTTP ``status`` (``types``, else by the status's class)."""
    return types.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def provider_error(status: int, body: bytes, err_type: str, message_of: Callable[[Any], str | None]) -> bytes:
    """A provider's error body → Anthropic error body of ``err_type``. Never raises.

    ``message_of`` finds the message in the parsed body (None when it is not JSON); without one, the
    message names the HTTP status.
    """
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    message = message_of(parsed)
    return orjson.dumps(anthropic_error(err_type, message or f"Upstream provider error (HTTP {status})"))


def message_object(
    message_id: str, model: str, content: list[dict[str, Any]], stop_reason: str | None, usage: dict[str, Any]
) -> dict[str, Any]:
    """An Anthropic message (an answer, or a stream's start with no content and no stop reason)."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


def cached_usage(prompt: int, cached: int, output: int) -> dict[str, int]:
    """Anthropic usage from a prompt count that includes the cached tokens (OpenAI's, Gemini's).

    Anthropic's input_tokens leave the cache reads out; these providers report no cache writes.
    """
    return {
        "input_tokens": max(prompt - cached, 0),
        "output_tokens": output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def message_start_event(message_id: str, model: str, usage: dict[str, Any]) -> bytes:
    message = message_object(message_id, model, [], None, usage)
    return named_event("message_start", {"type": "message_start", "message": message})


def message_end_events(stop_reason: str | None, usage: dict[str, Any]) -> list[bytes]:
    """``message_delta`` (the stop reason and the final usage) and ``message_stop``."""
    delta = {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None}, "usage": usage}
    return [named_event("message_delta", delta), named_event("message_stop", {"type": "message_stop"})]


def block_start_event(index: int | None, content_block: dict[str, Any]) -> bytes:
    payload = {"type": "content_block_start", "index": index, "content_block": content_block}
    return named_event("content_block_start", payload)


def block_delta_event(index: int | None, delta: dict[str, Any]) -> bytes:
    return named_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def block_stop_event(index: int | None) -> bytes:
    return named_event("content_block_stop", {"type": "content_block_stop", "index": index})


# ---------------------------------------------------------------------------------------------------
# streaming


class EventStream:
    """The feed loop of a stream translator: SSE events in, translated bytes out, ending at a failure.

    Subclasses set ``_parser``, ``_ended`` and ``failure`` and implement ``_event`` (one event →
    bytes, raising :class:`TranslationError` when it cannot be read) and ``_untranslatable`` (the
    stream's ending after such an event, which must end the stream).
    """

    _parser: SseParser
    _ended: bool
    failure: str | None

    @property
    def complete(self) -> bool:
        """True once the stream ended cleanly or with an error event the client has already seen."""
        return self._ended

    def feed(self, chunk: bytes) -> bytes:
        if self._ended:
            return b""
        return self.translate(self._parser.feed(chunk))

    def translate(self, events: list[SseEvent]) -> bytes:
        """The translation of events parsed elsewhere (by a caller that also hands them to another reader).

        The events must be a whole stream's, in order, and this translator's own ``feed`` then unused.
        """
        out: list[bytes] = []
        for event in events:
            if self._ended:
                break
            try:
                out.extend(self._event(event))
            except TranslationError as exc:
                # What this event would have added is dropped whole; what went out before stays.
                self.failure = exc.message
                out.append(self._untranslatable())
        return b"".join(out)

    def _event(self, event: SseEvent) -> Iterable[bytes]:
        raise NotImplementedError

    def _untranslatable(self) -> bytes:
        raise NotImplementedError


class AnthropicStream(EventStream):
    """A stream translator that writes Anthropic Messages SSE with one content block open at a time.

    The provider's events are SSE chunks (``chunk_payload``); a block opens (closing the one before)
    with ``_open_block``, grows with ``_delta`` and closes with ``_close_block``.
    """

    def __init__(self, *, requested_model: str) -> None:
        self._model = requested_model
        self._parser = SseParser()
        self._started = False
        self._open: int | None = None  # Anthropic index of the open content block
        self._open_kind: str | None = None
        self._blocks = 0  # content blocks opened so far
        self._ended = False
        self.failure: str | None = None  # why the stream could not be translated, if it could not

    def _untranslatable(self) -> bytes:
        self._ended = True
        return untranslatable_event()

    def _open_block(self, kind: str, content_block: dict[str, Any]) -> list[bytes]:
        out = self._close_block()
        self._open, self._open_kind = self._blocks, kind
        self._blocks += 1
        out.append(block_start_event(self._open, content_block))
        return out

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        index, self._open, self._open_kind = self._open, None, None
        return [block_stop_event(index)]

    def _delta(self, delta: dict[str, Any], index: int | None = None) -> bytes:
        return block_delta_event(self._open if index is None else index, delta)


def chunk_payload(event: SseEvent) -> dict[str, Any]:
    """The JSON object of a provider's nameless SSE chunk (OpenAI's, Gemini's)."""
    try:
        payload = event.json()
    except orjson.JSONDecodeError:
        raise TranslationError("a chunk is not JSON") from None
    if not isinstance(payload, dict):
        raise TranslationError("a chunk is not a JSON object")
    return payload


def event_payload(event: SseEvent) -> tuple[dict[str, Any], str]:
    """An Anthropic event's JSON object and its type (the ``type`` field, else the event name)."""
    name = event.event
    try:
        payload = event.json()
    except orjson.JSONDecodeError:
        raise TranslationError(f"a {_event_name(name)} event's data is not JSON") from None
    if not isinstance(payload, dict):
        raise TranslationError(f"a {_event_name(name)} event's data is not a JSON object")
    kind = payload.get("type", name)
    if not isinstance(kind, str):
        raise TranslationError(f"a {_event_name(name)} event's type is not a string")
    return payload, kind


def _event_name(name: str | None) -> str:
    return _fields.shown(name, 30) if name else "nameless"


def message_start(payload: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(message id if a string, usage so far) of a ``message_start`` event."""
    message = event_object(payload, "message", "message_start")
    message_id = message.get("id")
    counts = message.get("usage")
    return (message_id if isinstance(message_id, str) else None), (dict(counts) if isinstance(counts, dict) else {})


def message_delta(payload: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    """A ``message_delta`` event's delta; its usage counts (cumulative totals) overwrite ``usage``'s."""
    delta = payload.get("delta")
    if delta is None:
        delta = {}
    elif not isinstance(delta, dict):
        raise TranslationError("a message_delta event's 'delta' is not an object")
    counts = payload.get("usage")
    if isinstance(counts, dict):
        usage.update({k: v for k, v in counts.items() if v is not None})
    return delta


def event_object(payload: dict[str, Any], key: str, event: str) -> dict[str, Any]:
    value = payload.get(key)
    if not isinstance(value, dict):
        raise TranslationError(f"a {event} event's {key!r} is not an object")
    return value


def event_index(payload: dict[str, Any], event: str) -> int:
    index = payload.get("index", 0)
    if type(index) is not int:
        raise TranslationError(f"a {event} event's 'index' is not an integer")
    return index
