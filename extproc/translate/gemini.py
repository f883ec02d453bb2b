"""The Google Gemini API and Vertex AI ``generateContent`` provider, to and from the canonical Anthropic form.

``request`` turns a canonical (Anthropic Messages) request into a ``GenerateContentRequest``;
``response``, ``error`` and ``StreamTranslator`` turn Gemini's answer back into Anthropic's shapes,
with ``model`` set to the name the caller asked for and ids derived from Gemini's ``responseId``
(``msg_<responseId>``). The Gemini API (``/v1beta/models/{model}:generateContent``, and
``:streamGenerateContent?alt=sse``) and Vertex AI (``/v1/projects/{p}/locations/{l}/publishers/google/
models/{model}:generateContent``) take and give the same bodies, so this one module serves both. The
model and whether to stream are in the URL, not the body: ``model`` and ``stream`` are left out.

Mapped: user/assistant turns → ``contents`` with roles ``user``/``model`` (consecutive turns of one role
merged, as Gemini wants them alternating), text, base64 images → ``inlineData``, base64 PDF ``document``
blocks → ``inlineData`` (``application/pdf``), ``tool_use`` → ``functionCall`` (id, name, args),
``tool_result`` → ``functionResponse`` in a user turn, named after the ``tool_use`` with the same id
earlier in the conversation (Gemini matches results by name; the id goes along too, except to Vertex AI,
see ``request``), with the result under ``output`` (``error`` when ``is_error``), the keys Gemini
documents; ``system`` → ``systemInstruction``; ``max_tokens`` → ``maxOutputTokens``, ``temperature``,
``top_p`` → ``topP``, ``top_k`` → ``topK``, ``stop_sequences`` → ``stopSequences`` (up to Gemini's 5);
custom tools → one ``functionDeclarations`` tool (schema as ``parametersJsonSchema``), ``tool_choice`` →
``toolConfig`` (``auto`` → AUTO, ``any`` → ANY, ``tool`` → ANY with ``allowedFunctionNames``, ``none`` →
NONE); ``thinking`` ``enabled`` → ``thinkingConfig`` with ``thinkingBudget`` and ``includeThoughts``,
``adaptive`` → ``includeThoughts`` alone (dynamic thinking is Gemini's default).

Thought signatures: Gemini signs its reasoning (``thoughtSignature`` on a part) and Gemini 3 refuses a
conversation whose function calls come back without their signatures. Anthropic's place for an opaque
reasoning token is a ``thinking`` block's ``signature``, which clients must pass back unchanged, so
a signature goes out as one, prefixed ``gemini:`` (so that only Gemini's own come back to Gemini): a
thought part's on its ``thinking`` block, a function call's on an empty ``thinking`` block right
before its ``tool_use``. On the way back a signed thinking block with text becomes that thought part
again, an empty one puts its signature on the part that follows it. Signatures on plain text parts
are dropped (Gemini only requires those of function calls).

Dropped because they do not change what the caller gets back: ``metadata.user_id`` (a label),
``cache_control`` on the request and on blocks (a caching hint; Gemini caches implicitly),
``service_tier`` and ``speed`` (capacity hints), ``thinking: {"type": "disabled"}`` (Gemini 2.5 Pro and
3 cannot stop thinking; without ``includeThoughts`` no thought reaches the answer, only its tokens
the output count), a document's ``title`` and a text block's ``citations``, ``redacted_thinking`` and
unsigned (Claude's) ``thinking`` blocks in earlier turns (Gemini cannot read them), a tool's
``cache_control``.

Raising :class:`TranslationError` because the answer would differ from what the caller asked for:
image and document URLs and file ids (Gemini fetches only what it stores, or ``gs://`` objects a
canonical request cannot name), documents other than base64 PDFs or with ``context``/citations,
images or documents inside a tool result, a ``tool_result`` whose ``tool_use`` is not in the
conversation, a final assistant turn (a prefill), server tools (web search, code execution, ...),
``strict`` tools, ``disable_parallel_tool_use`` (Gemini has no switch for it), more than 5 stop
sequences, ``thinking`` types other than enabled/adaptive/disabled, ``mcp_servers``, ``container``,
``context_management``, ``output_config``/``output_format``, ``inference_geo``, and any request field
this module does not know.

Answers: text parts → ``text`` blocks (adjacent ones joined), ``thought`` parts → ``thinking`` blocks,
``functionCall`` → ``tool_use`` (Gemini's id, else ``toolu_<responseId>_<n>``). Stop reason: ``tool_use``
whenever a function was called, else from ``finishReason`` (STOP → ``end_turn``, MAX_TOKENS →
``max_tokens``, the safety family → ``refusal``); Gemini does not say which stop sequence matched, so
``stop_sequence`` is always null. A prompt blocked before any candidate (``promptFeedback.blockReason``)
is an empty ``refusal``. Usage: Gemini's ``promptTokenCount`` includes cached tokens and Anthropic's
``input_tokens`` does not, so ``input_tokens`` is the difference and ``cache_read_input_tokens`` the
cached count; thinking is billed as output, so ``output_tokens`` adds ``thoughtsTokenCount`` to
``candidatesTokenCount``. Any other part (inline data, executable code, ...) makes the answer
untranslatable.

Streams have no terminator: each event is ``data: <GenerateContentResponse>`` and the stream just ends,
the chunk with ``finishReason`` carrying the final ``usageMetadata``. So ``finishReason`` closes the
open block, and ``message_delta`` (with every count) and ``message_stop`` go out from ``finish()``; a
stream that ends without a ``finishReason`` was cut and ends with an ``error`` event instead, never
silently. A chunk carrying ``error`` (Gemini's own mid-stream failure) becomes an ``error`` event.

``canonical_request`` runs ``request`` backwards, for a fallback after a Gemini hop: Envoy re-sends the
body Gemini was sent, and the next provider needs the canonical form again. It reads back everything
``request`` writes (and a declaration's OpenAPI ``parameters``, as JSON Schema) and refuses anything
else by name. What ``request`` drops does not come back, and a few things come back in an equivalent
shape: a turn that is one text part, and a system prompt of one part, as a string; turns of one role
merged; tool results first in their user turn; a tool result of one text block as its string (none as
``""``); ``display: "summarized"`` (the default) left out. Vertex AI bodies have no call ids: a call
gets ``toolu_gem_<content>_<part>`` and its response the same id, paired by name and order.

Every request field read is type-checked (see ``_fields``): a wrong type raises
:class:`TranslationError` naming the field (``'messages.0.content.1.text' must be a string``). A
Gemini answer of the wrong shape is never passed on half-translated: ``response`` raises, and the
stream translator ends the stream with an ``error`` event at the first chunk it cannot read, keeping
what it already sent; ``error`` never raises.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Container, Iterable
from typing import Any, Final, NamedTuple

import orjson

from extproc.translate import TranslationError, _anthropic, _fields
from extproc.translate._anthropic import untranslatable_body, untranslatable_event
from extproc.translate.sse import SseEvent

__all__ = [
    "StreamTranslator",
    "canonical_request",
    "error",
    "request",
    "response",
    "untranslatable_body",
    "untranslatable_event",
]

_MAX_STOP: Final = 5  # Gemini's limit; more would be a 400 from the provider with a less useful message
# Marks a thinking block's signature as Gemini's: only those go back to Gemini (see the module docstring).
SIGNATURE_PREFIX: Final = "gemini:"

_DROPPED: Final = frozenset(("service_tier", "speed", "cache_control"))
_KNOWN: Final = _anthropic.REQUEST_FIELDS | {"stream", "top_k"} | _DROPPED
_TOOL_MODES: Final = {"auto": "AUTO", "any": "ANY", "tool": "ANY", "none": "NONE"}

_STOP_REASONS: Final = {"STOP": "end_turn", "MAX_TOKENS": "max_tokens"} | dict.fromkeys(
    ("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"), "refusal"
)

# HTTP status → Anthropic error type; Google's own status names add nothing the HTTP status does not say.
_ERROR_TYPES: Final = _anthropic.HTTP_ERROR_TYPES

_CUT_MESSAGE: Final = _anthropic.CUT_MESSAGE
_UNTRANSLATABLE_MESSAGE: Final = _anthropic.UNTRANSLATABLE_ANTHROPIC
_ID_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_-]")


# ---------------------------------------------------------------------------------------------------
# request


def request(body: dict[str, Any], *, model: str, vertex: bool = False) -> dict[str, Any]:
    """Canonical (Anthropic Messages) request → ``GenerateContentRequest`` for ``model``.

    ``model`` goes in the URL, not the body; it is taken so every provider module has one signature.
    ``vertex``: the request goes to Vertex AI, whose v1 ``FunctionCall``/``FunctionResponse`` have no
    ``id`` (the Gemini API's have; Google's own SDKs send it to the Gemini API only), so tool-call ids
    are left out there and Gemini pairs calls and results by name and order.
    Every field read is type-checked; a wrong type raises :class:`TranslationError` naming the field.
    """
    if not isinstance(body, dict):
        raise TranslationError("the request body must be a JSON object")
    _refuse_unsupported(body)
    out: dict[str, Any] = {"contents": _contents(body.get("messages"))}
    if vertex:
        _drop_call_ids(out["contents"])
    system = body.get("system")
    if system is not None:
        parts = _system_parts(system)
        if parts:
            out["systemInstruction"] = {"parts": parts}
    config = _generation_config(body)
    if config:
        out["generationConfig"] = config
    out.update(_tool_fields(body))
    return out


def _refuse_unsupported(body: dict[str, Any]) -> None:
    _fields.only(body, _KNOWN, "", "cannot be translated to the Gemini API")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _fields.wrong("metadata", "an object")
    _fields.optional_bool(body, "stream")


def _contents(raw: Any) -> list[dict[str, Any]]:
    """Every turn in order, consecutive turns of one role merged into one content."""
    raw = _anthropic.turns(raw, prefill_by="the Gemini API")
    names: dict[str, str] = {}  # tool_use id → function name, for the tool results that follow
    contents: list[dict[str, Any]] = []
    for index, message in enumerate(raw):
        role, parts = _turn(message, index, names)
        if not parts:
            raise TranslationError(f"'messages.{index}' has no content the Gemini API can take")
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    return contents


def _drop_call_ids(contents: list[dict[str, Any]]) -> None:
    for content in contents:
        for part in content["parts"]:
            for key in ("functionCall", "functionResponse"):
                if key in part:
                    part[key].pop("id", None)


def _turn(message: Any, index: int, names: dict[str, str]) -> tuple[str, list[dict[str, Any]]]:
    """One Anthropic turn → (Gemini role, parts)."""
    role, content = _anthropic.turn(message, index)
    if role == "user":
        return "user", _user_parts(content, index, names)
    return "model", _model_parts(content, index, names)


def _user_parts(content: Any, index: int, names: dict[str, str]) -> list[dict[str, Any]]:
    blocks, where = _anthropic.content_blocks(content, index)
    parts: list[dict[str, Any]] = []
    for position in range(len(blocks)):
        block, kind = _anthropic.block(blocks, position, where)
        at = f"{where}.{position}"
        if kind == "text":
            parts.append({"text": _fields.string(block, "text", at)})
        elif kind == "image":
            parts.append(_image_part(block, at))
        elif kind == "document":
            parts.append(_document_part(block, at))
        elif kind == "tool_result":
            parts.append(_function_response(block, at, names))
        else:
            raise TranslationError(f"'{where}' block type {_fields.shown(kind)} cannot be translated to Gemini")
    return parts


def _model_parts(content: Any, index: int, names: dict[str, str]) -> list[dict[str, Any]]:
    blocks, where = _anthropic.content_blocks(content, index)
    parts: list[dict[str, Any]] = []
    pending: str | None = None  # a signature for the part that follows (from an empty thinking block)
    for position in range(len(blocks)):
        block, kind = _anthropic.block(blocks, position, where)
        at = f"{where}.{position}"
        if kind == "thinking":
            thought, pending = _thought(block, at)
            if thought is not None:
                parts.append(thought)
            continue
        if kind == "redacted_thinking":
            continue  # Claude's encrypted reasoning: nothing Gemini can read
        if kind == "text":
            part = {"text": _fields.string(block, "text", at)}
        elif kind == "tool_use":
            part = _function_call(block, at, names)
        else:
            raise TranslationError(f"'{where}' block type {_fields.shown(kind)} cannot be translated to Gemini")
        if pending is not None:
            part["thoughtSignature"], pending = pending, None
        parts.append(part)
    return parts


def _thought(block: dict[str, Any], at: str) -> tuple[dict[str, Any] | None, str | None]:
    """A thinking block → (the thought part it came from, or the signature for the part that follows it).

    Only blocks signed by Gemini (see ``SIGNATURE_PREFIX``) go back; Claude's reasoning is dropped.
    """
    text, signature = block.get("thinking", ""), block.get("signature", "")
    if not isinstance(text, str):
        raise _fields.wrong(f"{at}.thinking", "a string")
    if not isinstance(signature, str):
        raise _fields.wrong(f"{at}.signature", "a string")
    if not signature.startswith(SIGNATURE_PREFIX):
        return None, None
    native = signature.removeprefix(SIGNATURE_PREFIX)
    if text:
        return {"text": text, "thought": True, "thoughtSignature": native}, None
    return None, native


def _function_call(block: dict[str, Any], at: str, names: dict[str, str]) -> dict[str, Any]:
    call_id, name = _fields.string(block, "id", at), _fields.string(block, "name", at)
    args = _anthropic.tool_use_input(block, at)
    names[call_id] = name
    return {"functionCall": {"id": call_id, "name": name, "args": args}}


def _function_response(block: dict[str, Any], at: str, names: dict[str, str]) -> dict[str, Any]:
    call_id = _fields.string(block, "tool_use_id", at)
    name = names.get(call_id)
    if name is None:
        # Gemini matches a function response to its call by the function's name, which only the call has.
        raise TranslationError(
            f"'{at}.tool_use_id' {_fields.shown(call_id)} names no earlier tool_use, so its function is unknown"
        )
    is_error = _fields.optional_bool(block, "is_error", at)
    # Gemini reads "output" as the function's result and "error" as its failure.
    result = {"error" if is_error else "output": _result_value(block.get("content"), at)}
    return {"functionResponse": {"id": call_id, "name": name, "response": result}}


def _result_value(content: Any, at: str) -> str | list[str]:
    """A tool result's content: its string, its one text block's text, or the texts of several."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    where = f"{at}.content"
    if not isinstance(content, list):
        raise _fields.wrong(where, "a string or an array of text blocks")
    texts: list[str] = []
    for position in range(len(content)):
        block, kind = _anthropic.block(content, position, where)
        if kind != "text":
            shown = _fields.shown(kind)
            raise TranslationError(f"'{where}' block type {shown} cannot be sent to Gemini in a tool result")
        texts.append(_fields.string(block, "text", f"{where}.{position}"))
    return texts[0] if len(texts) == 1 else texts


