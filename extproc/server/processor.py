"""The ext_proc servicer: one bidirectional stream per HTTP request.

The filter runs with request headers SENT, the request body STREAMED and
``send_body_without_waiting_for_header_response``: Envoy pushes headers and every body chunk
without waiting, and we answer the headers only once the whole body is in. The decision, the
routing header mutations and the body rewrite thus cost one round trip, and nothing reaches the
upstream before it is decided. Responses are not sent to us at all (response modes SKIP/NONE),
so streamed replies flow straight from the provider to the caller.
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


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, decider: Decider) -> None:
        self._decider = decider

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        exchange: Exchange | None = None  # set while an AI call waits for the rest of its body
        chunks: list[bytes] = []
        size = 0
        async for message in request_iterator:
            kind = message.WhichOneof("request")
            if kind == "request_body":
                if exchange is None:  # already answered (pass-through): let the body flow
                    yield CONTINUE_BODY
                    continue
                chunk = message.request_body.body
                chunks.append(chunk)
                size += len(chunk)
                if size > exchange.max_body_bytes:
                    yield immediate_response(exchange.too_large())
                    return
                if message.request_body.end_of_stream:
                    responses, forwarded = _decide(exchange, chunks)
                    for response in responses:
                        yield response
                    if not forwarded:
                        return
                    exchange = None
            elif kind == "request_headers":
                result = self._decider.on_headers(request_from(message), message.request_headers.end_of_stream)
                if isinstance(result, Exchange):
                    exchange = result
                elif isinstance(result, Reject):
                    yield immediate_response(result)
                    return
                else:
                    yield headers_response(result)
            elif kind == "request_trailers":
                # With trailers the last body chunk is not end_of_stream: the trailers end the body.
                if exchange is not None:
                    responses, forwarded = _decide(exchange, chunks)
                    for response in responses:
                        yield response
                    if not forwarded:
                        return
                    exchange = None
                yield CONTINUE_TRAILERS
            else:
                # Response phases are off in our filter config; answer rather than stall if enabled.
                yield _continue(kind)


def _decide(exchange: Exchange, chunks: list[bytes]) -> tuple[list[pb.ProcessingResponse], bool]:
    decision = exchange.on_body(b"".join(chunks))
    if isinstance(decision, Reject):
        return [immediate_response(decision)], False
    return [headers_response(decision), *body_responses(decision, len(chunks))], True


def _continue(kind: str | None) -> pb.ProcessingResponse:
    if kind == "response_headers":
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    if kind == "response_body":
        return pb.ProcessingResponse(response_body=pb.BodyResponse())
    if kind == "response_trailers":
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
    log.warning("unexpected ext_proc message %r", kind)
    return pb.ProcessingResponse()
