"""The response side of an AI call: read what the provider really used and settle the reservation.

Runs on a separate ext_proc stream (Envoy's usage filter), possibly on another replica than the
decision: everything it needs travels in the decision's dynamic metadata, nothing in memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from extproc.base.tokens import Signer
from extproc.cache.entry import CacheEntry
from extproc.core.usage import Usage, UsageTracker
from extproc.quota.engine import Reservation
from extproc.quota.plan import Estimate
from extproc.telemetry.metrics import CallLabels, genai_provider, record_usage
from extproc.telemetry.record import CallRecord, Hop
from extproc.translate.canonical import CANONICAL
from extproc.translate.response import ResponseTranslator

if TYPE_CHECKING:
    from extproc.core.runtime import Runtime

log = logging.getLogger(__name__)
EVENT_STREAM_TYPE = "application/vnd.amazon.eventstream"  # Bedrock's binary stream framing
STREAM_TYPES = ("text/event-stream", EVENT_STREAM_TYPE)
_SETTLE_MEMORY_S = 900.0  # outlives any sealed settlement (call timeout plus grace)


@dataclass(frozen=True, slots=True)
class SettleInfo:
    """What the response side needs to know about a call, carried in its dynamic metadata."""

    reservation: Reservation | None  # quota to settle
    api: str  # the provider's API: how its response and usage read
    input_estimate: int
    provider: str
    model: str
    cache_key: str | None = None  # store a complete, successful response here
    cache_ttl_s: int = 0
    operation: str = ""
    route: str = ""
    decided_at: float = 0.0  # epoch seconds: durations are measured across replicas by the wall clock
    service: str = ""
    namespace: str = ""
    caller_api: str = ""  # the caller's API, when the response must be translated into it
    include_usage: bool = False  # an OpenAI caller of a translated stream asked for the usage chunk
    requested: str = ""  # the model name the caller sent
    variant: str = ""
    policy_version: str = ""
    hops: tuple[Hop, ...] = ()  # fallback hops before the one that answers
    call_id: str = ""  # the call's slot and reservation to release (tracked in the in-flight store)
    request_id: str = ""
    traceparent: str = ""
    b3: str = ""
    prompt: str = ""  # redacted request content, only when the operator enabled capture
    job_id: str = ""  # the execution of an asynchronous job (the worker retries failures)
    nonce: str = ""  # this settlement is accepted once

    @property
    def translating(self) -> bool:
        # api "none": an answer with no usage to read (count_tokens, a provider path), never translated.
        return bool(self.caller_api) and self.api != "none" and self.caller_api != self.api

    @property
    def decoding(self) -> bool:
        """Whether the answer is first decoded into the canonical (Anthropic) form: the provider speaks
        neither the caller's format nor the canonical one. Usage is then read from the canonical form,
        which carries the provider's own counts."""
        return self.translating and self.api != CANONICAL

    @property
    def encoding(self) -> bool:
        """Whether the (canonical) answer is encoded into the caller's format."""
        return self.translating and self.caller_api != CANONICAL

    def encode(self) -> str:
        return orjson.dumps({"r": self.reservation.encode() if self.reservation else None, "api": self.api,
                             "in": self.input_estimate, "p": self.provider, "m": self.model,
                             "ck": self.cache_key, "ct": self.cache_ttl_s, "op": self.operation,
                             "rt": self.route, "t0": self.decided_at, "sv": self.service,
                             "ns": self.namespace, "ca": self.caller_api, "iu": self.include_usage,
                             "rq": self.requested, "va": self.variant, "pv": self.policy_version,
                             "h": [[h.provider, h.model, h.outcome, h.started_at] for h in self.hops],
                             "id": self.call_id, "xr": self.request_id, "tp": self.traceparent,
                             "b3": self.b3, **({"pr": self.prompt} if self.prompt else {}),
                             **({"jb": self.job_id} if self.job_id else {}), "nc": self.nonce}).decode()

    def seal(self, signer: Signer, ttl_s: float) -> str:
        """Signed, as it travels through Envoy's metadata: a stream that reaches the processor with a settlement
        it did not make (a forged usage stream) is refused, and never touches a quota or a cache entry."""
        return signer.sign({"si": self.encode()}, ttl_s)

    @classmethod
    def unseal(cls, token: str, signer: Signer) -> SettleInfo | None:
        raw = signer.verify(token)
        if raw is None or not isinstance(raw.get("si"), str):
            return None
        try:
            return cls.decode(str(raw["si"]))
        except (ValueError, KeyError, TypeError, IndexError):
            return None

    @classmethod
    def decode(cls, text: str) -> SettleInfo:
        raw = orjson.loads(text)
        return cls(
            reservation=Reservation.decode(raw["r"]) if raw.get("r") else None, api=raw["api"],
            input_estimate=int(raw["in"]), provider=raw["p"], model=raw["m"], cache_key=raw.get("ck"),
            cache_ttl_s=int(raw.get("ct", 0)), operation=raw.get("op", ""), route=raw.get("rt", ""),
            decided_at=float(raw.get("t0", 0.0)), service=raw.get("sv", ""), namespace=raw.get("ns", ""),
            caller_api=raw.get("ca", ""), include_usage=bool(raw.get("iu", False)), requested=raw.get("rq", ""),
            variant=raw.get("va", ""), policy_version=raw.get("pv", ""),
            hops=tuple(Hop(str(p), str(m), str(o), float(t)) for p, m, o, t in raw.get("h", ())),
            call_id=raw.get("id", ""), request_id=raw.get("xr", ""), traceparent=raw.get("tp", ""),
            b3=raw.get("b3", ""), prompt=raw.get("pr", ""), job_id=raw.get("jb", ""), nonce=raw.get("nc", ""))