def _base64_source(block: dict[str, Any], at: str, what: str) -> tuple[str, str]:
    """(media type, data) of a base64 source; any other source is refused."""
    source = _anthropic.source(block, at)
    kind = source.get("type")
    if kind != "base64":
        shown = _fields.shown(kind) if isinstance(kind, str) else "without a type"
        # Gemini fetches only files it stores or gs:// objects; an Anthropic url source is neither.
        raise TranslationError(f"'{at}' {what} source {shown} cannot be translated to Gemini (only base64)")
    return _fields.string(source, "media_type", f"{at}.source"), _fields.string(source, "data", f"{at}.source")


def _image_part(block: dict[str, Any], at: str) -> dict[str, Any]:
    media_type, data = _base64_source(block, at, "image")
    return {"inlineData": {"mimeType": media_type, "data": data}}


def _document_part(block: dict[str, Any], at: str) -> dict[str, Any]:
    media_type, data = _base64_source(block, at, "document")
    if media_type != "application/pdf":
        raise TranslationError(f"'{at}' only base64 PDF documents can be translated to Gemini")
    citations = block.get("citations")
    if block.get("context") is not None or (isinstance(citations, dict) and citations.get("enabled")):
        raise TranslationError(f"'{at}' document context and citations cannot be translated to Gemini")
    return {"inlineData": {"mimeType": media_type, "data": data}}


