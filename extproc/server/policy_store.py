"""Holds the active policy set; reloads it on change and keeps the last good one on a bad update."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from extproc.policy.compiled import PolicySet
from extproc.policy.loader import PolicyError, expand_paths, load_policy

log = logging.getLogger(__name__)


class PolicyStore:
    def __init__(self, paths: Sequence[str | Path]) -> None:
        self._paths = list(paths)
        self._current = load_policy(self._paths)  # a bad policy at startup is fatal: nothing good to keep
        self._fingerprint = self._stat()
        self.last_error: PolicyError | None = None

    def current(self) -> PolicySet:
        return self._current

    def reload(self) -> bool:
        """Load again; on any problem log it, keep serving the last good set and return False."""
        self._fingerprint = self._stat()
        try:
            fresh = load_policy(self._paths)
        except PolicyError as exc:
            self.last_error = exc
            log.error("policy update rejected, still serving version %s:\n%s", self._current.version, exc)
            return False
        self.last_error = None
        if fresh.version != self._current.version:
            log.info("policy version %s → %s (%d services)", self._current.version, fresh.version,
                     len(fresh.services))
        self._current = fresh
        return True

    def changed(self) -> bool:
        return self._stat() != self._fingerprint

    async def watch(self, interval: float) -> None:
        """Poll file metadata; also catches Kubernetes ConfigMap volumes' symlink swaps."""
        while True:
            await asyncio.sleep(interval)
            if self.changed():
                self.reload()

    def _stat(self) -> tuple[tuple[str, int, int], ...]:
        entries = []
        for path in expand_paths(self._paths):
            try:
                st = os.stat(path)
            except OSError:
                entries.append((str(path), -1, -1))
            else:
                entries.append((str(path), st.st_mtime_ns, st.st_size))
        return tuple(entries)
