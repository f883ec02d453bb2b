"""Translation between ext_proc protobuf messages and the decision core's plain data."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from extproc.base.wire import METADATA_NAMESPACE, SETTLE_KEY
from extproc.core.messages import Forward, HttpRequest, LocalReply
from extproc.core.peer import Peer

ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
CONTINUE_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
CONTINUE_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())


def request_from(message: pb.ProcessingRequest, peer: Peer | None = None) -> HttpRequest:
    pseudo: dict[str, str] = {}
    headers: dict[str, str] = {}
    for header in message.request_headers.headers.headers:
        value = header.raw_value.decode("latin-1") if header.raw_value else header.value
        if header.key.startswith(":"):
            pseudo[header.key] = value
        elif header.key in headers:
            headers[header.key] += "," + value
        else:
            headers[header.key] = value
    attributes: dict[str, object] = {}
    if ATTRIBUTES_KEY in message.attributes:
        for key, value in message.attributes[ATTRIBUTES_KEY].fields.items():
            kind = value.WhichOneof("kind")
            if kind == "string_value":
                attributes[key] = value.string_value
            elif kind == "number_value":
                attributes[key] = value.number_value
            elif kind == "bool_value":
                attributes[key] = value.bool_value
    return HttpRequest(
        method=pseudo.get(":method", ""),
        path=pseudo.get(":path", "/"),
        authority=pseudo.get(":authority", ""),
        headers=headers,
        attributes=attributes,
        peer=peer,
    )


def header_mutation(set_headers: Iterable[tuple[str, str]], remove: Iterable[str]) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode("latin-1")),
                                       append_action=_OVERWRITE)
            for k, v in set_headers
        ],
        remove_headers=list(remove),
    )


def _metadata(values: Mapping[str, str]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.fields[METADATA_NAMESPACE].struct_value.update(values)
    return struct


def headers_response(decision: Forward) -> pb.ProcessingResponse:
    response = pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(
                header_mutation=header_mutation(decision.set_headers, decision.remove_headers),
                clear_route_cache=decision.clear_route_cache,
            )
        )
    )
    if decision.metadata:
        response.dynamic_metadata.CopyFrom(_metadata(decision.metadata))
    return response


def body_responses(decision: Forward, chunks: int) -> list[pb.ProcessingResponse]:
    """One response per streamed chunk: the first carries the whole new body, the rest become empty."""
    if decision.body is None:
        return [CONTINUE_BODY] * chunks
    responses = [
        pb.ProcessingResponse(request_body=pb.BodyResponse(
            response=pb.CommonResponse(body_mutation=pb.BodyMutation(body=decision.body))))
    ]
    empty = pb.ProcessingResponse(request_body=pb.BodyResponse(
        response=pb.CommonResponse(body_mutation=pb.BodyMutation(body=b""))))
    responses.extend([empty] * (chunks - 1))
    return responses


def immediate_response(decision: LocalReply) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),
            headers=header_mutation(decision.headers, ()),
            body=decision.body,
            details=decision.details,
        ),
    )


def sealed_settlement(message: pb.ProcessingRequest) -> str | None:
    """The sealed settlement the decision left in the forwarded dynamic metadata, if any."""
    # (xds-protos is untyped; filter_metadata maps filter names to Structs.)
    namespace: struct_pb2.Struct | None = message.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
    if namespace is None or SETTLE_KEY not in namespace.fields:
        return None
    return namespace.fields[SETTLE_KEY].string_value


def streamed_body(body: bytes, end_of_stream: bool) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(
        body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(body=body,
                                                                                end_of_stream=end_of_stream)))))