def _system_parts(system: Any) -> list[dict[str, Any]]:
    return [{"text": text} for text in _anthropic.system_texts(system)]


def _generation_config(body: dict[str, Any]) -> dict[str, Any]:
    """``generationConfig``: sampling, length, stop sequences, thinking (empty when none is set)."""
    # Anthropic's temperature range (0..1) lies inside Gemini's (0..2): the value means the same.
    out = _anthropic.sampling_config(body, "maxOutputTokens", "topP")
    top_k = body.get("top_k")
    if top_k is not None:
        out["topK"] = _top_k(top_k, "top_k")
    stop = _anthropic.stop_sequences(body.get("stop_sequences"), _MAX_STOP, "Gemini")
    if stop:
        out["stopSequences"] = stop
    thinking = _thinking_config(body.get("thinking"))
    if thinking:
        out["thinkingConfig"] = thinking
    return out


def _top_k(value: Any, where: str) -> int:
    return _fields.integer(value, where, 1, "a positive integer")


def _thinking_config(thinking: Any) -> dict[str, Any]:
    """Anthropic's ``thinking`` → Gemini's ``thinkingConfig`` (empty: Gemini's default)."""
    if thinking is None:
        return {}
    thinking, kind = _fields.typed(thinking, "thinking")
    display = thinking.get("display")
    if display not in (None, "summarized", "omitted"):
        raise _fields.wrong("thinking.display", '"summarized" or "omitted"')
    if kind == "disabled":
        return {}  # see the module docstring: Gemini may think anyway, but no thought is shown
    # "omitted" asks for the signature without the text; Gemini signs its reasoning either way.
    out: dict[str, Any] = {"includeThoughts": display != "omitted"}
    if kind == "enabled":
        out["thinkingBudget"] = _fields.max_tokens(thinking.get("budget_tokens"), "thinking.budget_tokens")
    elif kind != "adaptive":
        raise TranslationError(f"'thinking' type {_fields.shown(kind)} cannot be translated to Gemini")
    return out


