"""Holds the active policy set; reloads it on change and keeps the last good one on a bad update."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from extproc.policy.compiled import PolicySet
from extproc.policy.loader import Document, PolicyError, build_policy, expand_paths, load_policy, read_documents

log = logging.getLogger(__name__)


class DocumentSource(Protocol):
    """Policy documents from elsewhere (the Kubernetes API), judged next to the files' documents."""

    def documents(self, base: Sequence[Document]) -> list[Document]: ...


class PolicyStore:
    def __init__(self, paths: Sequence[str | Path], source: DocumentSource | None = None) -> None:
        self._paths = list(paths)
        self._source = source
        # Reloads come from the file watcher (event loop) and from Kubernetes informer threads.
        self._lock = threading.Lock()
        self._current = self._load()  # a bad policy at startup is fatal: nothing good to keep
        self._fingerprint = self._stat()
        self.last_error: PolicyError | None = None

    def current(self) -> PolicySet:
        return self._current

    def reload(self) -> bool:
        """Load again; on any problem log it, keep serving the last good set and return False."""
        with self._lock:
            return self._reload()

    def _reload(self) -> bool:
        self._fingerprint = self._stat()
        try:
            fresh = self._load()
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

    def _load(self) -> PolicySet:
        if self._source is None:
            return load_policy(self._paths)
        # With a Kubernetes source the files are optional (the mesh settings), and so are objects.
        documents, problems = read_documents(expand_paths(self._paths))
        return build_policy([*documents, *self._source.documents(documents)], problems)

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
