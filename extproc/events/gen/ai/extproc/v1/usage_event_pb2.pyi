import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UsageEvent(_message.Message):
    __slots__ = ("event_id", "schema_version", "service", "namespace", "operation", "caller_api", "requested_model", "route", "provider", "gen_ai_provider_name", "response_model", "status", "outcome", "streamed", "tokens", "cost_usd", "started_at", "ended_at", "latency_ms", "ttft_ms", "cache", "variant", "hops", "policy_version", "request_id", "trace_id", "error")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    CALLER_API_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    GEN_AI_PROVIDER_NAME_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_MODEL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    STREAMED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    schema_version: int
    service: str
    namespace: str
    operation: str
    caller_api: str
    requested_model: str
    route: str
    provider: str
    gen_ai_provider_name: str
    response_model: str
    status: int
    outcome: str
    streamed: bool
    tokens: Tokens
    cost_usd: float
    started_at: _timestamp_pb2.Timestamp
    ended_at: _timestamp_pb2.Timestamp
    latency_ms: float
    ttft_ms: float
    cache: str
    variant: str
    hops: _containers.RepeatedCompositeFieldContainer[Hop]
    policy_version: str
    request_id: str
    trace_id: str
    error: str
    def __init__(self, event_id: _Optional[str] = ..., schema_version: _Optional[int] = ..., service: _Optional[str] = ..., namespace: _Optional[str] = ..., operation: _Optional[str] = ..., caller_api: _Optional[str] = ..., requested_model: _Optional[str] = ..., route: _Optional[str] = ..., provider: _Optional[str] = ..., gen_ai_provider_name: _Optional[str] = ..., response_model: _Optional[str] = ..., status: _Optional[int] = ..., outcome: _Optional[str] = ..., streamed: _Optional[bool] = ..., tokens: _Optional[_Union[Tokens, _Mapping]] = ..., cost_usd: _Optional[float] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., latency_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., cache: _Optional[str] = ..., variant: _Optional[str] = ..., hops: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., policy_version: _Optional[str] = ..., request_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class Tokens(_message.Message):
    __slots__ = ("input", "output", "cached_input", "usage_reported")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_FIELD_NUMBER: _ClassVar[int]
    USAGE_REPORTED_FIELD_NUMBER: _ClassVar[int]
    input: int
    output: int
    cached_input: int
    usage_reported: bool
    def __init__(self, input: _Optional[int] = ..., output: _Optional[int] = ..., cached_input: _Optional[int] = ..., usage_reported: _Optional[bool] = ...) -> None: ...

class Hop(_message.Message):
    __slots__ = ("provider", "model", "outcome", "started_at")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    provider: str
    model: str
    outcome: str
    started_at: _timestamp_pb2.Timestamp
    def __init__(self, provider: _Optional[str] = ..., model: _Optional[str] = ..., outcome: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