def _tool_fields(body: dict[str, Any]) -> dict[str, Any]:
    """``tools`` and, when there are tools, ``toolConfig`` from ``tool_choice``."""
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _fields.wrong("tools", "an array")
    choice = body.get("tool_choice")
    config = _tool_config(choice) if choice is not None else None
    if not tools:
        return {}  # Gemini takes no toolConfig without tools; no choice means anything then
    out: dict[str, Any] = {
        "tools": [{"functionDeclarations": [_declaration(tool, index) for index, tool in enumerate(tools)]}]
    }
    if config is not None:
        out["toolConfig"] = config
    return out


def _declaration(tool: Any, index: int) -> dict[str, Any]:
    where = f"tools.{index}"
    if not isinstance(tool, dict):
        raise _fields.wrong(where, "an object")
    kind = tool.get("type")
    if kind not in (None, "custom") or "input_schema" not in tool:
        shown = _fields.shown(kind) if isinstance(kind, str) else _fields.shown(str(tool.get("name")))
        raise TranslationError(f"tool {shown} is an Anthropic server tool and cannot be translated to Gemini")
    if tool.get("strict") is True:
        raise TranslationError(f"'{where}.strict' cannot be translated: Gemini does not promise to follow the schema")
    name, description, schema = _anthropic.tool_definition(tool, where)
    declaration: dict[str, Any] = {"name": name}
    if description is not None:
        declaration["description"] = description
    # parametersJsonSchema takes JSON Schema as it is; "parameters" takes only Google's OpenAPI subset
    # and would refuse $ref, anyOf with null, additionalProperties and other keywords client tools use.
    declaration["parametersJsonSchema"] = schema
    return declaration


def _tool_config(choice: Any) -> dict[str, Any]:
    if not isinstance(choice, dict):
        raise _fields.wrong("tool_choice", "an object")
    kind = choice.get("type")
    if not isinstance(kind, str):
        raise _fields.wrong("tool_choice.type", "a string")
    mode = _TOOL_MODES.get(kind)
    if mode is None:
        raise TranslationError(f"'tool_choice' type {_fields.shown(kind)} cannot be translated to Gemini")
    if _fields.optional_bool(choice, "disable_parallel_tool_use", "tool_choice"):
        raise TranslationError("'tool_choice.disable_parallel_tool_use' cannot be translated to Gemini")
    config: dict[str, Any] = {"mode": mode}
    if kind == "tool":
        config["allowedFunctionNames"] = [_fields.string(choice, "name", "tool_choice")]
    return {"functionCallingConfig": config}


# ---------------------------------------------------------------------------------------------------
# reading a request back (a fallback after a Gemini hop)


_READ_FIELDS: Final = ("contents", "systemInstruction", "generationConfig", "tools", "toolConfig")
_READ_CONFIG: Final = ("maxOutputTokens", "temperature", "topP", "topK", "stopSequences", "thinkingConfig")
_READ_CHOICES: Final = {"AUTO": "auto", "ANY": "any", "NONE": "none"}
# The parts each role may hold, by the field that names the part's kind, and every field it may carry.
_USER_PARTS: Final = {
    "text": frozenset({"text"}),
    "inlineData": frozenset({"inlineData"}),
    "functionResponse": frozenset({"functionResponse"}),
}
_MODEL_PARTS: Final = {
    "functionCall": frozenset({"functionCall", "thoughtSignature"}),
    "text": frozenset({"text", "thought", "thoughtSignature"}),
}
# Google's OpenAPI Schema subset (a declaration's "parameters") → JSON Schema: subschemas to convert.
_SUBSCHEMAS: Final = ("items", "anyOf", "properties")


def canonical_request(body: dict[str, Any], *, model: str, stream: bool, default_max_tokens: int) -> dict[str, Any]:
    """``GenerateContentRequest`` → canonical (Anthropic Messages) request for ``model``: undoes ``request``.

    Read on a fallback after a Gemini hop, when the next provider gets the body Gemini was sent.
    ``stream`` (which Gemini says in the URL) becomes ``stream: true`` when set; ``max_tokens`` is
    ``maxOutputTokens``, else ``default_max_tokens``. Function calls without an id (Vertex AI's) get
    ``toolu_gem_<content>_<part>``, and their responses the id of the call they answer, paired by name
    and order as Gemini pairs them. What ``request`` drops does not come back (see the module
    docstring); anything else this cannot read raises :class:`TranslationError` naming the field.
    """
    if not isinstance(body, dict):
        raise TranslationError("the request body must be a JSON object")
    _only(body, _READ_FIELDS, "")
    config = _object(body.get("generationConfig"), "generationConfig")
    _only(config, _READ_CONFIG, "generationConfig")
    out: dict[str, Any] = {"model": model}
    if stream:
        out["stream"] = True
    limit = config.get("maxOutputTokens")
    out["max_tokens"] = (
        default_max_tokens if limit is None else _fields.max_tokens(limit, "generationConfig.maxOutputTokens")
    )
    system = _read_system(body.get("systemInstruction"))
    if system is not None:
        out["system"] = system
    out["messages"] = _read_contents(body.get("contents"))
    out.update(_read_sampling(config))
    thinking = _read_thinking(config.get("thinkingConfig"))
    if thinking:
        out["thinking"] = thinking
    out.update(_read_tools(body))
    return out


def _only(fields: dict[str, Any], known: Container[str], where: str) -> None:
    """Refuse a field (not null) that is not in ``known``: it would be lost on the way back."""
    _fields.only(fields, known, where, "cannot be translated from a Gemini request", 80)


