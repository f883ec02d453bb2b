"""An OpenAI Responses API caller served by an Anthropic Messages provider.

``request`` turns the caller's ``POST /v1/responses`` body into a Messages request; ``response``,
``error`` and ``StreamTranslator`` turn Anthropic's answer back into what the OpenAI SDK expects from the
Responses API, with ``model`` set to the name the caller asked for and ids derived from Anthropic's
(``msg_X`` → response ``resp_X``, message item ``msg_X``; ``toolu_Y`` → function-call item ``fc_Y``).
A tool_use id becomes the function call's ``call_id`` unchanged, so the caller's next
``function_call_output`` (``call_id``) maps back to a ``tool_result`` (``tool_use_id``).

Mapped: ``input`` (a string, or items: messages with ``role`` user/assistant/system/developer and
``type: "message"`` optional, ``function_call``, ``function_call_output``), ``instructions`` and
system/developer messages → ``system`` (a plain string when there is exactly one string source),
``input_text``/``output_text``/``refusal`` parts → text, ``input_image`` (``data:`` URL → base64 source,
http(s) → url source), ``input_file`` with inline PDF ``file_data`` → ``document``, ``function_call`` →
``tool_use`` in the assistant turn (arguments must be a JSON object), ``function_call_output`` →
``tool_result`` (placed first in the user turn that follows, as Anthropic wants), function ``tools``
(flat: ``name``, ``description``, ``parameters``) → ``input_schema`` tools, ``tool_choice``
(``required`` → ``any``, ``{"type": "function", "name"}`` → ``tool``, ``allowed_tools`` → the allowed
function tools only, with mode ``auto``/``required``), ``parallel_tool_calls: false`` →
``disable_parallel_tool_use``, ``max_output_tokens`` → ``max_tokens`` (``default_max_tokens`` when
absent, as Anthropic requires it), ``temperature`` (clamped to Anthropic's 0..1), ``top_p``,
``stream``, ``user``/``safety_identifier`` → ``metadata.user_id``.

Dropped because they do not change what the caller gets back: ``metadata`` (labels for OpenAI's stored
response), ``store`` (nothing is stored at OpenAI, so the answer says ``store: false``; a later
``GET /v1/responses/{id}`` at OpenAI will not find it), ``service_tier``, ``prompt_cache_key``,
``prompt_cache_retention``, ``stream_options`` (obfuscation padding), ``truncation``, ``max_tool_calls``
(it limits built-in tools, which are refused), ``text.verbosity``, ``text.format`` of type ``text``,
``reasoning`` with no effort (or effort ``none``), ``include: ["message.input_image.image_url"]``,
``reasoning`` items in ``input`` (OpenAI's own reasoning state, opaque to Anthropic), an image's
``detail``, a function tool's ``strict`` flag (the schema is still sent).

Raising :class:`TranslationError` because the answer would differ from what the caller asked for or
needs state only OpenAI holds: ``previous_response_id``, ``conversation``, ``prompt`` (stored prompt
templates), ``context_management``, ``background: true``, ``item_reference`` items, any other item
type (built-in tool calls and outputs, custom tool calls, ...), OpenAI's built-in tools
(``web_search``, ``web_search_preview``, ``file_search``, ``computer_use_preview``, ``code_interpreter``,
``image_generation``, ``mcp``, ``local_shell``, ...) and any non-function tool, a ``tool_choice``
naming a non-function tool, ``text.format`` JSON mode or ``json_schema``, ``reasoning`` with an effort
or a summary, ``top_logprobs``, ``include`` of anything else (provider-side artefacts such as
``reasoning.encrypted_content``, ``message.output_text.logprobs``, tool results), audio and
``file_id``/``file_url`` inputs, a ``function_call_output`` answering no ``function_call`` of the
input, a final assistant message or unanswered function call (Anthropic would continue it as a
prefill), and any request field this module does not know.

Answers: a Responses object (``object: "response"``) with one output item per Anthropic content block
(a ``message`` item with one ``output_text`` part for a text block, a ``function_call`` item for a
tool_use block; thinking blocks never come back as this direction never asks for them), ``status``
``completed``, or ``incomplete`` with ``incomplete_details.reason`` ``max_output_tokens`` (stop reason
``max_tokens``) or ``content_filter`` (``refusal``), and ``usage`` in the Responses shape (input tokens
including cache reads and writes). The request's settings echoed in a Responses object (``tools``,
``instructions``, ...) come from ``echo(request_body)`` when the caller of this module passes it;
without it they take the API's defaults.

Streams: typed events (``event: <type>`` and the JSON with an increasing ``sequence_number``):
``response.created`` and ``response.in_progress`` at ``message_start``; per text block
``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta``...,
and at its end ``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``; per tool_use block ``response.output_item.added``,
``response.function_call_arguments.delta``... and ``response.function_call_arguments.done``,
``response.output_item.done``; at ``message_stop`` ``response.completed`` (or ``response.incomplete``)
with the whole response and its usage. An Anthropic ``error`` event, a source stream that ends
without ``message_stop``, or an event that cannot be translated ends the stream with
``response.failed`` (when ``response.created`` went out) and an ``error`` event, never with
``response.completed``. The ``error`` event carries ``code``/``message``/``param`` at the top level as
the API reference documents, and the same fields nested under ``error`` as the live API sends them,
which makes the official SDK raise ``APIError``.

Every request field read is type-checked (see ``_fields``): a wrong type raises
:class:`TranslationError` naming the field (``'input[2].content[0].text' must be a string``). An
Anthropic answer of the wrong shape is never passed on half-translated: ``response`` raises
:class:`TranslationError` for content it cannot read (ids, stop reasons and usage of the wrong type
are defaulted instead), the stream translator ends the stream as above (code
``provider_response_untranslatable``) at the first event it cannot read, and ``error`` never raises.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from extproc.translate import TranslationError, _anthropic, _fields
from extproc.translate.sse import SseEvent, SseParser, named_event

__all__ = [
    "CALLER_FORMAT",
    "StreamTranslator",
    "echo",
    "error",
    "request",
    "response",
    "untranslatable_body",
    "untranslatable_event",
]

CALLER_FORMAT: Final = "openai_responses"  # the caller format ResponseTranslator and UsageTracker take

_DROPPED: Final = frozenset(
    (
        "store",
        "metadata",
        "service_tier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "stream_options",
        "truncation",
        "max_tool_calls",
    )
)
_HANDLED: Final = frozenset(
    (
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "stream",
        "user",
        "safety_identifier",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "reasoning",
        "include",
        "background",
        "top_logprobs",
    )
)
# Fields whose value lives at OpenAI: a provider that is not OpenAI cannot honour any of them.
_STORED_STATE: Final = {
    "previous_response_id": "'previous_response_id' continues a response stored by OpenAI, which the Anthropic "
    "Messages API cannot read; send the whole conversation in 'input' instead",
    "conversation": "'conversation' continues a conversation stored by OpenAI, which the Anthropic Messages API "
    "cannot read; send the whole conversation in 'input' instead",
    "prompt": "'prompt' refers to a prompt template stored by OpenAI, which the Anthropic Messages API cannot read",
    "context_management": "'context_management' (compaction by OpenAI) cannot be served by the Anthropic Messages API",
}
_BUILT_IN_TOOLS: Final = frozenset(
    (
        "web_search",
        "web_search_preview",
        "web_search_2025_08_26",
        "web_search_preview_2025_03_11",
        "file_search",
        "computer",
        "computer_use_preview",
        "code_interpreter",
        "image_generation",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
        "tool_search",
        "programmatic_tool_calling",
    )
)
# `include` values that only ask for something already in the caller's input: harmless to drop.
_INCLUDE_DROPPED: Final = frozenset(("message.input_image.image_url",))

_STOP_STATUS: Final = {
    "max_tokens": ("incomplete", "max_output_tokens"),
    "model_context_window_exceeded": ("incomplete", "max_output_tokens"),
    "refusal": ("incomplete", "content_filter"),
}

_CUT_MESSAGE: Final = _anthropic.CUT_MESSAGE
_UNTRANSLATABLE_MESSAGE: Final = _anthropic.untranslatable_message("OpenAI Responses")


# ---------------------------------------------------------------------------------------------------
# request


def request(body: dict[str, Any], *, model: str, default_max_tokens: int = 4096) -> dict[str, Any]:
    """OpenAI Responses request → Anthropic Messages request for ``model``.

    Every field read is type-checked; a wrong type raises :class:`TranslationError` naming the field.
    """
    if not isinstance(body, dict):
        raise TranslationError("the request body must be a JSON object")
    _refuse_unsupported(body)
    instructions = _fields.optional_str(body, "instructions")
    system, messages = _input(body.get("input"), instructions)
    out: dict[str, Any] = {"model": model}
    if system is not None:
        out["system"] = system
    out["messages"] = messages

    limit = body.get("max_output_tokens")
    out["max_tokens"] = default_max_tokens if limit is None else _fields.max_tokens(limit, "max_output_tokens")
    _anthropic.sampling(body, out)
    user, safety_identifier = _fields.optional_str(body, "user"), _fields.optional_str(body, "safety_identifier")
    user = user or safety_identifier
    if user:
        out["metadata"] = {"user_id": user}

    raw_tools = body.get("tools")
    tools: list[dict[str, Any]] = []
    if raw_tools is not None:
        if not isinstance(raw_tools, list):
            raise _fields.wrong("tools", "an array")
        tools = [_tool(tool, index) for index, tool in enumerate(raw_tools)]
    parallel = _fields.optional_bool(body, "parallel_tool_calls")
    tools, choice = _tool_choice(body.get("tool_choice"), tools, parallel)
    if tools:
        out["tools"] = tools
        if choice is not None:
            out["tool_choice"] = choice
    elif choice is not None and choice["type"] in ("any", "tool"):
        # OpenAI refuses this too; Anthropic would, with a message about its own field names.
        raise TranslationError("'tool_choice' requires a function call but 'tools' offers no function")
    # Without tools, "auto" and "none" mean what no tool_choice means: Anthropic takes none then.
    return out


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for key, value in body.items():
        # SDKs and hand-written clients send null for "not given"; it never means anything else here.
        if value is None or key in _DROPPED:
            continue
        refusal = _STORED_STATE.get(key)
        if refusal is not None:
            raise TranslationError(refusal)
        if key not in _HANDLED:
            raise TranslationError(f"{_fields.shown(key)} cannot be translated to the Anthropic Messages API")
    _check_dropped(body)
    if _fields.optional_bool(body, "background"):
        raise TranslationError("'background': true cannot be served by the Anthropic Messages API")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None:
        if type(top_logprobs) is not int:
            raise _fields.wrong("top_logprobs", "an integer")
        if top_logprobs:
            raise TranslationError("'top_logprobs' cannot be served by the Anthropic Messages API")
    include = body.get("include")
    if include is not None:
        if not isinstance(include, list) or not all(isinstance(item, str) for item in include):
            raise _fields.wrong("include", "an array of strings")
        for item in include:
            if item not in _INCLUDE_DROPPED:
                raise TranslationError(
                    f"'include' value {_fields.shown(item)} asks for output only OpenAI produces; "
                    "the Anthropic Messages API cannot serve it"
                )
    _check_text(body.get("text"))
    _check_reasoning(body.get("reasoning"))


def _check_dropped(body: dict[str, Any]) -> None:
    """The dropped fields are still type-checked: a malformed request is refused whichever provider serves it."""
    for key in ("metadata", "stream_options"):
        value = body.get(key)
        if value is not None and not isinstance(value, dict):
            raise _fields.wrong(key, "an object")
    _fields.optional_bool(body, "store")
    for key in ("service_tier", "prompt_cache_key", "prompt_cache_retention", "truncation"):
        _fields.optional_str(body, key)
    calls = body.get("max_tool_calls")
    if calls is not None and type(calls) is not int:
        raise _fields.wrong("max_tool_calls", "an integer")


def _check_text(text: Any) -> None:
    if text is None:
        return
    if not isinstance(text, dict):
        raise _fields.wrong("text", "an object")
    verbosity = text.get("verbosity")
    if verbosity is not None and not isinstance(verbosity, str):
        raise _fields.wrong("text.verbosity", "a string")
    form = text.get("format")
    if form is None:
        return
    if not isinstance(form, dict):
        raise _fields.wrong("text.format", "an object")
    kind = form.get("type")
    if not isinstance(kind, str):
        raise _fields.wrong("text.format.type", "a string")
    if kind != "text":
        raise TranslationError(
            f"'text.format' type {_fields.shown(kind)} cannot be served by the Anthropic Messages API"
        )


def _check_reasoning(reasoning: Any) -> None:
    if reasoning is None:
        return
    if not isinstance(reasoning, dict):
        raise _fields.wrong("reasoning", "an object")
    effort = reasoning.get("effort")
    if effort is not None and not isinstance(effort, str):
        raise _fields.wrong("reasoning.effort", "a string")
    if effort not in (None, "none"):
        raise TranslationError(
            f"'reasoning.effort' {_fields.shown(effort)} cannot be served by the Anthropic Messages API"
        )
    for key in ("summary", "generate_summary"):
        value = reasoning.get(key)
        if value is not None and not isinstance(value, str):
            raise _fields.wrong(f"reasoning.{key}", "a string")
        if value is not None and effort != "none":
            raise TranslationError(f"'reasoning.{key}' cannot be served by the Anthropic Messages API")


# -- input ------------------------------------------------------------------------------------------


@dataclass
class _Conversation:
    """What the input items add up to so far, as they are read in order."""

    system: list[dict[str, Any]] = field(default_factory=list)
    system_strings: int = 0  # system messages given as plain strings (see _anthropic.system_prompt)
    turns: list[dict[str, Any]] = field(default_factory=list)
    calls: set[str] = field(default_factory=set)  # call ids of the function calls so far, which outputs must answer


def _input(raw: Any, instructions: str | None) -> tuple[str | list[dict[str, Any]] | None, list[dict[str, Any]]]:
    conversation = _Conversation()
    if instructions:
        conversation.system.append({"type": "text", "text": instructions})
        conversation.system_strings += 1
    for index, item in enumerate(_input_items(raw)):
        _add_item(conversation, item, f"input[{index}]")
    _check_last_turn(conversation.turns)
    return _anthropic.system_prompt(conversation.system, conversation.system_strings), conversation.turns


def _input_items(raw: Any) -> list[Any]:
    """``input`` as a list of items: a bare string is one user message."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if isinstance(raw, list):
        return raw
    if raw is None:
        raise TranslationError("'input' is required to be served by the Anthropic Messages API")
    raise _fields.wrong("input", "a string or an array")


