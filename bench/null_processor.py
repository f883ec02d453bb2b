"""The floor: an ext_proc server on the same grpcio asyncio stack that decides nothing.

It answers every message with CONTINUE and closes when the request is answered, exactly the
message pattern of the real processor, so (Envoy + null) - (Envoy direct) is the cost of the
Python gRPC hop itself, and (Envoy + processor) - (Envoy + null) is the cost of our policy work.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())


class NullProcessor(pb_grpc.ExternalProcessorServicer):
    async def Process(  # name fixed by the gRPC service definition
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        pending, size, declared = 0, 0, -1
        async for message in request_iterator:
            if message.HasField("request_headers"):
                if message.request_headers.end_of_stream:
                    yield HEADERS
                    return
                for header in message.request_headers.headers.headers:
                    if header.key == "content-length":
                        declared = int(header.raw_value)
            elif message.HasField("request_body"):
                if pending < 0:  # already answered at content-length: the empty end-of-body chunk
                    yield BODY
                    return
                pending += 1
                size += len(message.request_body.body)
                if message.request_body.end_of_stream or size == declared:
                    yield HEADERS  # answered once the whole body is in, like the real processor
                    for _ in range(pending):
                        yield BODY
                    if message.request_body.end_of_stream:
                        return
                    pending = -1


async def main(listen: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ExternalProcessorServicer_to_server(NullProcessor(), server)
    server.add_insecure_port(listen)
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