def _object(value: Any, where: str) -> dict[str, Any]:
    """An optional object (null or absent: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fields.wrong(where, "an object")
    return value


def _read_system(raw: Any) -> str | list[dict[str, Any]] | None:
    """``systemInstruction`` → ``system``: one text part as a string, several as text blocks."""
    if raw is None:
        return None
    instruction = _object(raw, "systemInstruction")
    _only(instruction, ("parts", "role"), "systemInstruction")
    parts = instruction.get("parts")
    if not isinstance(parts, list):
        raise _fields.wrong("systemInstruction.parts", "an array")
    texts: list[str] = []
    for position, part in enumerate(parts):
        at = f"systemInstruction.parts.{position}"
        _part_kind(part, at, {"text": frozenset({"text"})})
        texts.append(_fields.string(part, "text", at))
    return _anthropic.system_of(texts)


def _part_kind(part: Any, at: str, kinds: dict[str, frozenset[str]]) -> str:
    """Which of ``kinds`` a part is; a part of another kind, or with a field its kind has not, raises."""
    if not isinstance(part, dict):
        raise _fields.wrong(at, "an object")
    for kind, allowed in kinds.items():
        if part.get(kind) is not None:
            _only(part, allowed, at)
            return kind
    present = ",".join(sorted(key for key, value in part.items() if value is not None))
    raise TranslationError(f"'{at}' is a part of kind {_fields.shown(present)} that cannot be translated back")


def _read_contents(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise TranslationError("'contents' must be a non-empty array")
    calls: dict[str, list[str]] = {}  # function name → ids of its calls not answered yet, in order
    return [_read_content(content, index, calls) for index, content in enumerate(raw)]


def _read_content(content: Any, index: int, calls: dict[str, list[str]]) -> dict[str, Any]:
    """One content → one turn; a turn that is one text part reads back as a string."""
    where = f"contents.{index}"
    if not isinstance(content, dict):
        raise _fields.wrong(where, "an object")
    _only(content, ("role", "parts"), where)
    role, parts = content.get("role"), content.get("parts")
    if not isinstance(parts, list) or not parts:
        raise _fields.wrong(f"{where}.parts", "a non-empty array")
    turn: dict[str, Any]
    if role == "user":
        turn = {"role": "user", "content": _read_user_parts(parts, where, calls)}
    elif role == "model":
        turn = {"role": "assistant", "content": _read_model_parts(parts, index, calls)}
    elif isinstance(role, str):
        raise TranslationError(f"'{where}.role' {_fields.shown(role)} cannot be translated back")
    else:
        raise _fields.wrong(f"{where}.role", "a string")
    blocks = turn["content"]
    if len(blocks) == 1 and blocks[0]["type"] == "text":
        turn["content"] = blocks[0]["text"]
    return turn


def _read_user_parts(parts: list[Any], where: str, calls: dict[str, list[str]]) -> list[dict[str, Any]]:
    """A user content's parts → blocks, the tool results first (Anthropic wants them first in the turn)."""
    results: list[dict[str, Any]] = []
    blocks: list[dict[str, Any]] = []
    for position, part in enumerate(parts):
        at = f"{where}.parts.{position}"
        kind = _part_kind(part, at, _USER_PARTS)
        if kind == "functionResponse":
            results.append(_read_response(part[kind], f"{at}.{kind}", calls))
        elif kind == "inlineData":
            blocks.append(_read_media(part[kind], f"{at}.{kind}"))
        else:
            blocks.append({"type": "text", "text": _fields.string(part, "text", at)})
    return results + blocks


def _read_model_parts(parts: list[Any], index: int, calls: dict[str, list[str]]) -> list[dict[str, Any]]:
    """A model content's parts → blocks, each signature back on the thinking block ``request`` took it from."""
    blocks: list[dict[str, Any]] = []
    for position, part in enumerate(parts):
        at = f"contents.{index}.parts.{position}"
        kind = _part_kind(part, at, _MODEL_PARTS)
        signature = _fields.optional_str(part, "thoughtSignature", at)
        if _fields.optional_bool(part, "thought", at):
            if signature is None:
                raise TranslationError(f"'{at}' is a thought without a thoughtSignature: Gemini cannot take it back")
            text = _fields.string(part, "text", at)
            blocks.append({"type": "thinking", "thinking": text, "signature": SIGNATURE_PREFIX + signature})
            continue
        if signature is not None:  # from an empty thinking block right before the block it signed
            blocks.append({"type": "thinking", "thinking": "", "signature": SIGNATURE_PREFIX + signature})
        if kind == "functionCall":
            blocks.append(_read_call(part[kind], f"{at}.{kind}", f"toolu_gem_{index}_{position}", calls))
        else:
            blocks.append({"type": "text", "text": _fields.string(part, "text", at)})
    return blocks


def _call_id(call: dict[str, Any], at: str) -> str | None:
    """A function call's or response's id; absent (Vertex AI has none) or empty: None."""
    return _fields.optional_str(call, "id", at) or None


def _read_call(call: Any, at: str, generated: str, calls: dict[str, list[str]]) -> dict[str, Any]:
    """A ``functionCall`` → a tool_use block, with its id or else ``generated``."""
    if not isinstance(call, dict):
        raise _fields.wrong(at, "an object")
    _only(call, ("id", "name", "args"), at)
    name = _fields.string(call, "name", at)
    call_id = _call_id(call, at) or generated
    args = _object(call.get("args"), f"{at}.args")
    calls.setdefault(name, []).append(call_id)
    return {"type": "tool_use", "id": call_id, "name": name, "input": args}


def _read_response(raw: Any, at: str, calls: dict[str, list[str]]) -> dict[str, Any]:
    """A ``functionResponse`` → a tool_result answering its call: by id, else its name's first unanswered one."""
    if not isinstance(raw, dict):
        raise _fields.wrong(at, "an object")
    _only(raw, ("id", "name", "response"), at)
    name = _fields.string(raw, "name", at)
    call_id = _call_id(raw, at)
    pending = calls.get(name, [])
    if call_id is None and pending:
        call_id = pending.pop(0)
    elif call_id is not None and call_id in pending:
        pending.remove(call_id)
    else:
        shown = f"{_fields.shown(call_id)} of " if call_id else ""
        raise TranslationError(f"'{at}' answers no earlier functionCall {shown}{_fields.shown(name)}")
    result = raw.get("response")
    if not isinstance(result, dict) or len(result) != 1 or not result.keys() <= {"output", "error"}:
        raise _fields.wrong(f"{at}.response", "an object holding only 'output' or only 'error'")
    ((key, value),) = result.items()
    content = _read_result(value, f"{at}.response.{key}")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id, "content": content}
    if key == "error":
        block["is_error"] = True
    return block


