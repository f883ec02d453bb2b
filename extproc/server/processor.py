"""The ext_proc servicer: one bidirectional stream per HTTP request.

The filter runs with request headers SENT, the request body STREAMED and
``send_body_without_waiting_for_header_response``: Envoy pushes headers and every body chunk
without waiting, and we answer the headers only once the whole body is in. The decision, the
routing header mutations and the body rewrite thus cost one round trip, and nothing reaches the
upstream before it is decided. Responses are not sent to us at all (response modes SKIP/NONE),
so streamed replies flow straight from the provider to the caller, and we close our side of the
stream as soon as the request is answered instead of holding it open for the whole AI call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.base.wire import XFCC_HEADER
from extproc.core.async_calls import JobLookup
from extproc.core.decision import Decider, Exchange
from extproc.core.messages import LocalReply
from extproc.core.paths import ProviderCall
from extproc.core.peer import Peer, from_xfcc
from extproc.core.settlement import SettleInfo, Settlement
from extproc.server.protocol import (
    CONTINUE_BODY,
    CONTINUE_TRAILERS,
    body_responses,
    header_mutation,
    headers_response,
    immediate_response,
    request_from,
    sealed_settlement,
    streamed_body,
)

log = logging.getLogger(__name__)
# The servicer context of an ext_proc stream.
Context = grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse]

Responses = list[pb.ProcessingResponse]


class Session:
    """The protocol state of one ext_proc stream, independent of the gRPC flavour serving it."""

    __slots__ = ("_chunks", "_decider", "_exchange", "_peer", "_replied", "_size", "done")
    kind = "decision"

    def __init__(self, decider: Decider, peer: Peer | None = None) -> None:
        self._decider = decider
        self._peer = peer  # the stream's verified mTLS identity (x-forwarded-client-cert), if any
        self._exchange: Exchange | None = None  # set while an AI call waits for the rest of its body
        self._chunks: list[bytes] = []
        self._size = 0
        self.done = False  # nothing more to answer: close the stream
        self._replied = False  # answered with an immediate response

    async def on_message(self, message: pb.ProcessingRequest) -> Responses:
        kind = message.WhichOneof("request")
        if kind == "request_body":
            end = message.request_body.end_of_stream
            if self._exchange is None:  # already answered: let the rest of the body flow
                self.done = end
                return [CONTINUE_BODY]
            chunk = message.request_body.body
            self._chunks.append(chunk)
            self._size += len(chunk)
            if self._size > self._exchange.max_body_bytes:
                return self._finish(immediate_response(self._exchange.too_large()))
            # HTTP/1.1 bodies end with a separate empty chunk; once content-length is reached we
            # can answer without waiting for it, overlapping our reply with its arrival.
            if end or self._size == self._exchange.declared_length:
                return await self._decide(end)
            return []
        if kind == "request_headers":
            result = self._decider.on_headers(request_from(message, self._peer),
                                              message.request_headers.end_of_stream)
            if isinstance(result, JobLookup):
                return self._finish(immediate_response(await result.reply()))
            if isinstance(result, ProviderCall):  # a provider path without a model: decided on headers
                result = await result.decide()
            if isinstance(result, Exchange):
                self._exchange = result
                return []
            if isinstance(result, LocalReply):
                return self._finish(immediate_response(result))
            self.done = message.request_headers.end_of_stream
            return [headers_response(result)]
        if kind == "request_trailers":
            # With trailers the last body chunk is not end_of_stream: the trailers end the body.
            responses = await self._decide(True) if self._exchange is not None else []
            if self._replied:  # an immediate response ends the request: no trailers answer
                return responses
            self.done = True
            return [*responses, CONTINUE_TRAILERS]
        # Response phases are off in our filter config; answer rather than stall if enabled.
        return [_continue(kind)]

    async def _decide(self, end_of_stream: bool) -> Responses:
        assert self._exchange is not None
        decision = await self._exchange.on_body(b"".join(self._chunks))
        chunks = len(self._chunks)
        self._exchange, self._chunks, self._size = None, [], 0
        if isinstance(decision, LocalReply):
            return self._finish(immediate_response(decision))
        # Once the request is answered we close: response phases are not ours.
        self.done = end_of_stream
        return [headers_response(decision), *body_responses(decision, chunks)]

    def _finish(self, immediate: pb.ProcessingResponse) -> Responses:
        self.done = self._replied = True
        return [immediate]


class UsageSession:
    """A response stream from Envoy's usage filter: read the provider's usage, settle the quota.

    In observability mode (the common case) Envoy expects no answers and the caller's response is
    never held up. For OpenAI streams where we injected ``include_usage`` the filter runs full
    duplex instead and we pass every chunk back, minus what the injection added.
    """

    __slots__ = ("_settlement", "done")
    kind = "usage"

    def __init__(self, settlement: Settlement | None) -> None:
        self._settlement = settlement
        self.done = False

    async def on_message(self, message: pb.ProcessingRequest) -> Responses:
        kind = message.WhichOneof("request")
        observing = message.observability_mode
        settlement = self._settlement
        if kind == "response_headers":
            headers = {h.key: (h.raw_value or h.value.encode()).decode("latin-1")
                       for h in message.response_headers.headers.headers}
            if settlement is not None:
                settlement.on_headers(int(headers.get(":status", "0") or 0), headers.get("content-type", ""))
            if message.response_headers.end_of_stream:
                await self._finish(True)
            if observing:
                return []
            if settlement is not None and settlement.translating:
                set_headers, remove = settlement.response_headers()
                return [pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=pb.CommonResponse(
                    header_mutation=header_mutation(set_headers, tuple(remove)))))]
            return [pb.ProcessingResponse(response_headers=pb.HeadersResponse())]
        if kind == "response_body":
            body = message.response_body
            forward = settlement.feed(body.body) if settlement is not None else body.body
            if body.end_of_stream:
                forward += settlement.flush() if settlement is not None else b""
                await self._finish(True)
            if observing or (not forward and not body.end_of_stream):
                return []
            return [streamed_body(forward, body.end_of_stream)]
        if kind == "response_trailers":
            tail = settlement.flush() if settlement is not None else b""
            await self._finish(True)
            if observing:
                return []
            return [*([streamed_body(tail, False)] if tail else []),
                    pb.ProcessingResponse(response_trailers=pb.TrailersResponse())]
        return [] if observing else [_continue(kind)]

    async def _finish(self, complete: bool) -> None:
        if self._settlement is not None:
            await self._settlement.settle(complete)
        self.done = True

    async def close(self) -> None:
        """The stream ended: a response cut before its end still settles (on an estimate)."""
        if not self.done:
            await self._finish(False)


class AsyncExternalProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, decider: Decider) -> None:
        self._decider = decider

    async def Process(  # name fixed by the gRPC service definition
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Context
    ) -> AsyncIterator[pb.ProcessingResponse]:
        session: Session | UsageSession | None = None
        metrics = self._decider.runtime.metrics
        busy = 0.0  # time spent handling messages, not waiting for Envoy
        try:
            async for message in request_iterator:
                started = time.perf_counter()
                if session is None:
                    session = self._open(message, _peer(context))
                    metrics.in_flight.labels(session.kind).inc()
                responses = await session.on_message(message)
                busy += time.perf_counter() - started
                for response in responses:
                    yield response
                if session.done:
                    return
        finally:
            if isinstance(session, UsageSession):
                await session.close()
            if session is not None:
                metrics.in_flight.labels(session.kind).dec()
                metrics.phase.labels(session.kind).observe(busy)

    def _open(self, message: pb.ProcessingRequest, peer: Peer | None) -> Session | UsageSession:
        if message.HasField("request_headers"):
            return Session(self._decider, peer)
        sealed = sealed_settlement(message)
        settlement = None
        if sealed is not None:
            info = self._settlement_of(sealed, peer)
            if info is not None:
                settlement = Settlement(info, self._decider.runtime, not message.observability_mode)
        return UsageSession(settlement)

    def _settlement_of(self, sealed: str, peer: Peer | None) -> SettleInfo | None:
        """A settlement this processor sealed, arriving from the sidecar of the call it belongs to; else None."""
        runtime = self._decider.runtime
        info = SettleInfo.unseal(sealed, runtime.signer)
        if info is None:
            log.warning("refused a usage stream whose settlement is forged or expired")
        elif runtime.peer_identity and (peer is None or peer.namespace != info.namespace):
            log.warning("refused a settlement of %s/%s from %s", info.namespace, info.service,
                        peer.describe() if peer is not None else "an unverified peer")
            info = None
        if info is None:
            runtime.metrics.tokens_refused.labels("settlement").inc()
        return info


def _peer(context: Context) -> Peer | None:
    """The caller's identity from the processor's own sidecar (the last XFCC element is the one it wrote)."""
    for key, value in context.invocation_metadata() or ():
        if key == XFCC_HEADER:
            return from_xfcc(value if isinstance(value, str) else value.decode("latin-1"))
    return None


def _continue(kind: str | None) -> pb.ProcessingResponse:
    if kind == "response_headers":
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    if kind == "response_body":
        return pb.ProcessingResponse(response_body=pb.BodyResponse())
    if kind == "response_trailers":
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
    log.warning("unexpected ext_proc message %r", kind)
    return pb.ProcessingResponse()
