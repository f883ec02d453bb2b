"""Parsing of the human units used in policy files: durations (``2000ms``) and rates (``100/min``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")
_RATE_UNITS_S = {
    "s": 1, "sec": 1, "second": 1,
    "m": 60, "min": 60, "minute": 60,
    "h": 3600, "hr": 3600, "hour": 3600,
    "d": 86400, "day": 86400,
}


def parse_duration_ms(value: object) -> int:
    """``"2000ms"``, ``"2s"``, ``"5m"``, ``"1h"``; a bare number means seconds (as in ``cache_ttl: 3600``)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 2000ms, 2s or 5m")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("duration must not be negative")
        return int(value * 1000)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as 2000ms, 2s or 5m")
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration; use a number with ms, s, m or h (e.g. 2000ms)")
    number, unit = match.groups()
    return int(float(number) * _DURATION_UNITS_MS[unit or "s"])


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
    if int(count) <= 0:
        raise ValueError("rate count must be positive")
    return Rate(int(count), _RATE_UNITS_S[unit] * int(multiplier or 1))