def _read_result(value: Any, where: str) -> str | list[dict[str, Any]]:
    """A function's output as ``request`` wrote it (a string, or the strings of several text blocks)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(text, str) for text in value):
        raise _fields.wrong(where, "a string or an array of strings")
    return [{"type": "text", "text": text} for text in value]


def _read_media(data: Any, at: str) -> dict[str, Any]:
    """``inlineData`` → an image block, or a document block for a PDF, with a base64 source."""
    if not isinstance(data, dict):
        raise _fields.wrong(at, "an object")
    _only(data, ("mimeType", "data"), at)
    media_type = _fields.string(data, "mimeType", at)
    source = {"type": "base64", "media_type": media_type, "data": _fields.string(data, "data", at)}
    if media_type == "application/pdf":
        return {"type": "document", "source": source}
    if media_type.startswith("image/"):
        return {"type": "image", "source": source}
    raise TranslationError(f"'{at}.mimeType' {_fields.shown(media_type)} is neither an image nor a PDF")


def _read_sampling(config: dict[str, Any]) -> dict[str, Any]:
    """``temperature``, ``topP``, ``topK`` and ``stopSequences`` under their Anthropic names."""
    out = _fields.numbers(config, (("temperature", "temperature"), ("topP", "top_p")), "generationConfig")
    top_k = config.get("topK")
    if top_k is not None:
        out["top_k"] = _top_k(top_k, "generationConfig.topK")
    stop = config.get("stopSequences")
    if stop is not None and _fields.strings(stop, "generationConfig.stopSequences"):
        out["stop_sequences"] = list(stop)
    return out


def _read_thinking(raw: Any) -> dict[str, Any]:
    """``thinkingConfig`` → ``thinking``: a budget is ``enabled``, none (or -1, dynamic) ``adaptive``, 0 nothing."""
    if raw is None:
        return {}
    where = "generationConfig.thinkingConfig"
    config = _object(raw, where)
    _only(config, ("includeThoughts", "thinkingBudget"), where)
    include, budget = _fields.optional_bool(config, "includeThoughts", where), config.get("thinkingBudget")
    if budget == 0 and type(budget) is int:
        return {}  # Gemini's "do not think"
    if budget is None or (budget == -1 and type(budget) is int):
        out: dict[str, Any] = {"type": "adaptive"}
    else:
        out = {"type": "enabled", "budget_tokens": _fields.max_tokens(budget, f"{where}.thinkingBudget")}
    if not include:  # Gemini shows no thought unless asked to: Anthropic's "omitted"
        out["display"] = "omitted"
    return out


def _read_tools(body: dict[str, Any]) -> dict[str, Any]:
    """``tools`` (function declarations only) and, with tools, ``tool_choice`` from ``toolConfig``."""
    raw = body.get("tools")
    if raw is not None and not isinstance(raw, list):
        raise _fields.wrong("tools", "an array")
    tools: list[dict[str, Any]] = []
    for index, tool in enumerate(raw or []):
        where = f"tools.{index}"
        if not isinstance(tool, dict):
            raise _fields.wrong(where, "an object")
        _only(tool, ("functionDeclarations",), where)
        declarations = tool.get("functionDeclarations")
        if not isinstance(declarations, list):
            raise _fields.wrong(f"{where}.functionDeclarations", "an array")
        where += ".functionDeclarations"
        tools.extend(_read_declaration(item, f"{where}.{position}") for position, item in enumerate(declarations))
    choice = _read_tool_config(body.get("toolConfig"))
    if not tools:
        return {}  # a choice among no tools means nothing (``request`` leaves it out too)
    return {"tools": tools} | ({"tool_choice": choice} if choice is not None else {})


def _read_declaration(declaration: Any, at: str) -> dict[str, Any]:
    if not isinstance(declaration, dict):
        raise _fields.wrong(at, "an object")
    _only(declaration, ("name", "description", "parametersJsonSchema", "parameters"), at)
    tool: dict[str, Any] = {"name": _fields.string(declaration, "name", at)}
    description = _fields.optional_str(declaration, "description", at)
    if description is not None:
        tool["description"] = description
    schema, legacy = declaration.get("parametersJsonSchema"), declaration.get("parameters")
    if schema is not None and legacy is not None:
        raise TranslationError(f"'{at}' has both parametersJsonSchema and parameters")
    if schema is not None:
        tool["input_schema"] = _object(schema, f"{at}.parametersJsonSchema")
    elif legacy is not None:
        tool["input_schema"] = _json_schema(legacy, f"{at}.parameters")
    else:
        tool["input_schema"] = {"type": "object", "properties": {}}  # a function without parameters
    return tool


def _json_schema(schema: Any, at: str) -> dict[str, Any]:
    """Google's OpenAPI ``Schema`` → JSON Schema: type names lower-cased, ``nullable`` as a ``null`` type."""
    out = dict(_object(schema, at))
    kind = out.get("type")
    if isinstance(kind, str):
        out["type"] = kind.lower()
    if out.pop("nullable", None) is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    for key in _SUBSCHEMAS:
        value = out.get(key)
        if key == "items" and isinstance(value, dict):
            out[key] = _json_schema(value, f"{at}.{key}")
        elif key == "anyOf" and isinstance(value, list):
            out[key] = [_json_schema(item, f"{at}.{key}.{position}") for position, item in enumerate(value)]
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: _json_schema(item, f"{at}.{key}.{name}") for name, item in value.items()}
    return out


def _read_tool_config(raw: Any) -> dict[str, Any] | None:
    """``toolConfig.functionCallingConfig`` → ``tool_choice`` (ANY with one allowed name: that ``tool``)."""
    config = _object(raw, "toolConfig")
    _only(config, ("functionCallingConfig",), "toolConfig")
    where = "toolConfig.functionCallingConfig"
    calling = _object(config.get("functionCallingConfig"), where)
    if not calling:
        return None
    _only(calling, ("mode", "allowedFunctionNames"), where)
    mode, names = calling.get("mode"), calling.get("allowedFunctionNames")
    if names is not None and (not isinstance(names, list) or not all(isinstance(name, str) for name in names)):
        raise _fields.wrong(f"{where}.allowedFunctionNames", "an array of strings")
    if not isinstance(mode, str):
        raise _fields.wrong(f"{where}.mode", "a string")
    choice = _READ_CHOICES.get(mode)
    if choice is None:
        raise TranslationError(f"'{where}.mode' {_fields.shown(mode)} cannot be translated back")
    if not names:
        return {"type": choice}
    if mode != "ANY" or len(names) != 1:
        # Anthropic forces one named tool or any of them, never a subset.
        raise TranslationError(f"'{where}.allowedFunctionNames' can be read back only as ANY's one name")
    return {"type": "tool", "name": names[0]}


# ---------------------------------------------------------------------------------------------------
# response and error


