"""Fixed quota windows, aligned in UTC so every replica and every reader agrees on them."""

from __future__ import annotations

from datetime import UTC, datetime

MONTH = -1  # period marker: calendar month


def window(period_seconds: int, now: float) -> tuple[int, int]:
    """[start, end) in epoch seconds of the window containing ``now``."""
    if period_seconds == MONTH:
        moment = datetime.fromtimestamp(now, UTC)
        first = datetime(moment.year, moment.month, 1, tzinfo=UTC)
        following = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
        return int(first.timestamp()), int(following.timestamp())
    start = int(now) - int(now) % period_seconds
    return start, start + period_seconds


def describe_period(period_seconds: int) -> str:
    names = {1: "second", 60: "minute", 3600: "hour", 86400: "day", MONTH: "month"}
    return names.get(period_seconds, f"{period_seconds}s")


def reset_text(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* style: ``1s``, ``6m0s``, ``1h2m3s``."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
