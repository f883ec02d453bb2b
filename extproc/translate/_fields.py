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

from typing import Any, Final

import orjson

from extproc.translate import TranslationError

__all__ = ["MAX_TOKENS", "count", "is_number", "max_tokens", "shown", "writable", "wrong"]

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


def max_tokens(value: Any, where: str) -> int:
    if type(value) is not int or not 1 <= value <= MAX_TOKENS:
        raise wrong(where, f"an integer from 1 to {MAX_TOKENS}")
    return value


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
