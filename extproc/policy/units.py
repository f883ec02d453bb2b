"""Parsing of the human units used in policy files: durations (``2000ms``) and rates (``100/min``).

Durations take exactly four units: ``ms`` (milliseconds), ``s`` (seconds), ``m`` (minutes) and ``h``
(hours); a bare number means seconds (as in ``cache_ttl: 3600``). ``m`` is minutes, never
milliseconds: ``20m`` is 1,200,000 ms.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
DURATION_UNITS = "ms (milliseconds), s (seconds), m (minutes) or h (hours)"
# A number followed by a word: to tell "5min" (a unit we do not take) from "soon" (no duration at all).
_NEAR_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*$")
# Units people write that are not accepted, and what they are in an accepted unit (unit, factor).
_UNIT_ALIASES = {
    "msec": ("ms", 1), "msecs": ("ms", 1), "millis": ("ms", 1), "millisecond": ("ms", 1),
    "milliseconds": ("ms", 1),
    "sec": ("s", 1), "secs": ("s", 1), "second": ("s", 1), "seconds": ("s", 1),
    "min": ("m", 1), "mins": ("m", 1), "minute": ("m", 1), "minutes": ("m", 1),
    "hr": ("h", 1), "hrs": ("h", 1), "hour": ("h", 1), "hours": ("h", 1),
    "d": ("h", 24), "day": ("h", 24), "days": ("h", 24),
}
# Far beyond any timeout, window or cache TTL a policy needs, and far below what overflows.
MAX_DURATION_MS = 365 * 24 * 3_600_000
_MAX_DURATION_TEXT = "8760h, 365 days"

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")
_RATE_UNITS_S = {
    "s": 1, "sec": 1, "second": 1,
    "m": 60, "min": 60, "minute": 60,
    "h": 3600, "hr": 3600, "hour": 3600,
    "d": 86400, "day": 86400,
}
_MAX_RATE_DIGITS = 18  # a count or window multiplier beyond 10^18 is a typo, and int() of huge text is slow


def parse_duration_ms(value: object) -> int:
    """``"2000ms"``, ``"2s"``, ``"5m"``, ``"1h"``; a bare number means seconds (as in ``cache_ttl: 3600``)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration: a number with a unit, {DURATION_UNITS}, e.g. 2000ms, 2s or 5m")
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(_not_a_duration(value))
        number, unit = match.groups()
        amount: float = float(number)  # digits only: never NaN, infinite when absurdly long
        factor = _DURATION_UNITS_MS[unit or "s"]
    else:
        amount, factor = value, 1000
    if math.isnan(amount):
        raise ValueError(f"{value!r} is not a duration")
    if amount < 0:
        raise ValueError("duration must not be negative")
    ms = amount * factor
    if ms > MAX_DURATION_MS:
        raise ValueError(f"{_shown(value)} is too long for a duration (over {_MAX_DURATION_TEXT})")
    return int(ms)


def is_bare_number(value: object) -> bool:
    """Whether a duration was written without a unit (so it was read as seconds)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    match = _DURATION.match(value) if isinstance(value, str) else None
    return match is not None and match.group(2) is None


def duration_range_error(value: object, ms: int, maximum_ms: int, maximum_text: str) -> str:
    """Why ``value`` (read as ``ms``) is outside 1ms..maximum: with a suggestion only when it is sure to be right.

    A bare number is read as seconds, so ``timeout: 2000`` is most likely 2000ms meant as milliseconds;
    a value with a unit says what it means (``20m`` is 20 minutes), so it is only told the maximum.
    """
    base = f"must be between 1ms and {maximum_text}"
    if ms <= 0 or ms <= maximum_ms:
        return base
    if is_bare_number(value):
        meant = ms // 1000
        if 1 <= meant <= maximum_ms:
            return f"{base}; did you mean {meant}ms?"  # seconds were read; milliseconds were meant
        return f"{base}; a bare number is seconds"
    if isinstance(value, str) and value.strip().endswith("ms"):
        return f"{base} ({maximum_ms}ms)"
    return f"{base} ({maximum_ms}ms); {_shown(value)} is {ms}ms"


def _shown(value: object, limit: int = 40) -> str:
    text = value.strip() if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _not_a_duration(value: str) -> str:
    near = _NEAR_DURATION.match(value)
    if near is not None:
        number, unit = near.groups()
        alias = _UNIT_ALIASES.get(unit.lower()) or (
            (unit.lower(), 1) if unit.lower() in _DURATION_UNITS_MS else None)
        hint = ""
        if alias is not None:
            canonical, factor = alias
            amount = float(number) * factor
            shown = str(int(amount)) if amount.is_integer() else str(amount)
            hint = f"; did you mean {shown}{canonical}?"
        return f"unknown duration unit {unit!r} in {value.strip()!r}; use {DURATION_UNITS}{hint}"
    return f"{value!r} is not a duration; use a number with a unit, {DURATION_UNITS} (e.g. 2000ms or 5m)"


@dataclass(frozen=True, slots=True)
class Rate:
    count: int
    per_seconds: int

    def __str__(self) -> str:
        return f"{self.count}/{self.per_seconds}s"


def parse_rate(value: object) -> Rate:
    """``"100/min"``, ``"10/s"``, ``"5000/day"``, ``"30/5m"``."""
    if isinstance(value, Rate):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a rate such as 100/min")
    match = _RATE.match(value.lower())
    if not match:
        raise ValueError(f"{value!r} is not a rate; use COUNT/UNIT such as 100/min, 10/s or 5000/day")
    count, multiplier, unit = match.groups()
    unit = unit.rstrip("s") if unit not in ("s",) and unit.endswith("s") else unit
    if unit not in _RATE_UNITS_S:
        raise ValueError(f"unknown rate unit {unit!r}; use s, min, hour or day")
    if len(count.lstrip("0")) > _MAX_RATE_DIGITS or len(multiplier.lstrip("0")) > _MAX_RATE_DIGITS:
        raise ValueError(f"{value.strip()!r} is too large a rate")
    if int(count) <= 0:
        raise ValueError("rate count must be positive")
    if multiplier and int(multiplier) <= 0:
        raise ValueError(f"rate window must be positive (e.g. 30/5m), not {value.strip()!r}")
    return Rate(int(count), _RATE_UNITS_S[unit] * int(multiplier or 1))
