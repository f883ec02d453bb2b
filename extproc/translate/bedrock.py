"""The Bedrock Converse and ConverseStream APIs, to and from the canonical form (Anthropic Messages).

``request`` turns a canonical request into a Converse body (the model id goes in the URL path,
``/model/{modelId}/converse`` or ``/converse-stream``, so neither ``model`` nor ``stream`` is in the
body); ``response``, ``error`` and ``StreamTranslator`` turn Bedrock's answer back into what the
Anthropic SDK expects, with ``model`` set to the name the caller asked for. Tool-use ids pass through
unchanged in both directions. Bedrock does not return a message id, so each answer gets a fresh
``msg_bdrk_…`` one.

Mapped: ``system`` (string or text blocks → text blocks), user/assistant turns (consecutive turns of one
role merged, as Converse wants the roles to alternate; empty or blank text blocks dropped, as Converse
refuses them), text, base64 images (png, jpeg, gif, webp), base64 PDF ``document`` blocks (``title`` →
``name``, reduced to the characters Converse allows; ``context`` as is), ``tool_use`` → ``toolUse``,
``tool_result`` → ``toolResult`` (text, image and document content; ``is_error`` → ``status: error``),
``max_tokens`` → ``inferenceConfig.maxTokens``, ``temperature``, ``top_p`` → ``topP``,
``stop_sequences`` → ``stopSequences``, ``top_k`` → ``additionalModelRequestFields.top_k``, tools →
``toolConfig.tools`` (``toolSpec`` with ``inputSchema.json``), ``tool_choice`` (``auto``/``any``/``tool``;
``none`` leaves the tools out, since Converse has no such choice), and for Anthropic models on Bedrock
``thinking`` → ``additionalModelRequestFields.thinking`` with earlier ``thinking``/``redacted_thinking``
blocks → ``reasoningContent``.

Dropped because they do not change the answer: ``stream``, ``service_tier``, ``metadata.user_id`` (a label
for abuse tracking, which Converse has no field for), ``cache_control`` on blocks and tools,
``citations`` on text blocks of earlier turns, ``thinking: {"type": "disabled"}``, and earlier turns'
thinking blocks when thinking is off (Anthropic ignores them then too).

Raising :class:`TranslationError`: image URL sources (Converse takes image bytes only), documents other
than a base64 PDF, documents with citations enabled, enabled ``thinking`` for a model that is not
Anthropic's, server tools (web search, code execution, ...), block types Converse has no counterpart
for, ``disable_parallel_tool_use`` (Converse cannot limit a turn to one tool call), ``tool_choice``
``any``/``tool`` without tools, tool blocks in the conversation when no tools go with the request
(Converse refuses those), metadata other than ``user_id``, and any request field this module does not
know (``mcp_servers``, ``container``, ``context_management``, ``output_format``, ...).

``canonical_request`` undoes ``request``: on a fallback Envoy re-sends the body the failed Bedrock hop
was sent, and the next hop (OpenAI, Gemini, ...) needs it in the canonical form again. It reads what
``request`` writes and raises :class:`TranslationError` naming the field for anything else (other
top-level or nested fields, blocks such as ``cachePoint``, ``video`` or ``json``, S3 sources, documents
other than PDF, other tool choices). What ``request`` drops or merges does not come back: the fields
dropped above, blank text, the split between consecutive turns of one role, the characters of a
document title Converse does not allow, tools sent with ``tool_choice`` none, and an unset
``max_tokens`` (``default_max_tokens`` stands in). Content comes back as blocks (a string content as one
text block); one system block comes back as a string, several as text blocks; a position-made document
name is no title.

Answers: text, ``toolUse`` and ``reasoningContent`` blocks map back (reasoning → ``thinking`` with its
signature, redacted reasoning → ``redacted_thinking``); ``guardrail_intervened`` and
``content_filtered`` stop reasons become ``refusal``. Bedrock's ``inputTokens`` leave out cache reads
and writes, as Anthropic's ``input_tokens`` do, so the counts map one to one.

Streams come as ``application/vnd.amazon.eventstream`` frames (see ``eventstream``). ``message_start``
goes out before Bedrock reports usage (its ``metadata`` event comes last), so it carries zero counts and
the final ``message_delta`` carries all four, which the SDK and the usage tracker take as totals. A
Bedrock exception frame becomes an Anthropic ``error`` event (the provider's own error, not a
translation failure); a corrupt frame or an event that cannot be read ends the stream with the
untranslatable ``error`` event and sets ``failure``; a stream that ends before ``messageStop`` ends with
an ``error`` event, never silently.
"""

from __future__ import annotations

import base64
import contextlib
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from extproc.translate import TranslationError, _anthropic, _fields
from extproc.translate._anthropic import untranslatable_body, untranslatable_event
from extproc.translate.eventstream import EventStreamDecoder, EventStreamError, Message

__all__ = [
    "StreamTranslator",
    "canonical_request",
    "error",
    "request",
    "response",
    "untranslatable_body",
    "untranslatable_event",
]

_API: Final = "the Bedrock Converse API"

_DROPPED: Final = frozenset(("service_tier", "stream"))
_KNOWN: Final = _anthropic.REQUEST_FIELDS | {"top_k"} | _DROPPED

_IMAGE_FORMATS: Final = {"image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif", "image/webp": "webp"}
# Converse's document names: alphanumerics, single whitespace, hyphens, parentheses, square brackets
# (ASCII only here: Converse does not say whether its "alphanumeric" takes other scripts).
_NAME_DISALLOWED: Final = re.compile(r"[^A-Za-z0-9\s\-()\[\]]", re.ASCII)
_MAX_NAME: Final = 200