def _add_item(conversation: _Conversation, item: Any, where: str) -> None:
    """Add one input item (at ``where``) to the conversation."""
    if not isinstance(item, dict):
        raise _fields.wrong(where, "an object")
    kind = _item_type(item, where)
    if kind == "message":
        _add_message(conversation, item, where)
    elif kind == "function_call":
        call = _function_call(item, where)
        conversation.calls.add(call["id"])
        _append(conversation.turns, "assistant", [call])
    elif kind == "function_call_output":
        _append(conversation.turns, "user", [_function_output(item, where, conversation.calls)])
    elif kind == "reasoning":
        return  # OpenAI's reasoning state from an earlier turn: nothing Anthropic can read
    elif kind == "item_reference":
        raise TranslationError(
            f"'{where}' is an item_reference to an item stored by OpenAI, which the Anthropic Messages API "
            "cannot read; send the item itself instead"
        )
    else:
        raise TranslationError(f"'{where}' item type {_fields.shown(kind)} cannot be translated")


def _item_type(item: dict[str, Any], where: str) -> str:
    """An item's ``type``; an item with a ``role`` and no type is a message (the easy input form)."""
    kind = item.get("type")
    if kind is None and "role" in item:
        kind = "message"
    if not isinstance(kind, str):
        raise _fields.wrong(f"{where}.type", "a string")
    return kind


