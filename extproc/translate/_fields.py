"""Type checks for the fields the translators read.

A request reaches a translator before anything has validated it (on the same-API path the provider's
own validation answers), so every field a translator reads is checked where it is read, with a plain
``isinstance`` or ``type`` test: a crafted body becomes a :class:`TranslationError` naming the field,
never an exception from inside the translation. Provider answers get the same checks; there the
message is only logged.

JSON has no integer limit, but orjson (which writes every translated body) and both providers stop at
64 bits. orjson reads a larger integer as the nearest float, so only a caller building the dict in
Python can hand over one: :func:`writable` guards the objects a translator passes on unread.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import Any, Final

import orjson

from extproc.translate import TranslationError

__all__ = [
    "MAX_TOKENS",
    "count",
    "integer",
    "is_number",
    "max_tokens",
    "numbers",
    "only",
    "optional_bool",
    "optional_str",
    "shown",
    "string",
    "strings",
    "typed",
    "writable",
    "wrong",
]

# No model writes more; a larger "limit" is a mistake the caller should hear about from us.
MAX_TOKENS: Final = 2**31 - 1
# Token counts beyond this are not counts (and their sums could leave JSON's 64-bit integers).
_MAX_COUNT: Final = 2**53
_MIN_INT: Final = -(2**63)
_MAX_INT: Final = 2**64 - 1


def wrong(where: str, expected: str) -> TranslationError:
    return TranslationError(f"'{where}' must be {expected}")


def is_number(value: Any) -> bool:
    """A JSON number orjson can write back: a float, or an integer within 64 bits (never a bool)."""
    kind = type(value)
    return kind is float or (kind is int and _MIN_INT <= value <= _MAX_INT)


def integer(value: Any, where: str, low: int = 1, expected: str = "") -> int:
    """An integer from ``low`` to :data:`MAX_TOKENS` (a token limit, ``top_k``).

    Anything else raises, saying the field at ``where`` must be ``expected`` (by default, the range).
    """
    if type(value) is not int or not low <= value <= MAX_TOKENS:
        raise wrong(where, expected or f"an integer from {low} to {MAX_TOKENS}")
    return value


def max_tokens(value: Any, where: str) -> int:
    return integer(value, where)


def _path(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


def string(holder: dict[str, Any], key: str, at: str) -> str:
    """The string ``key`` of the object at ``at``."""
    value = holder.get(key)
    if not isinstance(value, str):
        raise wrong(f"{at}.{key}", "a string")
    return value


def optional_str(holder: dict[str, Any], key: str, at: str = "") -> str | None:
    """``key`` of the object at ``at`` (top level: ""), a string or absent."""
    value = holder.get(key)
    if value is not None and not isinstance(value, str):
        raise wrong(_path(at, key), "a string")
    return value


def optional_bool(holder: dict[str, Any], key: str, at: str = "") -> bool | None:
    """``key`` of the object at ``at`` (top level: ""), a boolean or absent."""
    value = holder.get(key)
    if value is not None and not isinstance(value, bool):
        raise wrong(_path(at, key), "a boolean")
    return value


def strings(value: Any, where: str) -> list[str]:
    """``value`` (the field at ``where``) checked to be an array of strings."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise wrong(where, "an array of strings")
    return value


def numbers(holder: dict[str, Any], names: Iterable[tuple[str, str]], at: str = "") -> dict[str, Any]:
    """The number fields of ``holder`` (at ``at``) that are set, each checked, under new names.

    ``names`` pairs each key read with the key it is written under, in the order they go out.
    """
    out: dict[str, Any] = {}
    for key, name in names:
        value = holder.get(key)
        if value is not None:
            if not is_number(value):
                raise wrong(_path(at, key), "a number")
            out[name] = value
    return out


def typed(value: Any, at: str) -> tuple[dict[str, Any], str]:
    """The value at ``at`` (a block, a part, ``thinking``) as an object with a string ``type``, and that type."""
    if not isinstance(value, dict):
        raise wrong(at, "an object")
    kind = value.get("type")
    if not isinstance(kind, str):
        raise wrong(f"{at}.type", "a string")
    return value, kind


def only(fields: dict[str, Any], known: Container[str], at: str, refusal: str, limit: int = 40) -> None:
    """Refuses the first field of ``fields`` (the object at ``at``; top level: "") set but not ``known``.

    A field set to null counts as absent (SDKs send null for "not given"). The error names the field's
    path, cut at ``limit`` characters, followed by ``refusal`` ("cannot be translated to ...").
    """
    for key, value in fields.items():
        if value is not None and key not in known:
            raise TranslationError(f"{shown(_path(at, str(key)), limit)} {refusal}")


def writable(value: Any, where: str) -> str:
    """``value`` as JSON text, or a TranslationError naming ``where`` when orjson cannot write it."""
    try:
        return orjson.dumps(value).decode()
    except TypeError as exc:
        if "64-bit" in str(exc):
            raise TranslationError(f"'{where}' holds an integer beyond 64 bits") from None
        raise TranslationError(f"'{where}' holds a value JSON cannot carry") from None


def count(value: Any) -> int:
    """A token count from a provider's usage; anything that is not a believable count is 0."""
    return value if type(value) is int and 0 <= value <= _MAX_COUNT else 0


def shown(value: str, limit: int = 40) -> str:
    """A caller's string quoted for an error message, cut short."""
    return repr(value if len(value) <= limit else value[:limit] + "…")
