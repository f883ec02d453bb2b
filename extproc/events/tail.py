"""Read usage events back: follow the JetStream stream or a JSONL sink file, print each event.

Behind ``extproc events tail`` (extproc/cli/events.py). The NATS side uses an ephemeral ordered
consumer: nothing is left on the server after the tail exits, nothing is acknowledged, and a
missed message (reconnect, slow reader) makes nats-py recreate the consumer where it left off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from extproc.events.schema import UsageEvent, event_from_json, event_to_json
from extproc.events.subjects import DEFAULT_PREFIX, DEFAULT_STREAM, filter_subject, token

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
CONNECT_TIMEOUT_S = 5.0


class TailError(Exception):
    """A problem to report in one line and exit non-zero (no NATS, no stream, a bad argument)."""


@dataclass(frozen=True, slots=True)
class TailOptions:
    namespace: str | None = None  # None: every namespace
    service: str | None = None  # None: every service
    since: datetime | None = None  # events from this time on (JetStream storage time / event end time)
    from_start: bool = False  # everything retained; neither this nor since: only new events
    count: int | None = None  # exit after this many events
    as_json: bool = False


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``10m``, ``90s``, ``2h``, ``1d``, ``500ms`` ago, or an ISO 8601 time (UTC when naive)."""
    now = now or datetime.now(UTC)
    match = _DURATION.match(text.strip())
    if match:
        return now - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise TailError(f"--since: expected a duration like 10m, 2h, 1d or an ISO time, got {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def format_line(event: UsageEvent) -> str:
    """One compact human line: time, caller, provider/model, status, tokens, cost, timing, hops."""
    stamp = _event_time(event)
    when = "-" if stamp is None else \
        datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    caller = f"{event.namespace or '-'}/{event.service or '-'}"
    target = f"{event.provider or '-'}/{event.response_model or event.requested_model or '-'}"
    estimate = "" if event.tokens.usage_reported else "~"  # counts we estimated, not the provider's
    tokens = f"tokens={estimate}{event.tokens.input}/{event.tokens.output}"
    if event.tokens.cached_input:
        tokens += f" cached={event.tokens.cached_input}"
    parts = [when, caller, target, str(event.status), event.outcome, tokens, f"${event.cost_usd:.6f}",
             f"latency={event.latency_ms:.0f}ms"]
    if event.HasField("ttft_ms"):
        parts.append(f"ttft={event.ttft_ms:.0f}ms")
    if event.cache:
        parts.append(f"cache={event.cache}")
    if event.hops:
        parts.append("hops=" + ">".join(f"{h.provider}/{h.model}({h.outcome})" for h in event.hops))
    if event.error:
        parts.append(f"error={event.error!r}")
    return " ".join(parts)


def render(event: UsageEvent, as_json: bool) -> str:
    return event_to_json(event) if as_json else format_line(event)


def decode_message(data: bytes, headers: dict[str, str] | None) -> UsageEvent:
    """A JetStream message of the NATS sink: protobuf unless its Content-Type says JSON."""
    if (headers or {}).get("Content-Type", "").startswith("application/json"):
        return event_from_json(data)
    return UsageEvent.FromString(data)


def _matches(event: UsageEvent, options: TailOptions) -> bool:
    # Compared as subject tokens, so the file tail selects exactly what the NATS filter would.
    return ((options.namespace is None or token(event.namespace) == token(options.namespace))
            and (options.service is None or token(event.service) == token(options.service)))


# -- NATS --------------------------------------------------------------------------------------------


async def tail_nats(url: str, options: TailOptions, out: TextIO, *, stream: str = DEFAULT_STREAM,
                    prefix: str = DEFAULT_PREFIX) -> int:
    """Print events from the stream until ``options.count`` were printed (or forever)."""
    import nats.js.errors
    from nats.aio.client import Client
    from nats.js.api import ConsumerConfig, DeliverPolicy

    nc = Client()

    async def quiet(exc: Exception) -> None:  # nats-py reports each failed attempt; we report once
        pass

    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await nc.connect(url, name="extproc-events-tail", max_reconnect_attempts=-1, reconnect_time_wait=1,
                             error_cb=quiet)
    except (TimeoutError, OSError) as exc:
        await nc.close()
        raise TailError(f"cannot connect to NATS at {url} within {CONNECT_TIMEOUT_S:.0f}s") from exc
    try:
        if options.since is not None:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=options.since)
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL if options.from_start else DeliverPolicy.NEW)
        subject = filter_subject(prefix, options.namespace, options.service)
        js = nc.jetstream()
        try:
            sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, config=config)
        except nats.js.errors.NotFoundError as exc:
            raise TailError(f"no stream {stream} on {url}: nothing published yet, or another --stream") from exc
        printed = 0
        while options.count is None or printed < options.count:
            msg = await sub.next_msg(timeout=None)
            try:
                event = decode_message(msg.data, msg.headers)
            except Exception as exc:  # someone else's message on our subjects: say so, keep going
                print(f"extproc: skipping an undecodable message on {msg.subject}: {exc}", file=sys.stderr)
                continue
            print(render(event, options.as_json), file=out, flush=True)
            printed += 1
        return 0
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await nc.close()


# -- JSONL file ----------------------------------------------------------------------------------------


def tail_file(path: Path, options: TailOptions, out: TextIO, *, poll_s: float = 0.2,
              sleep: Callable[[float], None] = time.sleep) -> int:
    """Follow a JSONL sink file like ``tail -F``: survives rotation, waits for the file to appear.
    ``since`` reads from the start and keeps events that ended (or started) at or after it."""
    since = options.since.timestamp() if options.since else None
    from_start = options.from_start or since is not None
    printed = 0
    waited = False
    while True:
        try:
            handle = open(path, encoding="utf-8", newline="\n")  # noqa: SIM115 (reopened on rotation)
        except FileNotFoundError:
            if not waited:
                print(f"extproc: waiting for {path} to appear", file=sys.stderr)
                waited = True
            sleep(poll_s)
            from_start = True  # a file that appears later is all new
            continue
        with handle:
            if not from_start:
                handle.seek(0, os.SEEK_END)
            identity = os.fstat(handle.fileno()).st_ino
            partial = ""
            while True:
                chunk = handle.readline()
                if chunk:
                    partial += chunk
                    if not partial.endswith("\n"):
                        continue  # the writer is mid-line: wait for the rest
                    line, partial = partial.strip(), ""
                    if not line:
                        continue
                    try:
                        event = event_from_json(line)
                    except Exception as exc:
                        print(f"extproc: skipping an undecodable line: {exc}", file=sys.stderr)
                        continue
                    if not _matches(event, options) or (since is not None and (_event_time(event) or since) < since):
                        continue
                    print(render(event, options.as_json), file=out, flush=True)
                    printed += 1
                    if options.count is not None and printed >= options.count:
                        return 0
                    continue
                if _rotated(path, identity, handle.tell()):
                    from_start = True  # the new file holds only events we have not seen
                    break
                sleep(poll_s)


def _event_time(event: UsageEvent) -> float | None:
    """When the call ended (else started), epoch seconds; None when the event has neither."""
    if event.HasField("ended_at"):
        stamp = event.ended_at
    elif event.HasField("started_at"):
        stamp = event.started_at
    else:
        return None
    return float(stamp.seconds) + stamp.nanos / 1e9


def _rotated(path: Path, identity: int, position: int) -> bool:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return False  # moved away and not yet recreated: keep reading the old one
    return stat.st_ino != identity or stat.st_size < position  # replaced, or truncated in place