def _add_message(conversation: _Conversation, item: dict[str, Any], where: str) -> None:
    """A message item: system and developer ones join the system prompt, the others are turns."""
    role = item.get("role")
    if role in ("system", "developer"):
        content = item.get("content")
        conversation.system_strings += isinstance(content, str)
        conversation.system.extend(_anthropic.text_blocks(content, where, ("input_text", "text"), "input_text"))
    elif role == "user":
        _append(conversation.turns, "user", _user_content(item.get("content"), where))
    elif role == "assistant":
        _append(conversation.turns, "assistant", _assistant_blocks(item.get("content"), where))
    elif isinstance(role, str):
        raise TranslationError(f"'{where}.role' {_fields.shown(role)} cannot be translated")
    else:
        raise _fields.wrong(f"{where}.role", "a string")


def _check_last_turn(turns: list[dict[str, Any]]) -> None:
    """Anthropic must be asked for a new answer: the conversation has to end with a user turn."""
    if not turns:
        raise TranslationError("'input' must hold at least one user message to be served by the Anthropic Messages API")
    last = turns[-1]
    if last["role"] == "assistant":
        if any(block.get("type") == "tool_use" for block in last["content"]):
            raise TranslationError("'input' ends with a function_call without its function_call_output")
        # OpenAI answers a trailing assistant message with a new message; Anthropic would continue it.
        raise TranslationError("a final assistant message would be continued (prefill) by the Anthropic API")