class _Part(NamedTuple):
    """A part of Gemini's answer, read: ``kind`` is "text", "thinking" or "call"."""

    kind: str
    text: str
    call: dict[str, Any]  # of a "call": functionCall's id (or None), name and args
    signature: str | None  # thoughtSignature, prefixed for an Anthropic thinking block


def _read_part(part: Any, where: str) -> _Part:
    if not isinstance(part, dict):
        raise TranslationError(f"'{where}' is not an object")
    signature = part.get("thoughtSignature")
    if signature is not None and not isinstance(signature, str):
        raise TranslationError(f"'{where}.thoughtSignature' is not a string")
    signed = SIGNATURE_PREFIX + signature if signature else None
    if "functionCall" in part:
        return _Part("call", "", _call(part["functionCall"], f"{where}.functionCall"), signed)
    text = part.get("text", "")
    if not isinstance(text, str):
        raise TranslationError(f"'{where}.text' is not a string")
    if "text" not in part and not set(part) <= {"thought", "thoughtSignature"}:
        # Inline data, executable code, ...: nothing the caller asked for or could read.
        raise TranslationError(f"'{where}' is a part of kind {_fields.shown(','.join(sorted(part)))}")
    return _Part("thinking" if part.get("thought") is True else "text", text, {}, signed)


def _call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise TranslationError(f"'{where}' is not an object")
    call_id, name, args = call.get("id"), call.get("name"), call.get("args")
    if not isinstance(name, str) or (call_id is not None and not isinstance(call_id, str)):
        raise TranslationError(f"'{where}' has no string name, or an id that is not a string")
    if args is None:
        args = {}
    elif not isinstance(args, dict):
        # Anthropic's tool_use input is an object by contract; a client could not use anything else.
        raise TranslationError(f"'{where}.args' is not an object")
    return {"id": call_id, "name": name, "args": args}


def _id_base(response_id: Any) -> str:
    """What message and generated tool ids are made of: Gemini's responseId in Anthropic's id alphabet."""
    if isinstance(response_id, str) and response_id:
        return _ID_UNSAFE.sub("_", response_id)
    return uuid.uuid4().hex


def stop_reason(finish_reason: Any, called: bool) -> str:
    """Anthropic's stop reason: ``tool_use`` when a function was called, else from ``finishReason``."""
    if called:
        return "tool_use"
    return _STOP_REASONS.get(finish_reason, "end_turn") if isinstance(finish_reason, str) else "end_turn"


def usage(raw: Any) -> dict[str, int]:
    """Gemini ``usageMetadata`` → Anthropic usage (see the module docstring for the arithmetic)."""
    if not isinstance(raw, dict):
        raw = {}
    cached = _fields.count(raw.get("cachedContentTokenCount"))
    output = _fields.count(raw.get("candidatesTokenCount")) + _fields.count(raw.get("thoughtsTokenCount"))
    return _anthropic.cached_usage(_fields.count(raw.get("promptTokenCount")), cached, output)


def response(body: Any, *, requested_model: str) -> dict[str, Any]:
    """``GenerateContentResponse`` → Anthropic message, as if ``requested_model`` had answered.

    Content of the wrong shape raises :class:`TranslationError` (the answer cannot be passed on);
    an id, finish reason or usage of the wrong type is defaulted, as it does not change the answer.
    """
    if not isinstance(body, dict):
        raise TranslationError("the answer is not a JSON object")
    base = _id_base(body.get("responseId"))
    candidate = _first_candidate(body)
    if candidate is None:
        content: list[dict[str, Any]] = []
        reason = "refusal"
    else:
        content = _content(_candidate_parts(candidate, "candidates.0"), base)
        called = any(block["type"] == "tool_use" for block in content)
        reason = stop_reason(candidate.get("finishReason"), called)
    return _anthropic.message_object("msg_" + base, requested_model, content, reason, usage(body.get("usageMetadata")))


def _first_candidate(body: dict[str, Any]) -> dict[str, Any] | None:
    """The first candidate; None for a prompt Gemini blocked (no candidates, a ``blockReason``)."""
    candidates = body.get("candidates")
    if candidates is None or candidates == []:
        if _blocked(body):
            return None
        raise TranslationError("the answer has no candidates and no block reason")
    if not isinstance(candidates, list):
        raise TranslationError("'candidates' is not an array")
    candidate = candidates[0]
    if not isinstance(candidate, dict):
        raise TranslationError("'candidates.0' is not an object")
    return candidate


def _blocked(body: dict[str, Any]) -> bool:
    feedback = body.get("promptFeedback")
    return isinstance(feedback, dict) and feedback.get("blockReason") is not None


def _candidate_parts(candidate: dict[str, Any], where: str) -> list[Any]:
    """A candidate's parts; a candidate without content (stopped for safety, say) has none."""
    content = candidate.get("content")
    if content is None:
        return []
    if not isinstance(content, dict):
        raise TranslationError(f"'{where}.content' is not an object")
    parts = content.get("parts")
    if parts is None:
        return []
    if not isinstance(parts, list):
        raise TranslationError(f"'{where}.content.parts' is not an array")
    return parts


def _content(parts: list[Any], base: str) -> list[dict[str, Any]]:
    """Parts → Anthropic blocks, adjacent text (and thought text) parts joined as a stream would join them."""
    blocks: list[dict[str, Any]] = []
    for position, raw in enumerate(parts):
        part = _read_part(raw, f"candidates.0.content.parts.{position}")
        last = blocks[-1] if blocks else None
        if part.kind == "call":
            if part.signature:
                blocks.append({"type": "thinking", "thinking": "", "signature": part.signature})
            tools = sum(block["type"] == "tool_use" for block in blocks)
            blocks.append(_tool_use(part, base, tools))
        elif part.kind == "thinking":
            # A thinking block ends at its signature; one without a signature takes the next thought.
            if last is not None and last["type"] == "thinking" and not last["signature"]:
                last["thinking"] += part.text
                last["signature"] = part.signature or ""
            elif part.text or part.signature:
                blocks.append({"type": "thinking", "thinking": part.text, "signature": part.signature or ""})
        elif part.text:  # a plain text part's signature is dropped (see the module docstring)
            if last is not None and last["type"] == "text":
                last["text"] += part.text
            else:
                blocks.append({"type": "text", "text": part.text})
    return blocks