_STOP_REASONS: Final = {
    "end_turn": "end_turn",
    "tool_use": "tool_use",
    "max_tokens": "max_tokens",
    "stop_sequence": "stop_sequence",
    "guardrail_intervened": "refusal",
    "content_filtered": "refusal",
    "model_context_window_exceeded": "model_context_window_exceeded",
}

# HTTP status → Anthropic error type; Bedrock's bodies carry only a message.
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "api_error",
    424: "api_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}

# ConverseStream exception frames (``:exception-type``) → Anthropic error type; the rest are api_error.
_EXCEPTION_TYPES: Final = {
    "throttlingException": "rate_limit_error",
    "serviceUnavailableException": "overloaded_error",
    "validationException": "invalid_request_error",
}

_UNTRANSLATABLE_MESSAGE: Final = _anthropic.UNTRANSLATABLE_ANTHROPIC


# ---------------------------------------------------------------------------------------------------
# request


def request(body: dict[str, Any], *, model: str) -> dict[str, Any]:
    """Canonical (Anthropic Messages) request → Converse request body for the Bedrock model ``model``.

    Every field read is type-checked; a wrong type or a feature Converse cannot express raises
    :class:`TranslationError` naming the field (with Anthropic's dotted paths: ``messages.0.content``).
    """
    if not isinstance(body, dict):
        raise TranslationError("the request body must be a JSON object")
    _refuse_unsupported(body)
    thinking = _thinking(body.get("thinking"), model)
    out: dict[str, Any] = {"messages": _messages(body.get("messages"), keep_thinking=thinking is not None)}
    system = _system(body.get("system"))
    if system:
        out["system"] = system
    config = _inference_config(body)
    if config:
        out["inferenceConfig"] = config
    tool_config = _tool_config(body)
    if tool_config:
        out["toolConfig"] = tool_config
    elif _has_tool_blocks(out["messages"]):
        # Converse refuses tool blocks without toolConfig, and has no tool choice that forbids tool calls.
        raise TranslationError(
            f"{_API} needs the tools sent along when messages hold tool_use or tool_result blocks"
            " (no 'tools', or 'tool_choice' none, leaves them out)"
        )
    extra = _additional_fields(body, thinking)
    if extra:
        out["additionalModelRequestFields"] = extra
    return out


def _refuse_unsupported(body: dict[str, Any]) -> None:
    _fields.only(body, _KNOWN, "", f"cannot be translated to {_API}")
    _fields.optional_bool(body, "stream")
    metadata = body.get("metadata")
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise _fields.wrong("metadata", "an object")
    for key, value in metadata.items():
        if key != "user_id" and value is not None:
            raise TranslationError(f"'metadata.{key}' cannot be translated to {_API}")
    # user_id only labels the caller for abuse tracking: Converse has nowhere to put it, and the answer
    # does not depend on it, so it is dropped (after the type check Anthropic would make).
    _fields.optional_str(metadata, "user_id", "metadata")


def _thinking(thinking: Any, model: str) -> dict[str, Any] | None:
    """The ``thinking`` object to pass on, or None when thinking is off."""
    if thinking is None:
        return None
    checked, kind = _fields.typed(thinking, "thinking")
    if kind == "disabled":
        return None
    # Only Anthropic's models on Bedrock read Anthropic's thinking object (the model ids, inference
    # profiles and their ARNs all name the vendor); other families spell reasoning their own way.
    if "anthropic." not in model:
        raise TranslationError(f"extended 'thinking' cannot be served by the Bedrock model {_fields.shown(model)}")
    _fields.writable(checked, "thinking")
    return checked