def _append(turns: list[dict[str, Any]], role: str, content: str | list[dict[str, Any]]) -> None:
    """Add a turn; assistant turns in a row merge, and tool results lead the user turn that follows the calls.

    Anthropic wants every tool_use of an assistant turn (a message and its function_call items arrive as
    separate items) answered by tool_result blocks at the start of the very next user turn.
    """
    if role == "assistant" and not content:
        return  # an empty assistant message says nothing, and Anthropic refuses empty turns
    if turns and turns[-1]["role"] == role:
        previous = turns[-1]["content"]
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
        if role == "assistant":
            previous.extend(blocks)
            return
        results = isinstance(previous, list) and any(block.get("type") == "tool_result" for block in previous)
        incoming = any(block.get("type") == "tool_result" for block in blocks)
        if results or incoming:
            if isinstance(previous, str):
                previous = turns[-1]["content"] = [{"type": "text", "text": previous}]
            if incoming:
                lead = 0
                while lead < len(previous) and previous[lead].get("type") == "tool_result":
                    lead += 1
                previous[lead:lead] = blocks
            else:
                previous.extend(blocks)
            return
    if role == "assistant" and isinstance(content, str):
        content = [{"type": "text", "text": content}] if content else []
    turns.append({"role": role, "content": content})


def _user_content(content: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TranslationError(f"'{where}.content' must be a string or an array")
    return [_input_part(content, position, where) for position in range(len(content))]


def _input_part(content: list[Any], position: int, where: str, *, files: bool = True) -> dict[str, Any]:
    """One input_text, input_image or input_file part (a user message's, or a function call output's)."""
    part, kind = _anthropic.part(content, position, where)
    at = f"{where}.content[{position}]" if files else f"{where}.output[{position}]"
    if kind == "input_text":
        return {"type": "text", "text": _fields.string(part, "text", at)}
    if kind == "input_image":
        url = part.get("image_url")
        if url is None and part.get("file_id") is not None:
            raise TranslationError(f"'{at}.file_id' refers to a file stored by OpenAI, which Anthropic cannot read")
        if not isinstance(url, str):
            raise _fields.wrong(f"{at}.image_url", "a string")
        return _image(url, at)
    if kind == "input_file" and files:
        return _document(part, at)
    raise TranslationError(f"'{at}' part type {_fields.shown(kind)} cannot be translated")


_IMAGE_ERRORS: Final = _anthropic.ImageErrors(
    not_base64="'{where}.image_url' data URL must be base64",
    not_url="'{where}.image_url' must be a data: or http(s) URL",
)


def _image(url: str, at: str) -> dict[str, Any]:
    return _anthropic.image(url, at, _IMAGE_ERRORS)


def _document(part: dict[str, Any], at: str) -> dict[str, Any]:
    data_url = part.get("file_data")
    if data_url is not None and not isinstance(data_url, str):
        raise _fields.wrong(f"{at}.file_data", "a string")
    # file_id and file_url name files OpenAI fetches or stores; Anthropic is only sent inline PDFs.
    return _anthropic.document(
        part, at, f"'{at}' only inline PDF files (file_data as a data: URL) can be translated"
    )


def _assistant_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError(f"'{where}.content' must be a string or an array")
    blocks: list[dict[str, Any]] = []
    for position in range(len(content)):
        part, kind = _anthropic.part(content, position, where)
        at = f"{where}.content[{position}]"
        if kind in ("output_text", "input_text"):
            text = _fields.string(part, "text", at)
        elif kind == "refusal":
            text = _fields.string(part, "refusal", at)
        else:
            raise TranslationError(f"'{where}.content' part type {_fields.shown(kind)} cannot be translated")
        if text:  # Anthropic refuses empty text blocks
            blocks.append({"type": "text", "text": text})
    return blocks


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, name = item.get("call_id"), item.get("name")
    if not isinstance(call_id, str):
        raise _fields.wrong(f"{where}.call_id", "a string")
    if not isinstance(name, str):
        raise _fields.wrong(f"{where}.name", "a string")
    arguments = _anthropic.arguments(item.get("arguments"), f"{where}.arguments")
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def _function_output(item: dict[str, Any], where: str, calls: set[str]) -> dict[str, Any]:
    call_id = item.get("call_id")
    if not isinstance(call_id, str):
        raise _fields.wrong(f"{where}.call_id", "a string")
    if call_id not in calls:
        raise TranslationError(f"'{where}.call_id' {_fields.shown(call_id)} answers no function_call in 'input'")
    output = item.get("output")
    if isinstance(output, str):
        content: str | list[dict[str, Any]] = output  # a string stays a string, as Anthropic takes it
    elif isinstance(output, list):
        content = [_input_part(output, position, where, files=False) for position in range(len(output))]
    else:
        raise _fields.wrong(f"{where}.output", "a string or an array")
    return {"type": "tool_result", "tool_use_id": call_id, "content": content}


# -- tools ------------------------------------------------------------------------------------------


def _tool(tool: Any, index: int) -> dict[str, Any]:
    where = f"tools[{index}]"
    if not isinstance(tool, dict):
        raise _fields.wrong(where, "an object")
    kind = tool.get("type")
    if not isinstance(kind, str):
        raise _fields.wrong(f"{where}.type", "a string")
    if kind in _BUILT_IN_TOOLS:
        raise TranslationError(
            f"'{where}' is OpenAI's built-in {_fields.shown(kind)} tool, which the Anthropic Messages API cannot run"
        )
    if kind != "function":
        raise TranslationError(f"'{where}' type {_fields.shown(kind)} cannot be translated (only function tools)")
    return _anthropic.function_tool(tool, where, check_strict=True)


def _tool_choice(
    choice: Any, tools: list[dict[str, Any]], parallel: bool | None
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(the tools to send, Anthropic's tool_choice) for a Responses tool_choice."""
    offered = tools

    def named(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
        nonlocal offered
        if kind == "function":
            name = choice.get("name")
            if not isinstance(name, str):
                raise _fields.wrong("tool_choice.name", "a string")
            return {"type": "tool", "name": name}
        if kind == "allowed_tools":
            offered, out = _allowed_tools(choice, tools)
            return out
        raise TranslationError(f"'tool_choice' type {_fields.shown(kind)} cannot be translated")

    out = _anthropic.tool_choice(choice, parallel, bool(tools), named)
    return offered, out


def _allowed_tools(choice: dict[str, Any], tools: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    mode = choice.get("mode")
    if mode not in ("auto", "required"):
        raise _fields.wrong("tool_choice.mode", '"auto" or "required"')
    allowed = choice.get("tools")
    if not isinstance(allowed, list):
        raise _fields.wrong("tool_choice.tools", "an array")
    names: set[str] = set()
    for position, tool in enumerate(allowed):
        at = f"tool_choice.tools[{position}]"
        name = _anthropic.function_object(tool, at, f"'{at}'").get("name")
        if not isinstance(name, str):
            raise _fields.wrong(f"{at}.name", "a string")
        names.add(name)
    # Tools outside the allowed set are not offered at all: the model cannot call what it is not shown.
    kept = [tool for tool in tools if tool["name"] in names]
    if kept:
        return kept, {"type": "auto" if mode == "auto" else "any"}
    if mode == "auto":
        return kept, {"type": "none"}
    raise TranslationError("'tool_choice' requires a call but allows none of the function tools in 'tools'")


# ---------------------------------------------------------------------------------------------------
# what the caller asked for, echoed in the response object


def echo(body: Any) -> dict[str, Any]:
    """The request settings a Responses object repeats back, from a request ``request`` accepted.

    Pass the result to ``response``/``StreamTranslator``/``ResponseTranslator`` as ``echo`` so the
    response object says what the caller asked for (``tools``, ``tool_choice``, ``instructions``,
    ``max_output_tokens``, ``temperature``, ``top_p``, ``parallel_tool_calls``, ``metadata``, ``text``,
    ``truncation``, ``user``, ``safety_identifier``, ``prompt_cache_key``); anything of the wrong shape
    is left out rather than raised on.
    """
    if not isinstance(body, dict):
        return {}
    out: dict[str, Any] = {}
    for key in ("instructions", "user", "safety_identifier", "prompt_cache_key"):
        if isinstance(body.get(key), str):
            out[key] = body[key]
    for key in ("temperature", "top_p"):
        if _fields.is_number(body.get(key)):
            out[key] = body[key]
    if type(body.get("max_output_tokens")) is int:
        out["max_output_tokens"] = body["max_output_tokens"]
    if isinstance(body.get("parallel_tool_calls"), bool):
        out["parallel_tool_calls"] = body["parallel_tool_calls"]
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()):
        out["metadata"] = metadata
    if body.get("truncation") in ("auto", "disabled"):
        out["truncation"] = body["truncation"]
    choice = body.get("tool_choice")
    if choice in ("auto", "none", "required") or (
        isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str)
    ):
        out["tool_choice"] = choice
    tools = body.get("tools")
    if isinstance(tools, list) and all(
        isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("name"), str) for t in tools
    ):
        out["tools"] = [
            {
                "type": "function",
                "name": t["name"],
                "description": t.get("description") if isinstance(t.get("description"), str) else None,
                "parameters": t.get("parameters") if isinstance(t.get("parameters"), dict) else None,
                "strict": t.get("strict") if isinstance(t.get("strict"), bool) else True,
            }
            for t in tools
        ]
    text = body.get("text")
    if isinstance(text, dict) and text.get("verbosity") in ("low", "medium", "high"):
        out["text"] = {"format": {"type": "text"}, "verbosity": text["verbosity"]}
    return out


# ---------------------------------------------------------------------------------------------------
# response and error


def response_id(message_id: str) -> str:
    """``msg_X`` → ``resp_X``: deterministic, like the chat translator's completion ids."""
    return "resp_" + message_id.removeprefix("msg_")


def _call_item_id(tool_use_id: str) -> str:
    return "fc_" + tool_use_id.removeprefix("toolu_")


def usage(raw: Any) -> dict[str, Any]:
    """Anthropic usage → Responses usage; Anthropic's input_tokens leave out cache reads and writes."""
    uncached, read, written, output = _anthropic.usage_counts(raw)
    total_input = uncached + read + written
    return {
        "input_tokens": total_input,
        "input_tokens_details": {"cached_tokens": read, "cache_write_tokens": written},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": total_input + output,
    }


def _status(stop_reason: Any) -> tuple[str, dict[str, Any] | None]:
    """(status, incomplete_details) for an Anthropic stop reason; anything unknown is a completed answer."""
    found = _STOP_STATUS.get(stop_reason) if isinstance(stop_reason, str) else None
    if found is None:
        return "completed", None
    return found[0], {"reason": found[1]}


def _response_object(
    resp_id: str,
    created_at: int,
    model: str,
    echoed: dict[str, Any] | None,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage_: dict[str, Any] | None,
    incomplete: dict[str, Any] | None = None,
    failure: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": resp_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": created_at if status == "completed" else None,
        "error": failure,
        "incomplete_details": incomplete,
        "instructions": None,
        "max_output_tokens": None,
        "max_tool_calls": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "prompt_cache_key": None,
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": None,
        "service_tier": "default",
        "store": False,  # nothing was stored at OpenAI: a GET of this id there would not find it
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage_,
        "user": None,
        "metadata": {},
    }
    if echoed:
        out.update(echoed)
    return out


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [_text_part(text)],
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(tool_use_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": _call_item_id(tool_use_id),
        "type": "function_call",
        "status": status,
        "call_id": tool_use_id,
        "name": name,
        "arguments": arguments,
    }


def _message_item_id(message_id: str, count: int) -> str:
    """The n-th message item's id: the Anthropic message id itself, then suffixed (one item per text block)."""
    base = "msg_" + message_id.removeprefix("msg_")
    return base if count == 0 else f"{base}_{count}"


def response(
    body: Any, *, requested_model: str, created: int | None = None, echo: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Anthropic message → Responses object, as if ``requested_model`` had answered.

    Content of the wrong shape raises :class:`TranslationError` (the answer cannot be passed on);
    an id, stop reason or usage of the wrong type is defaulted, as it does not change the answer.
    """
    content = _anthropic.answer_content(body)
    message_id = body.get("id") if isinstance(body.get("id"), str) else ""
    output: list[dict[str, Any]] = []
    messages = 0
    call_ids: set[str] = set()
    for position, block in enumerate(content):
        if not isinstance(block, dict):
            raise TranslationError(f"'content.{position}' is not an object")
        kind = block.get("type")
        if kind == "text":
            text = _anthropic.block_str(block, "text", position)
            output.append(_message_item(_message_item_id(message_id, messages), text))
            messages += 1
        elif kind == "tool_use":
            call_id, name = _anthropic.block_str(block, "id", position), _anthropic.block_str(block, "name", position)
            if call_id in call_ids:
                # The caller answers a call by its id: two calls with one id cannot both be answered.
                raise TranslationError(f"tool_use id {_fields.shown(call_id)} appears twice")
            call_ids.add(call_id)
            output.append(_call_item(call_id, name, _anthropic.tool_input(block, position)))
        elif not isinstance(kind, str):
            raise TranslationError(f"'content.{position}.type' is not a string")
        # thinking and server-tool blocks only come back when asked for, which this direction never does.
    status, incomplete = _status(body.get("stop_reason"))
    if status == "incomplete" and output and output[-1]["type"] == "message":
        output[-1]["status"] = "incomplete"
    return _response_object(
        response_id(message_id),
        int(time.time()) if created is None else created,
        requested_model,
        echo,
        status=status,
        output=output,
        usage_=usage(body.get("usage")),
        incomplete=incomplete,
    )


_UNTRANSLATABLE: Final = _anthropic.openai_error(
    _UNTRANSLATABLE_MESSAGE, "server_error", _anthropic.UNTRANSLATABLE_CODE
)


def untranslatable_body() -> bytes:
    """The OpenAI error body that replaces a provider answer this module could not translate."""
    return orjson.dumps(_UNTRANSLATABLE)


def untranslatable_event(sequence_number: int = 0) -> bytes:
    """The stream's last event when the provider's stream could not be translated further.

    ``StreamTranslator.untranslatable_events`` is the better ending (it knows the sequence and sends
    ``response.failed`` too); this one is for when the translator itself cannot be trusted any more.
    """
    return _error_event(sequence_number, _UNTRANSLATABLE_MESSAGE, "server_error", _anthropic.UNTRANSLATABLE_CODE)


def _error_event(sequence_number: int, message: str, err_type: str, code: str | None) -> bytes:
    # Flat fields as the API reference documents the event; nested ones as the live API sends it, which
    # is what makes the official SDK raise APIError.
    payload = {
        "type": "error",
        "sequence_number": sequence_number,
        "code": code,
        "message": message,
        "param": None,
        "error": {"type": err_type, "code": code, "message": message, "param": None},
    }
    return named_event("error", payload)


def error(status: int, body: bytes) -> bytes:
    """Anthropic error body → OpenAI error body (the Responses API uses the chat API's envelope).

    Never raises: a body that is not Anthropic's error shape gives a message naming the HTTP status.
    """
    return _anthropic.error(status, body)


# ---------------------------------------------------------------------------------------------------
# streaming


class StreamTranslator(_anthropic.EventStream):
    """Anthropic SSE → Responses API SSE, one event at a time (see the module docstring for the mapping).

    An event that cannot be translated (not JSON, not an object, a known event type with fields of the
    wrong shape, a delta for a block that never started) ends the stream with ``response.failed`` and an
    ``error`` event of code ``provider_response_untranslatable`` after the events already sent, and
    ``failure`` says why; event types this code does not know are skipped.
    """

    def __init__(self, *, requested_model: str, created: int | None = None, echo: dict[str, Any] | None = None
                 ) -> None:
        self._model = requested_model
        self._created = int(time.time()) if created is None else created
        self._echo = echo
        self._parser = SseParser()
        self._sequence = 0
        self._message_id = ""
        self._started = False  # response.created went out
        self._items: list[dict[str, Any]] = []  # output items by output_index, done or as far as they got
        self._done: set[int] = set()  # output indexes whose output_item.done went out
        self._blocks: dict[int, int] = {}  # Anthropic block index → output index (text and tool_use blocks)
        self._skipped: set[int] = set()  # Anthropic blocks with nothing to show (thinking, server tools)
        self._call_ids: set[str] = set()  # tool_use ids so far: each names one function call
        self._texts: dict[int, list[str]] = {}  # output index → text or argument fragments so far
        self._messages = 0
        self._usage: dict[str, Any] = {}
        self._stop_reason: Any = None
        self._ended = False
        self.failure: str | None = None

    @property
    def sequence_number(self) -> int:
        """The sequence number the next event would carry."""
        return self._sequence

    def finish(self) -> bytes:
        if self._ended:
            return b""
        return self._fail(_CUT_MESSAGE, "server_error", None)

    def untranslatable_events(self) -> bytes:
        """The end of a stream that cannot be translated further: response.failed (if started) and error."""
        if self._ended:
            return b""
        return self._fail(_UNTRANSLATABLE_MESSAGE, "server_error", _anthropic.UNTRANSLATABLE_CODE)

    def _untranslatable(self) -> bytes:
        return self.untranslatable_events()

    # -- output ------------------------------------------------------------------------------------

    def _emit(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return named_event(kind, payload)

    def _snapshot(
        self,
        status: str,
        *,
        usage_: dict[str, Any] | None = None,
        incomplete: dict[str, Any] | None = None,
        failure: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The response object as it stands: no output while in progress, every item (unfinished ones
        marked incomplete) once it ended."""
        if status == "in_progress":
            output: list[dict[str, Any]] = []
        else:
            output = [
                item if index in self._done else {**item, "status": "incomplete"}
                for index, item in enumerate(self._items)
            ]
        return _response_object(
            response_id(self._message_id),
            self._created,
            self._model,
            self._echo,
            status=status,
            output=output,
            usage_=usage_,
            incomplete=incomplete,
            failure=failure,
        )

    def _start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        snapshot = self._snapshot("in_progress")
        return [
            self._emit("response.created", response=snapshot),
            self._emit("response.in_progress", response=snapshot),
        ]

    def _fail(self, message: str, err_type: str, code: str | None) -> bytes:
        self._ended = True
        out: list[bytes] = []
        if self._started:
            # response.failed only follows response.created: the SDK refuses a lifecycle it never saw begin.
            failure = {"code": "rate_limit_exceeded" if code == "rate_limit_exceeded" else "server_error",
                       "message": message}
            out.append(self._emit("response.failed", response=self._snapshot(
                "failed", failure=failure, usage_=usage(self._usage) if self._usage else None)))
        out.append(_error_event(self._sequence, message, err_type, code))
        self._sequence += 1
        return b"".join(out)

    # -- input -------------------------------------------------------------------------------------

    def _event(self, event: SseEvent) -> Iterable[bytes]:
        payload, kind = _anthropic.event_payload(event)
        if kind == "message_start":
            if self._started:
                raise TranslationError("message_start arrived after the message had started")
            message_id, self._usage = _anthropic.message_start(payload)
            if message_id is not None:
                self._message_id = message_id
            return self._start()
        if kind == "content_block_start":
            return self._block_start(payload)
        if kind == "content_block_delta":
            return self._block_delta(payload)
        if kind == "content_block_stop":
            return self._block_stop(_anthropic.event_index(payload, kind))
        if kind == "message_delta":
            delta = _anthropic.message_delta(payload, self._usage)
            if "stop_reason" in delta:
                self._stop_reason = delta["stop_reason"]
            return ()
        if kind == "message_stop":
            return self._stop()
        if kind == "error":
            # The provider's own error, passed on as such (not a translation failure), whatever its shape.
            message, openai_type, code = _anthropic.stream_error(payload)
            return [self._fail(message or _anthropic.PROVIDER_ERROR_MESSAGE, openai_type, code)]
        return ()  # ping and event types newer than this code

    def _block_start(self, payload: dict[str, Any]) -> list[bytes]:
        block_index = _anthropic.event_index(payload, "content_block_start")
        if block_index in self._blocks or block_index in self._skipped:
            raise TranslationError(f"content block {block_index} started twice")
        block = _anthropic.event_object(payload, "content_block", "content_block_start")
        kind = block.get("type")
        if kind == "tool_use":
            call_id, name = block.get("id"), block.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise TranslationError("a tool_use block's id or name is not a string")
            if call_id in self._call_ids:
                raise TranslationError(f"tool_use id {_fields.shown(call_id)} appears twice")
            self._call_ids.add(call_id)
            out = self._start()
            index = self._blocks[block_index] = len(self._items)
            item = _call_item(call_id, name, "", "in_progress")
            self._items.append(item)
            self._texts[index] = []
            out.append(self._emit("response.output_item.added", output_index=index, item=item))
            return out
        if kind == "text":
            text = block.get("text")
            if text is not None and not isinstance(text, str):
                raise TranslationError("a text block's text is not a string")
            out = self._start()
            index = self._blocks[block_index] = len(self._items)
            item_id = _message_item_id(self._message_id, self._messages)
            self._messages += 1
            self._items.append({**_message_item(item_id, "", "in_progress"), "content": []})
            self._texts[index] = []
            out.append(self._emit("response.output_item.added", output_index=index, item=self._items[index]))
            out.append(self._emit("response.content_part.added", item_id=item_id, output_index=index,
                                  content_index=0, part=_text_part("")))
            if text:
                out.append(self._text_delta(index, text))
            return out
        if not isinstance(kind, str):
            raise TranslationError("a content block's type is not a string")
        self._skipped.add(block_index)  # thinking and server tools: never asked for in this direction
        return []

    def _text_delta(self, index: int, text: str) -> bytes:
        self._texts[index].append(text)
        return self._emit("response.output_text.delta", item_id=self._items[index]["id"], output_index=index,
                          content_index=0, delta=text, logprobs=[])

    def _block_delta(self, payload: dict[str, Any]) -> list[bytes]:
        block_index = _anthropic.event_index(payload, "content_block_delta")
        delta = _anthropic.event_object(payload, "delta", "content_block_delta")
        kind = delta.get("type")
        if not isinstance(kind, str):
            raise TranslationError("a content_block_delta's delta type is not a string")
        if kind not in ("text_delta", "input_json_delta") or block_index in self._skipped:
            return []  # thinking, signature and citations deltas
        index = self._blocks.get(block_index)
        if index is None:
            raise TranslationError(f"a {kind} arrived for content block {block_index}, which never started")
        if index in self._done:
            raise TranslationError(f"a {kind} arrived for content block {block_index} after it stopped")
        item = self._items[index]
        if kind == "text_delta":
            text = delta.get("text")
            if not isinstance(text, str):
                raise TranslationError("a text_delta's text is not a string")
            if item["type"] != "message":
                raise TranslationError(f"a text_delta arrived for tool_use block {block_index}")
            return [self._text_delta(index, text)] if text else []
        fragment = delta.get("partial_json")
        if not isinstance(fragment, str):
            raise TranslationError("an input_json_delta's partial_json is not a string")
        if item["type"] != "function_call":
            raise TranslationError(f"an input_json_delta arrived for text block {block_index}")
        if not fragment:
            return []
        self._texts[index].append(fragment)
        return [self._emit("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                           delta=fragment)]

    def _block_stop(self, block_index: int) -> list[bytes]:
        index = self._blocks.get(block_index)
        if index is None or index in self._done:
            return []  # a skipped block, or a repeated stop: nothing to close
        self._done.add(index)
        item = self._items[index]
        text = "".join(self._texts.pop(index, []))
        if item["type"] == "function_call":
            # A tool without input streams no JSON at all (its input is {}): send what OpenAI sends for one.
            arguments = text or "{}"
            done = self._items[index] = {**item, "arguments": arguments, "status": "completed"}
            return [
                self._emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                           arguments=arguments),
                self._emit("response.output_item.done", output_index=index, item=done),
            ]
        done = self._items[index] = _message_item(item["id"], text)
        return [
            self._emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                       text=text, logprobs=[]),
            self._emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                       part=_text_part(text)),
            self._emit("response.output_item.done", output_index=index, item=done),
        ]

    def _stop(self) -> list[bytes]:
        out = self._start()
        for block_index in list(self._blocks):
            out.extend(self._block_stop(block_index))  # blocks the provider never stopped: close them now
        status, incomplete = _status(self._stop_reason)
        if status == "incomplete" and self._items and self._items[-1]["type"] == "message":
            self._items[-1] = {**self._items[-1], "status": "incomplete"}
        self._ended = True
        kind = "response.completed" if status == "completed" else "response.incomplete"
        snapshot = self._snapshot(status, incomplete=incomplete, usage_=usage(self._usage))
        out.append(self._emit(kind, response=snapshot))
        return out

