"""Usage events appended to a file, one JSON object per line (the JSON mapping of
extproc/events/schema.py: proto field names, every field present).

For a single replica, a local run, or a log shipper that already tails files. File writes can block
(slow disks, NFS), so they happen on a writer thread fed by a bounded queue: ``emit()`` only
enqueues; a full queue drops the event and counts it, like the NATS sink.

Lines are whole: each batch is written with one ``write()`` of complete lines on a line-buffered
file, so a concurrent reader (``extproc events tail --file``) never sees half a line for long. When
the file is rotated away (renamed or deleted, as logrotate does) the writer notices within
``reopen_check_s`` and starts a new file at the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import TextIO

from prometheus_client import CollectorRegistry

from extproc.events.counters import CountedSink, SinkCounters
from extproc.events.schema import event_to_json, to_event
from extproc.telemetry.record import CallRecord

log = logging.getLogger(__name__)

_STOP = object()  # queued by close(): everything before it is written, then the thread ends
_MAX_BATCH = 1000


class JsonlEventSink(CountedSink):
    """A ``CallSink`` appending usage events to ``path``. Lifecycle: construct, ``await start()``,
    ``emit()`` from any thread, ``await close(timeout)``. Events emitted before ``start()`` wait in
    the queue; after ``close()`` they are dropped."""

    name = "jsonl"

    def __init__(self, path: str | os.PathLike[str], *, registry: CollectorRegistry | None = None,
                 queue_size: int = 10_000, reopen_check_s: float = 1.0) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.path = Path(path)
        self.reopen_check_s = reopen_check_s
        self.counts = SinkCounters(self.name, registry)
        self._queue: queue.Queue[object] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._file: TextIO | None = None
        self._file_id: tuple[int, int] | None = None
        self._next_check = 0.0
        self._last_drop_log = 0.0

    def emit(self, record: CallRecord) -> None:
        """Queue the record; never blocks, never raises."""
        if self._closed:
            self._drop(1, "the sink is closed")
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._drop(1, f"the queue is full ({self._queue.maxsize})")
        except Exception:
            self._drop(1, "could not be queued", exc_info=True)

    async def start(self) -> None:
        if self._thread is not None or self._closed:
            return
        # A daemon thread: a hung filesystem must not keep the process alive at exit.
        self._thread = threading.Thread(target=self._write_loop, name="usage-events-jsonl", daemon=True)
        self._thread.start()

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is queued within ``timeout`` seconds; drop (and count) what is left."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max(0.0, timeout)
            try:
                # Blocks only while the queue is full, i.e. while the writer is still draining it.
                await asyncio.to_thread(self._queue.put, _STOP, True, max(0.0, deadline - loop.time()))
                await asyncio.to_thread(thread.join, max(0.0, deadline - loop.time()))
            except queue.Full:
                pass
            if thread.is_alive():
                log.warning("usage events: the JSONL writer did not finish within %ss", timeout)
        leftover = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            leftover += item is not _STOP
        if leftover:
            self._drop(leftover, "the sink closed before they were written")
        if thread is not None and thread.is_alive():
            # Stuck on the filesystem: let it end by itself should it ever come back.
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_STOP)
        else:
            self._close_file()

    # -- writer thread --------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < _MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in batch)
            records = [item for item in batch if isinstance(item, CallRecord)]
            if records:
                self._write(records)
            if stop:
                self._close_file()
                return

    def _write(self, records: list[CallRecord]) -> None:
        lines: list[str] = []
        for record in records:
            try:
                lines.append(event_to_json(to_event(record)) + "\n")
            except Exception:
                self._drop(1, f"cannot encode the record of request {record.request_id!r}", exc_info=True)
        if not lines:
            return
        try:
            out = self._open()
            out.write("".join(lines))  # line buffering: flushed by this write, all lines whole
        except OSError as exc:
            self._close_file()  # reopen on the next batch: the disk may have come back
            self._drop(len(lines), f"cannot write to {self.path}: {exc}")
            return
        self.counts.add_published(len(lines))

    def _open(self) -> TextIO:
        now = time.monotonic()
        if self._file is not None and now >= self._next_check:
            self._next_check = now + self.reopen_check_s
            try:
                stat = os.stat(self.path)
                rotated = (stat.st_dev, stat.st_ino) != self._file_id
            except FileNotFoundError:
                rotated = True
            if rotated:
                log.info("usage events: %s was rotated; starting a new file", self.path)
                self._close_file()
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8", buffering=1, newline="\n")  # noqa: SIM115
            stat = os.fstat(self._file.fileno())
            self._file_id = (stat.st_dev, stat.st_ino)
            self._next_check = now + self.reopen_check_s
        return self._file

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _drop(self, n: int, reason: str, *, exc_info: bool = False) -> None:
        self.counts.add_dropped(n)
        now = time.monotonic()
        if exc_info or now - self._last_drop_log >= 60.0:  # the counter has the exact numbers
            self._last_drop_log = now
            log.warning("usage events: dropped %d event(s): %s (%d dropped in total)", n, reason,
                        self.counts.dropped, exc_info=exc_info)
