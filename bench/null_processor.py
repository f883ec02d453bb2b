"""The floor: an ext_proc server on the same grpcio stack that decides nothing.

It answers every message with CONTINUE and closes when the request is answered, exactly the
message pattern of the real processor, so (Envoy + null) - (Envoy direct) is the cost of the
Python gRPC hop itself, and (Envoy + processor) - (Envoy + null) is the cost of our policy work.

``--flavour`` picks the server the same servicer logic runs on, to price the levers of issue #16
before touching the processor: ``aio`` (grpc.aio on asyncio's default loop, what the processor
uses), ``aio-uvloop`` (the same on uvloop) and ``sync`` (grpcio's thread-pool server).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent import futures

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())


class _Pattern:
    """The real processor's answers: headers and body once the whole body is in."""

    def __init__(self) -> None:
        self.pending, self.size, self.declared = 0, 0, -1
        self.done = False

    def on(self, message: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        if message.HasField("request_headers"):
            if message.request_headers.end_of_stream:
                self.done = True
                return [HEADERS]
            for header in message.request_headers.headers.headers:
                if header.key == "content-length":
                    self.declared = int(header.raw_value)
            return []
        if not message.HasField("request_body"):
            return []
        if self.pending < 0:  # already answered at content-length: the empty end-of-body chunk
            self.done = True
            return [BODY]
        self.pending += 1
        self.size += len(message.request_body.body)
        if message.request_body.end_of_stream or self.size == self.declared:
            out = [HEADERS, *([BODY] * self.pending)]  # answered once the whole body is in
            self.done = message.request_body.end_of_stream
            self.pending = -1
            return out
        return []


class NullProcessor(pb_grpc.ExternalProcessorServicer):
    async def Process(  # name fixed by the gRPC service definition
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        pattern = _Pattern()
        async for message in request_iterator:
            for response in pattern.on(message):
                yield response
            if pattern.done:
                return


class SyncNullProcessor(pb_grpc.ExternalProcessorServicer):
    def Process(  # name fixed by the gRPC service definition
        self, request_iterator: Iterable[pb.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ProcessingResponse]:
        pattern = _Pattern()
        for message in request_iterator:
            yield from pattern.on(message)
            if pattern.done:
                return


async def serve_aio(listen: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ExternalProcessorServicer_to_server(NullProcessor(), server)
    server.add_insecure_port(listen)
    await server.start()
    await server.wait_for_termination()


def serve_sync(listen: str, threads: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ExternalProcessorServicer_to_server(SyncNullProcessor(), server)
    server.add_insecure_port(listen)
    server.start()
    server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("listen")
    parser.add_argument("--flavour", choices=("aio", "aio-uvloop", "sync"), default="aio")
    parser.add_argument("--threads", type=int, default=32, help="sync: worker threads (one per open stream)")
    args = parser.parse_args()
    if args.flavour == "sync":
        serve_sync(args.listen, args.threads)
    elif args.flavour == "aio-uvloop":
        import uvloop

        uvloop.run(serve_aio(args.listen))
    else:
        asyncio.run(serve_aio(args.listen))


if __name__ == "__main__":
    main()
