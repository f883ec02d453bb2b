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
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.core.decision import Decider, Exchange, Reject
from extproc.server.protocol import (
    CONTINUE_BODY,
    CONTINUE_TRAILERS,
    body_responses,
    headers_response,
    immediate_response,
    request_from,
)

log = logging.getLogger(__name__)

Responses = list[pb.ProcessingResponse]


class Session:
    """The protocol state of one ext_proc stream, independent of the gRPC flavour serving it."""

    __slots__ = ("_chunks", "_decider", "_exchange", "_replied", "_size", "done")

    def __init__(self, decider: Decider) -> None:
        self._decider = decider
        self._exchange: Exchange | None = None  # set while an AI call waits for the rest of its body
        self._chunks: list[bytes] = []
        self._size = 0
        self.done = False  # nothing more to answer: close the stream
        self._replied = False  # answered with an immediate response

    def on_message(self, message: pb.ProcessingRequest) -> Responses:
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
                return self._decide(end)
            return []
        if kind == "request_headers":
            result = self._decider.on_headers(request_from(message), message.request_headers.end_of_stream)
            if isinstance(result, Exchange):
                self._exchange = result
                return []
            if isinstance(result, Reject):
                return self._finish(immediate_response(result))
            self.done = message.request_headers.end_of_stream
            return [headers_response(result)]
        if kind == "request_trailers":
            # With trailers the last body chunk is not end_of_stream: the trailers end the body.
            responses = self._decide(True) if self._exchange is not None else []
            if self._replied:  # an immediate response ends the request: no trailers answer
                return responses
            self.done = True
            return [*responses, CONTINUE_TRAILERS]
        # Response phases are off in our filter config; answer rather than stall if enabled.
        return [_continue(kind)]

    def _decide(self, end_of_stream: bool) -> Responses:
        assert self._exchange is not None
        decision = self._exchange.on_body(b"".join(self._chunks))
        chunks = len(self._chunks)
        self._exchange, self._chunks, self._size = None, [], 0
        if isinstance(decision, Reject):
            return self._finish(immediate_response(decision))
        # Once the request is answered we close: response phases are not ours.
        self.done = end_of_stream
        return [headers_response(decision), *body_responses(decision, chunks)]

    def _finish(self, immediate: pb.ProcessingResponse) -> Responses:
        self.done = self._replied = True
        return [immediate]


class AsyncExternalProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, decider: Decider) -> None:
        self._decider = decider

    async def Process(  # name fixed by the gRPC service definition
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        session = Session(self._decider)
        async for message in request_iterator:
            for response in session.on_message(message):
                yield response
            if session.done:
                return


def _continue(kind: str | None) -> pb.ProcessingResponse:
    if kind == "response_headers":
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    if kind == "response_body":
        return pb.ProcessingResponse(response_body=pb.BodyResponse())
    if kind == "response_trailers":
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
    log.warning("unexpected ext_proc message %r", kind)
    return pb.ProcessingResponse()