def _tool_use(part: _Part, base: str, number: int) -> dict[str, Any]:
    """A function call → tool_use block; ``number`` tool_use blocks came before it in this answer."""
    call_id = part.call["id"] or f"toolu_{base}_{number}"
    return {"type": "tool_use", "id": call_id, "name": part.call["name"], "input": part.call["args"]}


def _error_type(status: Any) -> str:
    """The Anthropic error type of an HTTP status (or a stream error's ``code``, which may be anything)."""
    if type(status) is not int:
        return "api_error"
    return _anthropic.status_error_type(status, _ERROR_TYPES)


def error(status: int, body: bytes) -> bytes:
    """Google error body → Anthropic error body (the status is passed through by the caller).

    Google sends ``{"error": {"code", "message", "status"}}``, sometimes inside a one-element list.
    Never raises: a body of another shape gives a message naming the HTTP status.
    """
    return _anthropic.provider_error(status, body, _error_type(status), _error_message)


def _error_message(parsed: Any) -> str | None:
    if isinstance(parsed, list) and parsed:
        parsed = parsed[0]
    inner = parsed.get("error") if isinstance(parsed, dict) else None
    message = inner.get("message") if isinstance(inner, dict) else None
    return message if isinstance(message, str) and message else None


# ---------------------------------------------------------------------------------------------------
# streaming


class StreamTranslator(_anthropic.AnthropicStream):
    """Gemini ``streamGenerateContent?alt=sse`` → Anthropic Messages SSE, one chunk at a time.

    Text and thought parts stream into text and thinking blocks; a function call arrives whole and
    becomes a complete tool_use block at once. Gemini's stream has no end marker, so the chunk with
    ``finishReason`` only closes the open block and records the stop reason: ``message_delta`` (whose
    usage is the final ``usageMetadata``, carried by that last chunk) and ``message_stop`` go out from
    ``finish()``, which ends a stream that never got a ``finishReason`` with an ``error`` event instead.

    A chunk that cannot be translated ends the stream with an ``error`` event after the events
    already sent, and ``failure`` says why; Gemini's own ``error`` chunk becomes an ``error`` event too,
    without a failure.
    """

    def __init__(self, *, requested_model: str) -> None:
        super().__init__(requested_model=requested_model)  # the open block's kind is "text" or "thinking"
        self._base = ""
        self._signed = False  # the open thinking block got its signature: the next thought opens another
        self._tools = 0
        self._called = False
        self._stop: str | None = None  # Anthropic's stop reason, once Gemini said why it stopped
        self._usage: Any = None

    def finish(self) -> bytes:
        """The end of the stream: the clean end if Gemini said why it stopped, else an error event."""
        if self._ended:
            return b""
        self._ended = True
        if self._stop is None:
            return _anthropic.error_event("api_error", _CUT_MESSAGE)
        out = [] if self._started else [self._start({})]
        out.extend(_anthropic.message_end_events(self._stop, usage(self._usage)))
        return b"".join(out)

    def _event(self, event: SseEvent) -> Iterable[bytes]:  # Gemini's events have no name
        payload = _anthropic.chunk_payload(event)
        if payload.get("error") is not None:
            return [self._provider_error(payload["error"])]
        if isinstance(payload.get("usageMetadata"), dict):
            self._usage = payload["usageMetadata"]
        if self._stop is not None:
            return []  # after finishReason only the usage counts; the blocks are closed
        out: list[bytes] = []
        if not self._started:
            out.append(self._start(payload))
        candidate = _first_candidate(payload) if payload.get("candidates") or _blocked(payload) else {}
        if candidate is None:  # a blocked prompt
            self._stop = "refusal"
            return out
        for position, raw in enumerate(_candidate_parts(candidate, "candidates.0")):
            out.extend(self._part(_read_part(raw, f"candidates.0.content.parts.{position}")))
        if candidate.get("finishReason") is not None:
            out.extend(self._close_block())
            self._stop = stop_reason(candidate["finishReason"], self._called)
        return out

    def _provider_error(self, inner: Any) -> bytes:
        """Gemini's own mid-stream error, passed on as such (not a translation failure)."""
        self._ended = True
        message = _error_message({"error": inner}) or _anthropic.PROVIDER_ERROR_MESSAGE
        code = inner.get("code") if isinstance(inner, dict) else None
        return _anthropic.error_event(_error_type(code), message)

    def _start(self, payload: dict[str, Any]) -> bytes:
        self._started = True
        self._base = _id_base(payload.get("responseId"))
        counts = usage(payload.get("usageMetadata"))
        counts["output_tokens"] = 0  # what is written so far is counted in message_delta
        return _anthropic.message_start_event("msg_" + self._base, self._model, counts)

    def _part(self, part: _Part) -> list[bytes]:
        if part.kind == "call":
            return self._call(part)
        out: list[bytes] = []
        if part.kind == "thinking":
            if part.text or part.signature:
                if self._open_kind != "thinking" or self._signed:
                    out.extend(self._open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""}))
                if part.text:
                    out.append(self._delta({"type": "thinking_delta", "thinking": part.text}))
                if part.signature:
                    out.append(self._delta({"type": "signature_delta", "signature": part.signature}))
                    self._signed = True
        elif part.text:  # a plain text part's signature is dropped (see the module docstring)
            if self._open_kind != "text":
                out.extend(self._open_block("text", {"type": "text", "text": ""}))
            out.append(self._delta({"type": "text_delta", "text": part.text}))
        return out

    def _call(self, part: _Part) -> list[bytes]:
        """A whole function call → a whole tool_use block (after its signature's thinking block)."""
        out: list[bytes] = []
        if part.signature:
            out.extend(self._open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""}))
            out.append(self._delta({"type": "signature_delta", "signature": part.signature}))
        out.extend(self._open_block("tool", _tool_use(part, self._base, self._tools) | {"input": {}}))
        out.append(self._delta({"type": "input_json_delta", "partial_json": orjson.dumps(part.call["args"]).decode()}))
        out.extend(self._close_block())
        self._tools += 1
        self._called = True
        return out

    def _open_block(self, kind: str, content_block: dict[str, Any]) -> list[bytes]:
        self._signed = False
        return super()._open_block(kind, content_block)