class Settlement:
    """Reads one response: usage, the cache, breakers, the bulkhead slot and the call's record.

    In ``strip`` mode it also removes the usage chunk we asked for; when the provider spoke another
    API than the caller (a cross-provider fallback) it translates the response on the way.
    """

    def __init__(self, info: SettleInfo, runtime: Runtime, strip: bool) -> None:
        self._runtime = runtime
        self._metrics = runtime.metrics
        self._first_byte_at: float | None = None
        self.info = info
        self._policy = runtime.policy()
        self._quota = runtime.quota
        self._cache = runtime.cache
        self._strip = strip
        self._status = 0
        self._content_type = ""
        self._tracker: UsageTracker | None = None
        self._decoder: ResponseTranslator | None = None  # the provider's format → canonical
        self._translator: ResponseTranslator | None = None  # canonical → the caller's format
        # What the caller received, kept only while it may still be cached. A fallback's answer is
        # never stored under the key of the model the caller asked for.
        self._body: bytearray | None = bytearray() if info.cache_key and not info.hops else None
        self.settled: Usage | None = None

    @property
    def translating(self) -> bool:
        return self.info.translating

    def on_headers(self, status: int, content_type: str) -> None:
        self._status = status
        self._content_type = content_type
        if self.info.api == "none":
            return  # a provider path without a model (GET /v1/models, an allowed path): no usage to read
        info = self.info
        streaming = content_type.startswith(STREAM_TYPES)
        if info.decoding:
            self._decoder = ResponseTranslator(CANONICAL, status, streaming, requested_model=info.requested,
                                               provider_format=info.api)
        self._tracker = UsageTracker(CANONICAL if info.decoding else info.api, streaming=streaming,
                                     strip_injected_usage=self._strip and streaming and not self.translating)
        if info.encoding:
            self._translator = ResponseTranslator(info.caller_api, status, streaming, requested_model=info.requested,
                                                  include_usage=info.include_usage, usage=self._tracker)

    def response_headers(self) -> tuple[list[tuple[str, str]], list[str]]:
        """(set, remove): a translated body has another length (Envoy sends it chunked instead), and a
        decoded stream is SSE whatever the provider framed it in (Bedrock's binary event stream)."""
        if self._decoder is not None and self._content_type.startswith(EVENT_STREAM_TYPE):
            return [("content-type", "text/event-stream")], ["content-length"]
        return [], ["content-length"]

    def feed(self, chunk: bytes) -> bytes:
        if self._first_byte_at is None and chunk:
            self._first_byte_at = time.time()
        if self._decoder is not None:
            chunk = self._decoder.feed(chunk)
        forwarded = self._tracker.feed(chunk) if self._tracker is not None else chunk
        return self._keep(self._encode(forwarded, last=False))

    def flush(self) -> bytes:
        tail = self._decoder.finish() if self._decoder is not None else b""
        tracker = self._tracker
        forwarded = (tracker.feed(tail) + tracker.finish()) if tracker is not None else tail
        return self._keep(self._encode(forwarded, last=True))

    def _encode(self, canonical: bytes, *, last: bool) -> bytes:
        """The caller's bytes: the canonical answer encoded, unless the decoder could not read the provider's,
        when the caller gets the encoder's own untranslatable ending (not an encoding of the decoder's)."""
        encoder = self._translator
        if encoder is None:
            return canonical
        decoder = self._decoder
        if decoder is not None and decoder.failure is not None:
            return encoder.abandon(decoder.failure) + (encoder.finish() if last else b"")
        out = encoder.feed(canonical)
        return out + encoder.finish() if last else out

    def _keep(self, forwarded: bytes) -> bytes:
        if self._body is not None:
            if len(self._body) + len(forwarded) > self._cache.settings.max_entry_bytes:
                self._body = None  # too large to cache: stop holding it
            else:
                self._body += forwarded
        return forwarded

    async def settle(self, complete: bool) -> Usage:
        """Settle once: real usage if the provider reported it, else an estimate; nothing for errors."""
        if self.settled is not None:
            return self.settled
        if not await self._runtime.inflight.first_use("settle:" + self.info.nonce, _SETTLE_MEMORY_S):
            # The same sealed settlement twice: a replay. Nothing is charged, released, cached or recorded.
            log.warning("refused a replayed settlement of %s/%s (call %s)", self.info.namespace, self.info.service,
                        self.info.nonce)
            self._runtime.metrics.tokens_refused.labels("settlement").inc()
            self.settled = Usage(0, 0, reported=False)
            return self.settled
        tracker = self._tracker
        if not 200 <= self._status < 300 or tracker is None:
            usage = Usage(0, 0, reported=False)  # the provider refused or never answered: refund
        elif complete and tracker.complete and tracker.usage is not None:
            usage = tracker.usage  # the provider's final count (an Anthropic message_start alone is not)
        else:
            usage = tracker.estimate(self.info.input_estimate)
        self.settled = usage
        price = self._policy.prices.lookup(self.info.provider, self.info.model)
        cost = price.micro_usd(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens) if price else 0
        # A job's failed attempt keeps its reservation: the worker retries, and one attempt settles it.
        retried = bool(self.info.job_id) and (self.failed or not complete)
        # Whoever closes the call releases what it holds; False: the backstop already released it.
        owned = await self._runtime.inflight.close(self.info.call_id) if self.info.call_id else True
        if self.info.reservation is not None and not retried and owned:
            try:
                await self._quota.settle(self.info.reservation,
                                         Estimate(usage.input_tokens, usage.output_tokens, cost))
            except Exception:  # settlement must never break a response
                log.exception("settlement failed")
        await self._resilience(complete, owned)
        self._observe(usage, cost)
        key = self.info.cache_key
        if complete and self._body is not None and self._status == 200 and key and not self._untranslatable:
            # Only whole successful answers: never an error, never a cut stream (no end of stream).
            entry = CacheEntry(self._status, self._content_type, bytes(self._body), usage.input_tokens,
                               usage.output_tokens, time.time())
            await self._cache.put(key, entry, self.info.cache_ttl_s)
        self._runtime.record(self._record(usage, cost, complete))
        return usage

    @property
    def _untranslatable(self) -> bool:
        """The provider's answer could not be put in the caller's format: the caller got an error instead."""
        return any(step is not None and step.failed for step in (self._decoder, self._translator))

    @property
    def failed(self) -> bool:
        return self._status >= 500 or self._status == 429 or self._status == 0 or self._untranslatable

    async def _resilience(self, complete: bool, owned: bool) -> None:
        info = self.info
        if info.call_id and owned:
            await self._runtime.bulkhead.leave((info.namespace, info.service), info.call_id)
        settings = self._policy.breaker_settings(info.namespace, info.service, info.route)
        if settings is not None:
            self._runtime.breakers.record((info.namespace, info.service, info.provider, info.model), settings,
                                          failed=self.failed or not complete)

    def _record(self, usage: Usage, cost_micro_usd: int, complete: bool) -> CallRecord:
        info = self.info
        outcome = "error" if self._status >= 400 or self._status == 0 or self._untranslatable else (
            "ok" if complete else "cut")
        return CallRecord(
            service=info.service, namespace=info.namespace, operation=info.operation,
            caller_api=info.caller_api or info.api, requested_model=info.requested or info.route, route=info.route,
            provider=info.provider, genai_provider=genai_provider(self._policy, info.provider),
            response_model=info.model, status=self._status, outcome=outcome,
            streamed=self._content_type.startswith(STREAM_TYPES), input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens, cached_input_tokens=usage.cached_input_tokens,
            usage_reported=usage.reported, cost_usd=cost_micro_usd / 1e6, started_at=info.decided_at,
            ended_at=time.time(), first_byte_at=self._first_byte_at,
            cache="miss" if info.cache_key else "", variant=info.variant, hops=info.hops,
            policy_version=info.policy_version, request_id=info.request_id, traceparent=info.traceparent,
            b3=info.b3, prompt=info.prompt or None, error=self._error(outcome))

    def _error(self, outcome: str) -> str:
        if outcome == "ok":
            return ""
        if self._untranslatable:
            return "provider_response_untranslatable"
        if outcome == "cut":
            return "stream_cut"
        return f"status_{self._status}" if self._status else "no_response"

    def _observe(self, usage: Usage, cost_micro_usd: int) -> None:
        info, metrics = self.info, self._metrics
        labels = CallLabels.of(self._policy, service=info.service, namespace=info.namespace, provider=info.provider,
                               request_model=info.route, response_model=info.model)
        genai = labels.genai(info.operation)
        record_usage(metrics, labels, info.operation, usage)
        metrics.cost.labels(*labels.caller, *labels.providers, labels.response_model).inc(cost_micro_usd / 1e6)
        if info.decided_at:
            now = time.time()
            metrics.duration.labels(*labels.caller, *genai, str(self._status)).observe(max(0.0, now - info.decided_at))
            streamed = self._content_type.startswith(STREAM_TYPES)
            if self._first_byte_at is not None and streamed:
                metrics.ttft.labels(*labels.caller, *genai).observe(max(0.0, self._first_byte_at - info.decided_at))
                if usage.output_tokens > 1:
                    metrics.tpot.labels(*labels.caller, *genai).observe(
                        max(0.0, now - self._first_byte_at) / (usage.output_tokens - 1))