def _additional_fields(body: dict[str, Any], thinking: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    top_k = body.get("top_k")
    if top_k is not None:
        out["top_k"] = _fields.integer(top_k, "top_k", 0)
    if thinking is not None:
        out["thinking"] = thinking
    return out


def _inference_config(body: dict[str, Any]) -> dict[str, Any]:
    out = _anthropic.sampling_config(body, "maxTokens", "topP")
    stop = body.get("stop_sequences")
    if stop is not None:
        # Converse refuses empty stop sequences; an empty one never matches anyway.
        stop = [item for item in _fields.strings(stop, "stop_sequences") if item]
        if stop:
            out["stopSequences"] = stop
    return out


def _system(system: Any) -> list[dict[str, Any]]:
    """Text blocks; blank ones are dropped, as Converse refuses them."""
    if system is None:
        return []
    return [{"text": text} for text in _anthropic.system_texts(system) if text.strip()]


def _messages(raw: Any, *, keep_thinking: bool) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(_anthropic.turns(raw)):
        role, blocks = _turn(message, index, keep_thinking)
        if not blocks:
            continue  # Converse refuses a turn without content
        if turns and turns[-1]["role"] == role:
            # Converse wants the roles to alternate; Anthropic merges consecutive turns of one role itself.
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise TranslationError("'messages' hold no content")
    return turns


def _turn(message: Any, index: int, keep_thinking: bool) -> tuple[str, list[dict[str, Any]]]:
    role, content = _anthropic.turn(message, index)
    content, where = _anthropic.content_blocks(content, index)
    blocks = [_content_block(content, position, where, keep_thinking) for position in range(len(content))]
    return role, [block for block in blocks if block is not None]


def _content_block(content: list[Any], position: int, where: str, keep_thinking: bool) -> dict[str, Any] | None:
    """One Anthropic content block → its Converse block, or None for a block that is dropped."""
    block, kind = _anthropic.block(content, position, where)
    at = f"{where}.{position}"
    if kind == "text":
        text = _fields.string(block, "text", at)
        return {"text": text} if text.strip() else None
    if kind == "image":
        return _image(block, at)
    if kind == "document":
        return _document(block, at)
    if kind == "tool_use":
        return _tool_use(block, at)
    if kind == "tool_result":
        return _tool_result(block, at)
    if kind == "thinking":
        if not keep_thinking:
            return None
        text, signature = _fields.string(block, "thinking", at), _fields.string(block, "signature", at)
        return {"reasoningContent": {"reasoningText": {"text": text, "signature": signature}}}
    if kind == "redacted_thinking":
        return {"reasoningContent": {"redactedContent": _fields.string(block, "data", at)}} if keep_thinking else None
    raise TranslationError(f"'{where}' block type {_fields.shown(kind)} cannot be translated to {_API}")


def _image(block: dict[str, Any], at: str) -> dict[str, Any]:
    source = _anthropic.source(block, at)
    kind = source.get("type")
    if kind == "url":
        raise TranslationError(f"'{at}' is an image URL: {_API} takes images as base64 data only")
    if kind != "base64":
        shown = _fields.shown(kind) if isinstance(kind, str) else "without a type"
        raise TranslationError(f"'{at}' image source {shown} cannot be translated to {_API}")
    media_type = _fields.string(source, "media_type", f"{at}.source")
    image_format = _IMAGE_FORMATS.get(media_type)
    if image_format is None:
        raise TranslationError(f"'{at}' image type {_fields.shown(media_type)} is not supported by {_API}")
    # The JSON form of Converse carries bytes as base64 text, so Anthropic's data passes as it is.
    return {"image": {"format": image_format, "source": {"bytes": _fields.string(source, "data", f"{at}.source")}}}


def _document(block: dict[str, Any], at: str) -> dict[str, Any]:
    source = _anthropic.source(block, at)
    if source.get("type") != "base64" or source.get("media_type") != "application/pdf":
        raise TranslationError(f"'{at}': only base64 PDF documents can be translated to {_API}")
    citations = block.get("citations")
    if isinstance(citations, dict) and citations.get("enabled"):
        raise TranslationError(f"'{at}': document citations cannot be translated to {_API}")
    title = _fields.optional_str(block, "title", at)
    document: dict[str, Any] = {
        "format": "pdf",
        "name": _document_name(title) or "document " + at.replace(".", " "),
        "source": {"bytes": _fields.string(source, "data", f"{at}.source")},
    }
    context = _fields.optional_str(block, "context", at)
    if context is not None:
        document["context"] = context
    return {"document": document}


def _document_name(title: str | None) -> str:
    """A title reduced to what Converse allows in a document name ("" when nothing is left)."""
    if not title:
        return ""
    return " ".join(_NAME_DISALLOWED.sub(" ", title).split())[:_MAX_NAME].strip()


def _tool_use(block: dict[str, Any], at: str) -> dict[str, Any]:
    tool_input = _anthropic.tool_use_input(block, at)
    tool_id, name = _fields.string(block, "id", at), _fields.string(block, "name", at)
    return {"toolUse": {"toolUseId": tool_id, "name": name, "input": tool_input}}


def _tool_result(block: dict[str, Any], at: str) -> dict[str, Any]:
    tool_id = _fields.string(block, "tool_use_id", at)
    result: dict[str, Any] = {"toolUseId": tool_id, "content": _result_content(block, at)}
    if _fields.optional_bool(block, "is_error", at):
        result["status"] = "error"
    return {"toolResult": result}


def _result_content(block: dict[str, Any], at: str) -> list[dict[str, Any]]:
    """A tool result's content as Converse tool-result blocks; blank text is dropped, as Converse refuses it."""
    content = block.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content.strip() else []
    where = f"{at}.content"
    if not isinstance(content, list):
        raise _fields.wrong(where, "a string or an array")
    out: list[dict[str, Any]] = []
    for position in range(len(content)):
        part, kind = _anthropic.block(content, position, where)
        part_at = f"{where}.{position}"
        if kind == "text":
            text = _fields.string(part, "text", part_at)
            if text.strip():
                out.append({"text": text})
        elif kind == "image":
            out.append(_image(part, part_at))
        elif kind == "document":
            out.append(_document(part, part_at))
        else:
            raise TranslationError(f"'{where}' block type {_fields.shown(kind)} cannot be translated to {_API}")
    return out


def _has_tool_blocks(turns: list[dict[str, Any]]) -> bool:
    return any("toolUse" in block or "toolResult" in block for turn in turns for block in turn["content"])


def _tool_config(body: dict[str, Any]) -> dict[str, Any]:
    """``toolConfig`` from ``tools`` and ``tool_choice``; empty when there are no tools to send."""
    tools = body.get("tools")
    if tools is None:
        tools = []
    elif not isinstance(tools, list):
        raise _fields.wrong("tools", "an array")
    specs = [_tool(tool, index) for index, tool in enumerate(tools)]
    choice = _tool_choice(body.get("tool_choice"))
    if choice == "none" or not specs:
        if isinstance(choice, dict) and "auto" not in choice:
            raise TranslationError(f"'tool_choice' {next(iter(choice))!r} needs tools")
        return {}
    out: dict[str, Any] = {"tools": specs}
    if isinstance(choice, dict):
        out["toolChoice"] = choice
    return out


def _tool(tool: Any, index: int) -> dict[str, Any]:
    where = f"tools.{index}"
    tool = _anthropic.client_tool(tool, where, f"cannot be translated to {_API}")
    name, description, schema = _anthropic.tool_definition(tool, where)
    spec: dict[str, Any] = {"name": name}
    if description:  # Converse refuses an empty description
        spec["description"] = description
    spec["inputSchema"] = {"json": schema}
    return {"toolSpec": spec}


def _tool_choice(choice: Any) -> dict[str, Any] | str | None:
    """Converse's ``toolChoice``; ``"none"`` for Anthropic's none (tools left out), None when not given."""
    if choice is None:
        return None
    if not isinstance(choice, dict):
        raise _fields.wrong("tool_choice", "an object")
    if _fields.optional_bool(choice, "disable_parallel_tool_use", "tool_choice"):
        raise TranslationError(f"'tool_choice.disable_parallel_tool_use' cannot be translated to {_API}")
    kind = choice.get("type")
    if kind == "none":
        return "none"
    if kind in ("auto", "any"):
        return {kind: {}}
    if kind == "tool":
        return {"tool": {"name": _fields.string(choice, "name", "tool_choice")}}
    if isinstance(kind, str):
        raise TranslationError(f"'tool_choice' type {_fields.shown(kind)} cannot be translated to {_API}")
    raise _fields.wrong("tool_choice.type", "a string")


# ---------------------------------------------------------------------------------------------------
# a Converse request read back (a fallback hop's body → canonical)


_CANNOT_READ: Final = f"cannot be translated from {_API}"
_CONVERSE_FIELDS: Final = frozenset(
    ("messages", "system", "inferenceConfig", "toolConfig", "additionalModelRequestFields")
)
_MEDIA_TYPES: Final = {image_format: media_type for media_type, image_format in _IMAGE_FORMATS.items()}
# The name ``_document`` gives an untitled document (its position, as Converse requires a name).
_POSITION_NAME: Final = re.compile(r"document messages \d+ content \d+(?: content \d+)?", re.ASCII)


def canonical_request(body: dict[str, Any], *, model: str, stream: bool, default_max_tokens: int) -> dict[str, Any]:
    """Converse request body → canonical (Anthropic Messages) request for ``model``: ``request`` undone.

    ``stream`` is the call's flag (Converse says it in the path, not the body); ``default_max_tokens``
    stands in when ``inferenceConfig.maxTokens`` is not set. A field, block or shape this cannot read
    back raises :class:`TranslationError` naming the field (with Converse's dotted paths).
    """
    if not isinstance(body, dict):
        raise TranslationError("the request body must be a JSON object")
    _fields.only(body, _CONVERSE_FIELDS, "", _CANNOT_READ, 100)
    out: dict[str, Any] = {"model": model, "messages": _read_messages(body.get("messages"))}
    system = _read_system(body.get("system"))
    if system is not None:
        out["system"] = system
    out.update(_read_inference_config(body.get("inferenceConfig"), default_max_tokens))
    out.update(_read_additional_fields(body.get("additionalModelRequestFields")))
    out.update(_read_tool_config(body.get("toolConfig")))
    if stream:
        out["stream"] = True
    return out


def _unreadable(at: str, key: Any) -> TranslationError:
    where = f"{at}.{key}" if at else str(key)
    return TranslationError(f"{_fields.shown(where, 100)} {_CANNOT_READ}")


def _object(value: Any, at: str, known: tuple[str, ...]) -> dict[str, Any]:
    """The object at ``at``, refusing a key (not null) this module does not read."""
    if not isinstance(value, dict):
        raise _fields.wrong(at, "an object")
    _fields.only(value, known, at, _CANNOT_READ, 100)
    return value


def _member(union: Any, at: str) -> tuple[str, Any]:
    """The one key and value of a Converse union (a content block, a tool, a tool choice)."""
    if not isinstance(union, dict) or len(union) != 1:
        raise _fields.wrong(at, "an object with exactly one key")
    ((key, value),) = union.items()
    return str(key), value


def _read_messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise _fields.wrong("messages", "a non-empty array")
    return [_read_turn(message, f"messages.{index}") for index, message in enumerate(raw)]


def _read_turn(message: Any, at: str) -> dict[str, Any]:
    message = _object(message, at, ("role", "content"))
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise _fields.wrong(f"{at}.role", "'user' or 'assistant'")
    content = message.get("content")
    where = f"{at}.content"
    if not isinstance(content, list):
        raise _fields.wrong(where, "an array")
    return {"role": role, "content": [_read_block(block, f"{where}.{index}") for index, block in enumerate(content)]}


def _read_block(block: Any, at: str) -> dict[str, Any]:
    kind, value = _member(block, at)
    if kind == "text":
        return {"type": "text", "text": _read_value_str(value, f"{at}.text")}
    if kind == "image":
        return _read_image(value, f"{at}.image")
    if kind == "document":
        return _read_document(value, f"{at}.document")
    if kind == "toolUse":
        return _read_tool_use(value, f"{at}.toolUse")
    if kind == "toolResult":
        return _read_tool_result(value, f"{at}.toolResult")
    if kind == "reasoningContent":
        return _read_reasoning(value, f"{at}.reasoningContent")
    raise _unreadable(at, kind)


def _read_value_str(value: Any, at: str) -> str:
    if not isinstance(value, str):
        raise _fields.wrong(at, "a string")
    return value


def _read_bytes(holder: dict[str, Any], at: str) -> str:
    """The base64 text of a ``source`` (the JSON form of Converse carries bytes as base64)."""
    source = _object(holder.get("source"), f"{at}.source", ("bytes",))
    return _fields.string(source, "bytes", f"{at}.source")


def _read_image(image: Any, at: str) -> dict[str, Any]:
    image = _object(image, at, ("format", "source"))
    image_format = _fields.string(image, "format", at)
    media_type = _MEDIA_TYPES.get(image_format)
    if media_type is None:
        raise TranslationError(f"'{at}.format' {_fields.shown(image_format)} cannot be translated from {_API}")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": _read_bytes(image, at)}}


def _read_document(document: Any, at: str) -> dict[str, Any]:
    document = _object(document, at, ("format", "name", "source", "context"))
    if document.get("format") != "pdf":
        raise TranslationError(f"'{at}.format': only PDF documents can be translated from {_API}")
    source = {"type": "base64", "media_type": "application/pdf", "data": _read_bytes(document, at)}
    out: dict[str, Any] = {"type": "document", "source": source}
    name = _fields.string(document, "name", at)
    if not _POSITION_NAME.fullmatch(name):  # a name ``request`` made up for an untitled document is no title
        out["title"] = name
    context = _fields.optional_str(document, "context", at)
    if context is not None:
        out["context"] = context
    return out


def _read_tool_use(tool: Any, at: str) -> dict[str, Any]:
    tool = _object(tool, at, ("toolUseId", "name", "input"))
    tool_id, name = _fields.string(tool, "toolUseId", at), _fields.string(tool, "name", at)
    tool_input = tool.get("input")
    if not isinstance(tool_input, dict):
        raise _fields.wrong(f"{at}.input", "an object")
    _fields.writable(tool_input, f"{at}.input")
    return {"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}


def _read_tool_result(result: Any, at: str) -> dict[str, Any]:
    result = _object(result, at, ("toolUseId", "content", "status"))
    out: dict[str, Any] = {"type": "tool_result", "tool_use_id": _fields.string(result, "toolUseId", at)}
    content = result.get("content")
    if not isinstance(content, list):
        raise _fields.wrong(f"{at}.content", "an array")
    if content:
        out["content"] = [_read_result_block(part, f"{at}.content.{index}") for index, part in enumerate(content)]
    status = result.get("status")
    if status == "error":
        out["is_error"] = True
    elif status not in (None, "success"):
        raise _fields.wrong(f"{at}.status", "'success' or 'error'")
    return out


def _read_result_block(part: Any, at: str) -> dict[str, Any]:
    kind, value = _member(part, at)
    if kind == "text":
        return {"type": "text", "text": _read_value_str(value, f"{at}.text")}
    if kind == "image":
        return _read_image(value, f"{at}.image")
    if kind == "document":
        return _read_document(value, f"{at}.document")
    raise _unreadable(at, kind)


def _read_reasoning(reasoning: Any, at: str) -> dict[str, Any]:
    kind, value = _member(reasoning, at)
    if kind == "redactedContent":
        return {"type": "redacted_thinking", "data": _read_value_str(value, f"{at}.redactedContent")}
    if kind != "reasoningText":
        raise _unreadable(at, kind)
    text = _object(value, f"{at}.reasoningText", ("text", "signature"))
    thinking = _fields.string(text, "text", f"{at}.reasoningText")
    signature = _fields.optional_str(text, "signature", f"{at}.reasoningText")
    return {"type": "thinking", "thinking": thinking, "signature": signature or ""}


def _read_system(system: Any) -> str | list[dict[str, Any]] | None:
    """One text block reads as a string (how a string system prompt was sent), several as text blocks."""
    if system is None:
        return None
    if not isinstance(system, list):
        raise _fields.wrong("system", "an array")
    texts: list[str] = []
    for position, block in enumerate(system):
        at = f"system.{position}"
        kind, value = _member(block, at)
        if kind != "text":
            raise _unreadable(at, kind)
        texts.append(_read_value_str(value, f"{at}.text"))
    return _anthropic.system_of(texts)


def _read_inference_config(config: Any, default_max_tokens: int) -> dict[str, Any]:
    at = "inferenceConfig"
    config = _object({} if config is None else config, at, ("maxTokens", "temperature", "topP", "stopSequences"))
    max_tokens = config.get("maxTokens")
    out: dict[str, Any] = {
        "max_tokens": default_max_tokens if max_tokens is None else _fields.max_tokens(max_tokens, f"{at}.maxTokens")
    }
    out.update(_fields.numbers(config, (("temperature", "temperature"), ("topP", "top_p")), at))
    stop = config.get("stopSequences")
    if stop is not None and _fields.strings(stop, f"{at}.stopSequences"):
        out["stop_sequences"] = stop
    return out


def _read_additional_fields(extra: Any) -> dict[str, Any]:
    """``top_k`` and Anthropic's ``thinking``: the only model-specific fields ``request`` writes."""
    if extra is None:
        return {}
    at = "additionalModelRequestFields"
    extra = _object(extra, at, ("top_k", "thinking"))
    out: dict[str, Any] = {}
    top_k = extra.get("top_k")
    if top_k is not None:
        out["top_k"] = _fields.integer(top_k, f"{at}.top_k", 0)
    thinking = extra.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or not isinstance(thinking.get("type"), str):
            raise _fields.wrong(f"{at}.thinking", "an object with a string 'type'")
        _fields.writable(thinking, f"{at}.thinking")
        out["thinking"] = thinking
    return out


def _read_tool_config(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    at = "toolConfig"
    config = _object(config, at, ("tools", "toolChoice"))
    tools = config.get("tools")
    if not isinstance(tools, list) or not tools:
        raise _fields.wrong(f"{at}.tools", "a non-empty array")
    out: dict[str, Any] = {"tools": [_read_tool(tool, f"{at}.tools.{index}") for index, tool in enumerate(tools)]}
    choice = config.get("toolChoice")
    if choice is not None:
        out["tool_choice"] = _read_tool_choice(choice, f"{at}.toolChoice")
    return out


def _read_tool(tool: Any, at: str) -> dict[str, Any]:
    kind, value = _member(tool, at)
    if kind != "toolSpec":
        raise _unreadable(at, kind)
    at = f"{at}.toolSpec"
    spec = _object(value, at, ("name", "description", "inputSchema"))
    out: dict[str, Any] = {"name": _fields.string(spec, "name", at)}
    description = _fields.optional_str(spec, "description", at)
    if description is not None:
        out["description"] = description
    schema = _object(spec.get("inputSchema"), f"{at}.inputSchema", ("json",)).get("json")
    if not isinstance(schema, dict):
        raise _fields.wrong(f"{at}.inputSchema.json", "an object")
    _fields.writable(schema, f"{at}.inputSchema.json")
    out["input_schema"] = schema
    return out


def _read_tool_choice(choice: Any, at: str) -> dict[str, Any]:
    kind, value = _member(choice, at)
    if kind in ("auto", "any"):
        _object(value, f"{at}.{kind}", ())
        return {"type": kind}
    if kind == "tool":
        tool = _object(value, f"{at}.tool", ("name",))
        return {"type": "tool", "name": _fields.string(tool, "name", f"{at}.tool")}
    raise _unreadable(at, kind)


# ---------------------------------------------------------------------------------------------------
# response and error


def message_id() -> str:
    """A fresh Anthropic message id: Bedrock's answers carry none (its request id is only a header)."""
    return "msg_bdrk_" + uuid.uuid4().hex


def stop_reason(reason: Any) -> str:
    """Converse's stop reason → Anthropic's; one Anthropic has no word for (a malformed output) reads as end_turn."""
    return _STOP_REASONS.get(reason, "end_turn") if isinstance(reason, str) else "end_turn"


def usage(raw: Any) -> dict[str, int]:
    """Converse usage → Anthropic usage. Both leave cache reads and writes out of the input count."""
    if not isinstance(raw, dict):
        raw = {}
    return {
        "input_tokens": _fields.count(raw.get("inputTokens")),
        "output_tokens": _fields.count(raw.get("outputTokens")),
        "cache_read_input_tokens": _fields.count(raw.get("cacheReadInputTokens")),
        "cache_creation_input_tokens": _fields.count(raw.get("cacheWriteInputTokens")),
    }


def response(body: Any, *, requested_model: str) -> dict[str, Any]:
    """Converse answer → Anthropic message, as if ``requested_model`` had answered.

    Content of the wrong shape raises :class:`TranslationError` (the answer cannot be passed on); a
    stop reason or usage of the wrong type is defaulted, as it does not change the answer.
    """
    if not isinstance(body, dict):
        raise TranslationError("the answer is not a JSON object")
    output = body.get("output")
    message = output.get("message") if isinstance(output, dict) else None
    if not isinstance(message, dict):
        raise TranslationError("'output.message' is not an object")
    content = message.get("content")
    if content is None:
        content = []
    elif not isinstance(content, list):
        raise TranslationError("'output.message.content' is not an array")
    blocks = [_answer_block(block, position) for position, block in enumerate(content)]
    reason = stop_reason(body.get("stopReason"))
    return _anthropic.message_object(message_id(), requested_model, blocks, reason, usage(body.get("usage")))


def _answer_block(block: Any, position: int) -> dict[str, Any]:
    at = f"output.message.content.{position}"
    if not isinstance(block, dict):
        raise TranslationError(f"'{at}' is not an object")
    if "text" in block:
        return {"type": "text", "text": _answer_str(block, "text", at)}
    if "toolUse" in block:
        tool = _answer_object(block, "toolUse", at)
        tool_input = tool.get("input")
        if tool_input is None:
            tool_input = {}
        elif not isinstance(tool_input, dict):
            # Anthropic's tool_use input is an object by contract; a client could not use anything else.
            raise TranslationError(f"'{at}.toolUse.input' is not an object")
        tool_id, name = _answer_str(tool, "toolUseId", f"{at}.toolUse"), _answer_str(tool, "name", f"{at}.toolUse")
        return {"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}
    if "reasoningContent" in block:
        return _reasoning(_answer_object(block, "reasoningContent", at), f"{at}.reasoningContent")
    kinds = ", ".join(repr(key) for key in block)
    raise TranslationError(f"'{at}' is a block Anthropic has no counterpart for ({kinds})")


def _reasoning(reasoning: dict[str, Any], at: str) -> dict[str, Any]:
    if "redactedContent" in reasoning:
        return {"type": "redacted_thinking", "data": _answer_str(reasoning, "redactedContent", at)}
    text = _answer_object(reasoning, "reasoningText", at)
    signature = text.get("signature")
    if signature is not None and not isinstance(signature, str):
        raise TranslationError(f"'{at}.reasoningText.signature' is not a string")
    thinking = _answer_str(text, "text", f"{at}.reasoningText")
    return {"type": "thinking", "thinking": thinking, "signature": signature or ""}


def _answer_str(block: dict[str, Any], key: str, at: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise TranslationError(f"'{at}.{key}' is not a string")
    return value


def _answer_object(block: dict[str, Any], key: str, at: str) -> dict[str, Any]:
    value = block.get(key)
    if not isinstance(value, dict):
        raise TranslationError(f"'{at}.{key}' is not an object")
    return value


def error(status: int, body: bytes) -> bytes:
    """Bedrock error body → Anthropic error body (the status is passed through by the caller).

    Never raises: a body that is not Bedrock's ``{"message": ...}`` gives a message naming the status.
    """
    return _anthropic.provider_error(status, body, _anthropic.status_error_type(status, _ERROR_TYPES), _error_message)


def _error_message(parsed: Any) -> str | None:
    """The message of a Bedrock error body; AWS spells the key ``message`` or ``Message``."""
    if not isinstance(parsed, dict):
        return None
    for key in ("message", "Message"):
        message = parsed.get(key)
        if isinstance(message, str) and message:
            return message
    return None


# ---------------------------------------------------------------------------------------------------
# streaming


@dataclass
class _Block:
    """An open content block: its Anthropic kind and index (None until its start event went out)."""

    kind: str  # "text", "tool_use", "thinking" or "redacted_thinking"
    index: int | None
    redacted: bytearray = field(default_factory=bytearray)


class StreamTranslator:
    """ConverseStream (``application/vnd.amazon.eventstream``) → Anthropic Messages SSE, frame by frame.

    Converse numbers its content blocks (``contentBlockIndex``); Anthropic's indexes are given in the
    order the blocks open, which is the order the SDK appends them in. A text or reasoning block has no
    ``contentBlockStart``: its first delta opens it. A redacted reasoning block goes out whole when it
    stops, as Anthropic's ``redacted_thinking`` has no delta. ``message_delta`` and ``message_stop`` wait
    until both ``messageStop`` (the stop reason) and ``metadata`` (the usage) have arrived.

    ``feed`` and ``finish`` never raise on the provider's bytes: a frame that cannot be read ends the
    stream with an ``error`` event after the events already sent, and ``failure`` says why.
    """

    def __init__(self, *, requested_model: str) -> None:
        self._model = requested_model
        self._decoder = EventStreamDecoder()
        self._id = message_id()
        self._started = False
        self._blocks: dict[int, _Block] = {}  # Converse contentBlockIndex → open block
        self._closed: set[int] = set()  # Converse indexes of blocks already stopped
        self._next_index = 0
        self._stop: str | None = None
        self._usage: dict[str, int] | None = None
        self._ended = False
        self.failure: str | None = None  # why the stream could not be translated, if it could not
        self._handlers: dict[str, Callable[[dict[str, Any]], list[bytes]]] = {
            "messageStart": self._message_start,
            "contentBlockStart": self._block_start,
            "contentBlockDelta": self._block_delta,
            "contentBlockStop": self._block_stop,
            "messageStop": self._message_stop,
            "metadata": self._metadata,
        }

    @property
    def complete(self) -> bool:
        """True once the stream ended cleanly or with an error event the client has already seen."""
        return self._ended

    def feed(self, chunk: bytes) -> bytes:
        if self._ended:
            return b""
        try:
            messages = self._decoder.feed(chunk)
        except EventStreamError as exc:
            # The frames before the corrupt one still go out, then the stream ends.
            return self._translate(exc.messages, corrupt=exc.message)
        return self._translate(messages)

    def finish(self) -> bytes:
        """End of the provider's stream: the end of the message if Bedrock said it stopped, else an error."""
        if self._ended:
            return b""
        with contextlib.suppress(EventStreamError):  # a frame cut short: what counts is whether messageStop came
            self._decoder.finish()
        if self._stop is not None:
            return b"".join(self._end())  # metadata (usage) missing: the end goes out with what is known
        self._ended = True
        return _anthropic.error_event("api_error", _anthropic.CUT_MESSAGE)

    def _translate(self, messages: list[Message], *, corrupt: str | None = None) -> bytes:
        """The events of decoded frames; ``corrupt`` is why the frame after them could not be decoded."""
        out: list[bytes] = []
        for message in messages:
            if self._ended:
                break
            try:
                out.extend(self._message(message))
            except TranslationError as exc:
                # What this frame would have added is dropped whole; what went out before stays.
                out.append(self._fail(exc.message))
        if corrupt is not None and not self._ended:
            out.append(self._fail(f"the provider's event stream is corrupt: {corrupt}"))
        return b"".join(out)

    def _fail(self, reason: str) -> bytes:
        self.failure = reason
        self._ended = True
        return untranslatable_event()

    def _message(self, message: Message) -> list[bytes]:
        kind = message.header(":message-type")
        if kind == "event":
            handler = self._handlers.get(message.header(":event-type") or "")
            # Events this module does not know carry no content it could lose (AWS adds such events).
            return handler(_payload(message)) if handler is not None else []
        if kind == "exception":
            return self._exception(message.header(":exception-type") or "", _payload(message, strict=False))
        if kind == "error":
            # The event-stream protocol's own error frames carry their message in headers.
            return self._provider_error("api_error", message.header(":error-message"))
        raise TranslationError(f"a frame of message type {_fields.shown(str(kind))} cannot be translated")

    def _exception(self, exception_type: str, payload: dict[str, Any]) -> list[bytes]:
        message = _error_message(payload)
        return self._provider_error(_EXCEPTION_TYPES.get(exception_type, "api_error"), message)

    def _provider_error(self, err_type: str, message: str | None) -> list[bytes]:
        """The provider's own error, passed on as such (not a translation failure); the stream ends."""
        self._ended = True
        return [_anthropic.error_event(err_type, message or _anthropic.PROVIDER_ERROR_MESSAGE)]

    def _start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        return [_anthropic.message_start_event(self._id, self._model, {"input_tokens": 0, "output_tokens": 0})]

    def _message_start(self, payload: dict[str, Any]) -> list[bytes]:
        role = payload.get("role")
        if role is not None and role != "assistant":
            raise TranslationError(f"a messageStart event's role {_fields.shown(str(role))} is not assistant")
        return self._start()

    def _block_start(self, payload: dict[str, Any]) -> list[bytes]:
        position = _index(payload, "contentBlockStart")
        start = _anthropic.event_object(payload, "start", "contentBlockStart")
        tool = start.get("toolUse")
        if not isinstance(tool, dict):
            kinds = ", ".join(repr(key) for key in start)
            raise TranslationError(f"a contentBlockStart event starts a block that cannot be translated ({kinds})")
        tool_id, name = tool.get("toolUseId"), tool.get("name")
        if not isinstance(tool_id, str) or not isinstance(name, str):
            raise TranslationError("a contentBlockStart event's toolUse has no string toolUseId and name")
        content_block = {"type": "tool_use", "id": tool_id, "name": name, "input": {}}
        return self._open(position, "tool_use", content_block)

    def _open(self, position: int, kind: str, content_block: dict[str, Any]) -> list[bytes]:
        if position in self._blocks or position in self._closed:
            raise TranslationError(f"content block {position} is started twice")
        out = self._start()
        block = self._blocks[position] = _Block(kind, None)
        if kind != "redacted_thinking":
            out.append(self._start_event(block, content_block))
        return out

    def _start_event(self, block: _Block, content_block: dict[str, Any]) -> bytes:
        block.index, self._next_index = self._next_index, self._next_index + 1
        return _anthropic.block_start_event(block.index, content_block)

    def _block_delta(self, payload: dict[str, Any]) -> list[bytes]:
        position = _index(payload, "contentBlockDelta")
        delta = _anthropic.event_object(payload, "delta", "contentBlockDelta")
        anthropic_delta: dict[str, Any]
        if "text" in delta:
            kind, anthropic_delta = "text", {"type": "text_delta", "text": _delta_str(delta, "text")}
        elif "toolUse" in delta:
            tool = _anthropic.event_object(delta, "toolUse", "contentBlockDelta")
            kind, anthropic_delta = "tool_use", {"type": "input_json_delta", "partial_json": _delta_str(tool, "input")}
        elif "reasoningContent" in delta:
            reasoning = _anthropic.event_object(delta, "reasoningContent", "contentBlockDelta")
            kind, anthropic_delta = _reasoning_delta(reasoning)
        else:
            kinds = ", ".join(repr(key) for key in delta)
            raise TranslationError(f"a contentBlockDelta event holds a delta that cannot be translated ({kinds})")
        if position in self._closed:
            raise TranslationError(f"a delta arrived for content block {position} after it stopped")
        # A tool_use block is opened by its contentBlockStart; the others by their first delta.
        out = [] if position in self._blocks or kind == "tool_use" else self._open(position, kind, _EMPTY[kind])
        block = self._blocks.get(position)
        if block is None or block.kind != kind:
            raise TranslationError(f"a {kind} delta arrived for content block {position}, which is not one")
        if kind == "redacted_thinking":
            block.redacted += anthropic_delta["data"]
        elif anthropic_delta.get("text") != "":  # an empty text delta (which opens a block) adds nothing
            out.append(_anthropic.block_delta_event(block.index, anthropic_delta))
        return out

    def _block_stop(self, payload: dict[str, Any]) -> list[bytes]:
        position = _index(payload, "contentBlockStop")
        if position not in self._blocks:
            raise TranslationError(f"content block {position} is stopped but was never started")
        return self._close(position)

    def _close(self, position: int) -> list[bytes]:
        block = self._blocks.pop(position)
        self._closed.add(position)
        out: list[bytes] = []
        if block.kind == "redacted_thinking":
            data = base64.b64encode(bytes(block.redacted)).decode()
            out.append(self._start_event(block, {"type": "redacted_thinking", "data": data}))
        out.append(_anthropic.block_stop_event(block.index))
        return out

    def _message_stop(self, payload: dict[str, Any]) -> list[bytes]:
        out = self._start()
        for position in sorted(self._blocks):  # Converse stops every block first; should it not, close them
            out.extend(self._close(position))
        self._stop = stop_reason(payload.get("stopReason"))
        if self._usage is not None:
            out.extend(self._end())
        return out

    def _metadata(self, payload: dict[str, Any]) -> list[bytes]:
        self._usage = usage(payload.get("usage"))
        return self._end() if self._stop is not None else []

    def _end(self) -> list[bytes]:
        self._ended = True
        out = self._start()
        out.extend(_anthropic.message_end_events(self._stop, self._usage or usage(None)))
        return out


# The content_block_start of a block Converse opens with its first delta.
_EMPTY: Final[dict[str, dict[str, Any]]] = {
    "text": {"type": "text", "text": ""},
    "thinking": {"type": "thinking", "thinking": "", "signature": ""},
    "redacted_thinking": {},  # goes out whole when the block stops
}


def _reasoning_delta(reasoning: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(block kind, Anthropic delta) of a reasoningContent delta; a redacted one's ``data`` is its bytes."""
    if "text" in reasoning:
        return "thinking", {"type": "thinking_delta", "thinking": _delta_str(reasoning, "text")}
    if "signature" in reasoning:
        return "thinking", {"type": "signature_delta", "signature": _delta_str(reasoning, "signature")}
    if "redactedContent" in reasoning:
        try:
            data = base64.b64decode(_delta_str(reasoning, "redactedContent"), validate=True)
        except ValueError:  # binascii.Error, or a string that is not even ASCII
            raise TranslationError("a redactedContent delta is not base64") from None
        return "redacted_thinking", {"data": data}
    kinds = ", ".join(repr(key) for key in reasoning)
    raise TranslationError(f"a reasoningContent delta cannot be translated ({kinds})")


def _payload(message: Message, *, strict: bool = True) -> dict[str, Any]:
    """A frame's JSON object payload (its padding field ``p`` is simply never read).

    Not ``strict`` (for exception frames): anything else reads as an empty object, as the error still
    has to reach the client.
    """
    try:
        payload = orjson.loads(message.payload)
    except orjson.JSONDecodeError:
        payload = None
    if isinstance(payload, dict):
        return payload
    if strict:
        name = message.header(":event-type") or "nameless"
        raise TranslationError(f"a {_fields.shown(name, 30)} event's payload is not a JSON object")
    return {}


def _index(payload: dict[str, Any], event: str) -> int:
    index = payload.get("contentBlockIndex")
    if type(index) is not int or index < 0:
        raise TranslationError(f"a {event} event's 'contentBlockIndex' is not a non-negative integer")
    return index


def _delta_str(delta: dict[str, Any], key: str) -> str:
    value = delta.get(key)
    if not isinstance(value, str):
        raise TranslationError(f"a contentBlockDelta event's {key!r} is not a string")
    return value
