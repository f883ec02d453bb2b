"""Provider API keys from their secret sources, cached so the hot path never touches the disk.

Files are re-read at most every ``refresh_seconds`` so a rotated Kubernetes Secret is picked up
without a restart.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from extproc.policy.model import CredentialSource, Provider


@dataclass(slots=True)
class _Entry:
    value: str | None
    read_at: float


class CredentialStore:
    def __init__(
        self,
        refresh_seconds: float = 5.0,
        environ: Mapping[str, str] = os.environ,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._refresh = refresh_seconds
        self._environ = environ
        self._clock = clock
        self._files: dict[str, _Entry] = {}

    def get(self, source: CredentialSource) -> str | None:
        """The key, or None when its source is unset, missing or empty."""
        if source.env is not None:
            return self._environ.get(source.env) or None
        assert source.file is not None
        now = self._clock()
        entry = self._files.get(source.file)
        if entry is None or now - entry.read_at >= self._refresh:
            entry = _Entry(_read_key(source.file), now)
            self._files[source.file] = entry
        return entry.value


def _read_key(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def api_headers(provider: Provider, request_headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """What the provider's API needs besides the key: Anthropic's version header when the caller sent none."""
    if provider.api == "anthropic" and "anthropic-version" not in request_headers:
        return [("anthropic-version", provider.anthropic_version)]
    return []
