"""The credential port: the egress gateway's ext_proc filter trades a decision's grant for the provider key.

The gateway sends the request headers, then the buffered body (docs/design/trust.md). The answer to
the body carries the header mutation: the grant removed, the credential added. Anything wrong is an
immediate 403 (503 when the key itself cannot be had) in the caller's API format. Only the gateway
may reach this port (an AuthorizationPolicy); the processor's own sidecar names the gateway in
x-forwarded-client-cert, and the gateway names the caller's sidecar in the peer-certificate attribute.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.base.apis import ApiError, ErrorKind, api_of_caller
from extproc.base.wire import GRANT_HEADER
from extproc.core.grants import redeem
from extproc.core.messages import LocalReply
from extproc.core.peer import from_spiffe_id
from extproc.core.runtime import Runtime
from extproc.server.protocol import ATTRIBUTES_KEY, header_mutation, immediate_response, request_from

log = logging.getLogger(__name__)
# The servicer context of an ext_proc stream.
Context = grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse]
PEER_ATTRIBUTE = "connection.uri_san_peer_certificate"


class CredentialSession:
    """One request through the egress gateway."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._headers: dict[str, str] = {}
        self._path = "/"
        self._method = ""
        self._authority = ""
        self._peer_uri = ""
        self._chunks: list[bytes] = []
        self.done = False

    async def on_message(self, message: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            request = request_from(message)
            self._headers, self._path, self._authority = dict(request.headers), request.path, request.authority
            self._method = request.method
            attributes = message.attributes.get(ATTRIBUTES_KEY)
            if attributes is not None and PEER_ATTRIBUTE in attributes.fields:
                self._peer_uri = attributes.fields[PEER_ATTRIBUTE].string_value
            if message.request_headers.end_of_stream:
                return await self._answer(b"", headers_phase=True)
            return [pb.ProcessingResponse(request_headers=pb.HeadersResponse())]
        if kind == "request_body":
            self._chunks.append(message.request_body.body)
            if message.request_body.end_of_stream:
                return await self._answer(b"".join(self._chunks), headers_phase=False)
            return []
        self.done = True
        return [pb.ProcessingResponse(request_trailers=pb.TrailersResponse())] if kind == "request_trailers" else []

    async def _answer(self, body: bytes, *, headers_phase: bool) -> list[pb.ProcessingResponse]:
        self.done = True
        runtime = self._runtime
        peer = from_spiffe_id(self._peer_uri) if self._peer_uri else None
        if peer is None and runtime.peer_identity:
            result: list[tuple[str, str]] | ApiError = ApiError(
                ErrorKind.PERMISSION, "credential refused: the caller's mTLS identity is unknown",
                "grant_unverified_caller")
        else:
            result = await redeem(self._headers.get(GRANT_HEADER, ""), method=self._method, path=self._path,
                                  authority=self._authority, body=body, peer=peer,
                                  signer=runtime.signer, inflight=runtime.inflight, credentials=runtime.credentials,
                                  policy=runtime.policy(), cloud=runtime.cloud)
        if isinstance(result, ApiError):
            log.warning("credential refused for %s on %s: %s", self._peer_uri or "an unidentified caller",
                        self._authority, result.message)
            runtime.metrics.tokens_refused.labels("grant").inc()
            api = api_of_caller(self._path, self._headers)
            return [immediate_response(LocalReply(result.kind.status, result.render(api), f"ai_{result.code}"))]
        common = pb.CommonResponse(header_mutation=header_mutation(result, (GRANT_HEADER,)))
        if headers_phase:
            return [pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))]
        return [pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))]


class CredentialProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def Process(  # name fixed by the gRPC service definition
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Context
    ) -> AsyncIterator[pb.ProcessingResponse]:
        session = CredentialSession(self._runtime)
        async for message in request_iterator:
            for response in await session.on_message(message):
                yield response
            if session.done:
                return
