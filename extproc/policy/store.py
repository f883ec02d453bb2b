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
from extproc.policy.loader import (
    Document,
    PolicyError,
    Problem,
    build_policy,
    expand_paths,
    load_policy,
    read_documents,
)

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
        """Load again; on any problem log it, keep serving the last good set and return False. Never raises:
        it runs from the file watcher, SIGHUP and Kubernetes informer threads, none of which may die."""
        with self._lock:
            return self._reload()

    def _reload(self) -> bool:
        serving = self._current.version
        try:
            self._fingerprint = self._stat()
            fresh = self._load()
        except PolicyError as exc:
            self.last_error = exc
            for problem in exc.problems:  # one line each, as `extproc check` prints them
                log.error("policy update rejected, still serving version %s: %s", serving, problem)
            return False
        except Exception as exc:  # a bug, not a bad policy: say where, keep serving
            self.last_error = PolicyError([Problem("(policy reload)", None, "", f"internal error: {exc!r}")])
            log.exception("policy reload failed, still serving version %s", serving)
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
        """Poll file metadata; also catches Kubernetes ConfigMap volumes' symlink swaps.

        Runs for the life of the processor: whatever goes wrong in one round is logged and the next
        round polls again, so a later good edit is always picked up.
        """
        last_failure = ""
        while True:
            await asyncio.sleep(interval)
            try:
                if self.changed():
                    self.reload()
                last_failure = ""
            except Exception as exc:
                if repr(exc) != last_failure:  # once per distinct failure, not every interval
                    log.exception("policy watcher: checking for changes failed; will retry")
                last_failure = repr(exc)

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
