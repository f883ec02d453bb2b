"""The ext_proc protocol sessions without gRPC or Envoy: hand-built ``ProcessingRequest``s in, the exact
``ProcessingResponse``s out, and what a call holds (bulkhead slot, in-flight record, token reservation)
after its streams end, normally or cut.

The decision stream (:class:`Session`) answers the headers only once the body is in: at end_of_stream, at
the trailers, or as soon as the body reaches its declared content-length. The usage stream
(:class:`UsageSession`) reads the provider's answer and settles the call: silently in observability mode,
or full duplex when it strips the usage chunk the decision asked for on the caller's behalf.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import cast

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.core.admission import sweep_once
from extproc.core.decision import Decider
from extproc.core.identity import ATTR_APP, ATTR_NAMESPACE
from extproc.core.settlement import SettleInfo, Settlement
from extproc.server.processor import AsyncExternalProcessor, Session, UsageSession
from extproc.server.protocol import ATTRIBUTES_KEY
from extproc.telemetry.record import CallRecord
from extproc.telemetry.telemetry import Telemetry
from tests.unit.resilience_support import SCOPE, make_decider

POLICY = """\
mesh:
  max_body_bytes: 1024
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_KEY}}
---
service: order-service
ai_proxy:
  max_in_flight: 2
  limits: {tokens: 10000/min}
  models:
  - {name: chat, provider: openai, model: gpt-4}
  - {name: fraud_detector, provider: claude, model: claude-3}
"""
METADATA = "ai.extproc"  # the dynamic-metadata namespace Envoy hands from the decision to the usage stream
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
CHAT_BODY = {"model": "chat", "max_tokens": 50, "messages": [{"role": "user", "content": "tell me a story"}]}
CLAUDE_BODY = {"model": "fraud_detector", "max_tokens": 50, "messages": [{"role": "user", "content": "is it fraud?"}]}
CONTINUE_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
CONTINUE_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())

Responses = list[pb.ProcessingResponse]


# --- building requests -------------------------------------------------------------------------------------


def header_map(headers: Mapping[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])


def request_headers(path: str = CHAT, *, method: str = "POST", headers: Mapping[str, str] | None = None,
                    end_of_stream: bool = False) -> pb.ProcessingRequest:
    """The first message of a decision stream, from order-service in namespace shop (its node metadata)."""
    sent = {":method": method, ":path": path, ":authority": "ai.local", ":scheme": "http",
            "content-type": "application/json", **(headers or {})}
    message = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map(sent),
                                                                  end_of_stream=end_of_stream))
    message.attributes[ATTRIBUTES_KEY].update({ATTR_NAMESPACE: "shop", ATTR_APP: "order-service"})
    return message


def body_chunk(data: bytes, *, end: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=end))


def request_trailers() -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_trailers=pb.HttpTrailers())


def response_headers(decided: pb.ProcessingResponse, content_type: str, *, observe: bool,
                     status: int = 200) -> pb.ProcessingRequest:
    """The first message of a usage stream: Envoy forwards the decision's dynamic metadata with it."""
    message = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(headers=header_map({":status": str(status), "content-type": content_type})),
        observability_mode=observe)
    message.metadata_context.filter_metadata[METADATA].CopyFrom(decided.dynamic_metadata.fields[METADATA].struct_value)
    return message


def response_body(data: bytes, *, end: bool = False, observe: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=end), observability_mode=observe)


def streamed(data: bytes, end: bool = False) -> pb.ProcessingResponse:
    """A full-duplex response-body answer carrying ``data``."""
    return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(
        body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(body=data, end_of_stream=end)))))


def sse(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def delta(text: str, *, usage_null: bool = False) -> dict[str, object]:
    chunk: dict[str, object] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4",
                                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return {**chunk, "usage": None} if usage_null else chunk


USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
USAGE_CHUNK = sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4", "choices": [],
                   "usage": USAGE})
DONE = b"data: [DONE]\n\n"


# --- driving sessions --------------------------------------------------------------------------------------


def send(session: Session | UsageSession, message: pb.ProcessingRequest) -> Responses:
    return asyncio.run(session.on_message(message))


def answer_all(session: Session | UsageSession, messages: list[pb.ProcessingRequest]) -> list[Responses]:
    """What the session answers to each message, one list per message."""
    return [send(session, message) for message in messages]


def decide_call(decider: Decider, body: Mapping[str, object], path: str = CHAT) -> Responses:
    """A call decided and forwarded in one chunk: the headers answer (which carries the sealed settlement)
    and the body answer."""
    session = Session(decider)
    assert send(session, request_headers(path)) == []
    answers = send(session, body_chunk(orjson.dumps(body), end=True))
    assert kinds(answers) == ["request_headers", "request_body"], answers
    return answers


def usage_session(decider: Decider, decided: pb.ProcessingResponse, *, strip: bool) -> UsageSession:
    """The usage stream of a decided call, as the processor opens it from the forwarded metadata."""
    info = settle_info(decider, decided)
    return UsageSession(Settlement(info, decider.runtime, strip))


class NoPeer:
    """The servicer context of a stream without an XFCC header (no verified peer)."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


def streams_open(decider: Decider, kind: str) -> float | None:
    return decider.runtime.metrics.registry.get_sample_value("ai_extproc_streams_in_flight", {"kind": kind})


def process(decider: Decider, messages: list[pb.ProcessingRequest], kind: str, *, cancelled: bool = False
            ) -> tuple[Responses, list[float | None]]:
    """Run the servicer over ``messages``; the stream then ends (Envoy half-closes) or is cancelled (the RPC
    is reset). Returns what it sent, and the open-stream gauge each time it asked for the next message."""
    gauge: list[float | None] = []

    async def requests() -> AsyncIterator[pb.ProcessingRequest]:
        for message in messages:
            yield message
            gauge.append(streams_open(decider, kind))
        if cancelled:
            raise asyncio.CancelledError

    async def run() -> Responses:
        sent: Responses = []
        context = cast(grpc.aio.ServicerContext, NoPeer())
        try:
            async for response in AsyncExternalProcessor(decider).Process(requests(), context):
                sent.append(response)
        except asyncio.CancelledError:
            assert cancelled, "only a cancelled stream raises"
        else:
            assert not cancelled, "the cancellation was swallowed"
        return sent

    return asyncio.run(run()), gauge


# --- reading responses -------------------------------------------------------------------------------------


def kinds(responses: Responses) -> list[str | None]:
    return [r.WhichOneof("response") for r in responses]


def set_headers(response: pb.ProcessingResponse) -> dict[str, str]:
    mutation = response.request_headers.response.header_mutation
    return {o.header.key: o.header.raw_value.decode() for o in mutation.set_headers}


def removed_headers(response: pb.ProcessingResponse) -> list[str]:
    return list(response.request_headers.response.header_mutation.remove_headers)


def replaced_body(response: pb.ProcessingResponse) -> bytes:
    """The body a request-body answer puts in place of its chunk (b"" clears the chunk)."""
    mutation = response.request_body.response.body_mutation
    assert mutation.WhichOneof("mutation") == "body", response
    return mutation.body


def metadata(response: pb.ProcessingResponse) -> dict[str, str]:
    fields = response.dynamic_metadata.fields[METADATA].struct_value.fields
    return {key: value.string_value for key, value in fields.items()}


def immediate(response: pb.ProcessingResponse) -> tuple[int, dict[str, object], str]:
    assert response.WhichOneof("response") == "immediate_response", response
    reply = response.immediate_response
    content_type = {o.header.key: o.header.raw_value for o in reply.headers.set_headers}["content-type"]
    assert content_type == b"application/json"
    return reply.status.code, orjson.loads(reply.body), reply.details


def settle_info(decider: Decider, decided: pb.ProcessingResponse) -> SettleInfo:
    info = SettleInfo.unseal(metadata(decided)["settle"], decider.runtime.signer)
    assert info is not None, "the settlement is not sealed with the processor's key"
    return info


def tokens_used(decider: Decider, info: SettleInfo) -> int:
    """The service's total-token counter for this minute, as the call's reservation names it."""
    assert info.reservation is not None
    keys = [k for k, m in zip(info.reservation.keys, info.reservation.metrics, strict=True) if m == "total_tokens"]
    assert len(keys) == 1, info.reservation
    return asyncio.run(decider.runtime.quota.read(keys))[0]


def calls_counted(decider: Decider, outcome: str) -> float:
    """ai_extproc_calls for one outcome, over every caller and model label."""
    registry = decider.runtime.metrics.registry
    return sum(sample.value for metric in registry.collect() if metric.name == "ai_extproc_calls"
               for sample in metric.samples
               if sample.name == "ai_extproc_calls_total" and sample.labels["outcome"] == outcome)


def holds_nothing(decider: Decider) -> bool:
    return decider.runtime.bulkhead.slots.in_flight(SCOPE) == 0 and len(decider.runtime.inflight) == 0  # type: ignore[arg-type]


class Records:
    """A telemetry sink that keeps the call records it receives."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    def emit(self, record: CallRecord) -> None:
        self.records.append(record)


def decider_for(tmp_path: Path) -> tuple[Decider, Records]:
    decider = make_decider(tmp_path, POLICY)
    sink = Records()
    decider.runtime.telemetry = Telemetry([sink])
    return decider, sink


# --- 1-3. when the decision stream answers -----------------------------------------------------------------


def test_reaching_the_content_length_answers_before_the_end_of_stream_chunk(tmp_path: Path) -> None:
    decider, _ = decider_for(tmp_path)
    body = orjson.dumps(CHAT_BODY)
    session = Session(decider)
    assert send(session, request_headers(headers={"content-length": str(len(body)),
                                                  "authorization": "Bearer app-key"})) == []
    assert send(session, body_chunk(body[:20])) == []  # not all in yet
    answers = send(session, body_chunk(body[20:]))  # content-length reached; end_of_stream still to come
    assert kinds(answers) == ["request_headers", "request_body", "request_body"]  # headers, then one per chunk
    headers = set_headers(answers[0])
    sent = replaced_body(answers[1])
    assert orjson.loads(sent) == {**CHAT_BODY, "model": "gpt-4"}  # the logical name became the provider's model
    assert headers[":authority"] == "api.openai.com" and headers[":path"] == CHAT
    assert headers["authorization"] == "Bearer sk-openai"  # the caller's key is replaced by the provider's
    assert headers["content-length"] == str(len(sent))
    assert headers["x-ai-usage"] == "observe"  # a token quota: the response is read to settle it
    assert "x-api-key" in removed_headers(answers[0])
    assert answers[0].request_headers.response.clear_route_cache
    assert {k: metadata(answers[0])[k] for k in ("provider", "model", "route", "service")} == {
        "provider": "openai", "model": "gpt-4", "route": "chat", "service": "order-service"}
    assert replaced_body(answers[2]) == b""  # the second chunk is cleared: the first carries the whole body
    assert not session.done  # the end_of_stream chunk is still owed an answer
    assert decider.runtime.bulkhead.slots.in_flight(SCOPE) == 1  # admitted at the decision
    assert calls_counted(decider, "forwarded") == 1
    assert send(session, body_chunk(b"", end=True)) == [CONTINUE_BODY]
    assert session.done


def test_a_body_without_content_length_is_decided_at_its_end(tmp_path: Path) -> None:
    decider, _ = decider_for(tmp_path)
    body = orjson.dumps(CLAUDE_BODY)
    session = Session(decider)
    parts = [body[:10], body[10:30], body[30:]]
    answers = answer_all(session, [request_headers(MESSAGES, headers={"x-api-key": "app-key"}),
                                   body_chunk(parts[0]), body_chunk(parts[1]), body_chunk(parts[2], end=True)])
    assert answers[:3] == [[], [], []]
    decided = answers[3]
    assert kinds(decided) == ["request_headers", "request_body", "request_body", "request_body"]
    headers = set_headers(decided[0])
    assert headers[":authority"] == "api.anthropic.com" and headers[":path"] == MESSAGES
    assert headers["x-api-key"] == "sk-ant" and headers["anthropic-version"] == "2023-06-01"
    assert "authorization" in removed_headers(decided[0])
    assert orjson.loads(replaced_body(decided[1])) == {**CLAUDE_BODY, "model": "claude-3"}
    assert [replaced_body(r) for r in decided[2:]] == [b"", b""]
    assert session.done


def test_trailers_end_the_body_and_are_answered_after_the_decision(tmp_path: Path) -> None:
    decider, _ = decider_for(tmp_path)
    session = Session(decider)
    answers = answer_all(session, [request_headers(), body_chunk(orjson.dumps(CHAT_BODY)), request_trailers()])
    assert answers[:2] == [[], []]  # the last chunk is not end_of_stream: the trailers end the body
    decided = answers[2]
    assert kinds(decided) == ["request_headers", "request_body", "request_trailers"]
    assert set_headers(decided[0])[":authority"] == "api.openai.com"
    assert orjson.loads(replaced_body(decided[1]))["model"] == "gpt-4"
    assert decided[2] == CONTINUE_TRAILERS
    assert session.done


def test_a_refusal_at_the_trailers_is_not_followed_by_a_trailers_answer(tmp_path: Path) -> None:
    decider, _ = decider_for(tmp_path)
    session = Session(decider)
    body = orjson.dumps({**CHAT_BODY, "model": "gpt-5-ultra"})
    answers = answer_all(session, [request_headers(), body_chunk(body), request_trailers()])
    assert answers[:2] == [[], []]
    assert len(answers[2]) == 1  # the immediate response ends the request: no CONTINUE_TRAILERS after it
    status, error, _ = immediate(answers[2][0])
    assert status == 403 and error["error"]["code"] == "model_not_allowed"  # type: ignore[index]
    assert session.done


# --- 4-5. refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "expected"), [
    (CHAT, {"error": {"message": "request body exceeds the limit of 1024 bytes", "type": "invalid_request_error",
                      "param": None, "code": "request_too_large"}}),
    (MESSAGES, {"type": "error", "error": {"type": "request_too_large",
                                           "message": "request body exceeds the limit of 1024 bytes"}}),
])
def test_a_body_over_max_body_bytes_is_refused_at_the_chunk_that_crosses_it(
        tmp_path: Path, path: str, expected: dict[str, object]) -> None:
    decider, _ = decider_for(tmp_path)
    session = Session(decider)
    answers = answer_all(session, [request_headers(path), body_chunk(b"x" * 600), body_chunk(b"y" * 600)])
    assert answers[:2] == [[], []]  # 600 bytes fit the policy's 1024
    assert len(answers[2]) == 1  # 1200: refused at once, before end_of_stream, and nothing else is answered
    status, error, details = immediate(answers[2][0])
    assert (status, error, details) == (413, expected, "ai_request_too_large")
    assert session.done  # the stream closes: no headers response, so nothing reaches the provider
    assert holds_nothing(decider) and decider.runtime.quota.stats.admitted == 0


def test_a_body_over_max_body_bytes_is_counted_and_recorded_like_other_refusals(tmp_path: Path) -> None:
    decider, sink = decider_for(tmp_path)
    answers = answer_all(Session(decider), [request_headers(), body_chunk(b"x" * 1025)])
    assert immediate(answers[1][0])[0] == 413
    assert calls_counted(decider, "request_too_large") == 1
    assert [r.outcome for r in sink.records] == ["refused:request_too_large"]


@pytest.mark.parametrize(("path", "envelope"), [
    (CHAT, {"error": {"type": "invalid_request_error", "param": None, "code": "invalid_json"}}),
    (MESSAGES, {"type": "error", "error": {"type": "invalid_request_error"}}),
])
def test_malformed_json_is_a_400_in_the_callers_format(tmp_path: Path, path: str, envelope: dict[str, object]
                                                       ) -> None:
    decider, sink = decider_for(tmp_path)
    session = Session(decider)
    answers = answer_all(session, [request_headers(path), body_chunk(b'{"model": "chat", ', end=True)])
    assert answers[0] == []
    assert len(answers[1]) == 1 and session.done
    status, error, details = immediate(answers[1][0])
    assert (status, details) == (400, "ai_invalid_json")
    message = error["error"].pop("message")  # type: ignore[attr-defined]
    assert str(message).startswith("request body is not valid JSON")
    assert error == envelope
    assert holds_nothing(decider)
    assert calls_counted(decider, "invalid_json") == 1 and [r.outcome for r in sink.records] == [
        "refused:invalid_json"]


def test_a_model_outside_the_policy_is_a_403_naming_the_allowed_models(tmp_path: Path) -> None:
    decider, sink = decider_for(tmp_path)
    session = Session(decider)
    body = orjson.dumps({**CHAT_BODY, "model": "gpt-5-ultra"})
    answers = answer_all(session, [request_headers(), body_chunk(body, end=True)])
    status, error, details = immediate(answers[1][0])
    assert (status, details) == (403, "ai_model_not_allowed")
    assert error == {"error": {
        "message": "model 'gpt-5-ultra' is not allowed for shop/order-service; allowed models: chat, fraud_detector",
        "type": "permission_error", "param": "model", "code": "model_not_allowed"}}
    assert len(answers[1]) == 1 and session.done
    assert holds_nothing(decider) and decider.runtime.quota.stats.admitted == 0
    assert calls_counted(decider, "model_not_allowed") == 1
    assert [r.outcome for r in sink.records] == ["refused:model_not_allowed"]


# --- 6-7. the usage stream ---------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [True, False])
def test_observability_mode_answers_nothing_and_settles_on_the_reported_usage(
        tmp_path: Path, streaming: bool) -> None:
    decider, sink = decider_for(tmp_path)
    if streaming:  # the caller asked for the usage chunk itself: it is read, not stripped
        decided = decide_call(decider, {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}})[0]
        content_type = "text/event-stream"
        chunks = [sse(delta("Once upon", usage_null=True)), sse(delta(" a time", usage_null=True)) + USAGE_CHUNK,
                  DONE]
    else:
        decided = decide_call(decider, CHAT_BODY)[0]
        content_type = "application/json"
        answer = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "usage": USAGE, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Once upon a time"}}]})
        chunks = [answer[:25], answer[25:60], answer[60:]]
    assert set_headers(decided)["x-ai-usage"] == "observe"
    info = settle_info(decider, decided)
    reserved = tokens_used(decider, info)
    assert reserved == info.input_estimate + 50  # prompt estimate plus max_tokens, held while the call runs
    assert decider.runtime.bulkhead.slots.in_flight(SCOPE) == 1
    session = usage_session(decider, decided, strip=False)
    messages = [response_headers(decided, content_type, observe=True),
                *(response_body(c, observe=True, end=i == len(chunks) - 1) for i, c in enumerate(chunks))]
    assert answer_all(session, messages) == [[]] * len(messages)  # Envoy expects no answer in this mode
    assert session.done
    assert tokens_used(decider, info) == USAGE["total_tokens"]  # settled on the provider's own count
    assert holds_nothing(decider)
    (record,) = sink.records
    assert (record.outcome, record.status, record.usage_reported) == ("ok", 200, True)
    assert (record.input_tokens, record.output_tokens) == (USAGE["prompt_tokens"], USAGE["completion_tokens"])
    assert record.streamed is streaming


def test_strip_mode_removes_the_injected_usage_chunk_and_passes_the_rest_in_order(tmp_path: Path) -> None:
    decider, sink = decider_for(tmp_path)
    decided, body = decide_call(decider, {**CHAT_BODY, "stream": True})  # the caller did not ask for usage: we did
    assert set_headers(decided)["x-ai-usage"] == "strip"
    assert orjson.loads(replaced_body(body))["stream_options"] == {"include_usage": True}
    info = settle_info(decider, decided)
    session = usage_session(decider, decided, strip=True)
    first = sse(delta("Once", usage_null=True))  # the provider marks every chunk once usage is asked for
    plain = sse(delta(" upon")) + sse(delta(" a time"))  # two events in one chunk, without the marker
    answers = answer_all(session, [
        response_headers(decided, "text/event-stream", observe=False),
        response_body(first[:17]),  # half an event: held until it is whole
        response_body(first[17:]),
        response_body(plain),
        response_body(USAGE_CHUNK),  # ours: removed
        response_body(DONE),
        response_body(b"", end=True),
    ])
    assert answers == [
        [RESPONSE_HEADERS],
        [],
        [streamed(sse(delta("Once")))],  # whole again, minus the "usage":null we caused
        [streamed(plain)],  # unchanged
        [],
        [streamed(DONE)],
        [streamed(b"", end=True)],  # the end of stream is always passed on, even with nothing left
    ]
    assert session.done
    assert tokens_used(decider, info) == USAGE["total_tokens"]
    assert holds_nothing(decider)
    assert [r.outcome for r in sink.records] == ["ok"]


def test_strip_mode_trailers_flush_the_held_tail_then_answer_the_trailers(tmp_path: Path) -> None:
    decider, sink = decider_for(tmp_path)
    decided = decide_call(decider, {**CHAT_BODY, "stream": True})[0]
    info = settle_info(decider, decided)
    session = usage_session(decider, decided, strip=True)
    answers = answer_all(session, [
        response_headers(decided, "text/event-stream", observe=False),
        response_body(sse(delta("Once", usage_null=True)) + USAGE_CHUNK),
        response_body(b"data: [DONE]"),  # an unterminated last event: held, as it may still be growing
        pb.ProcessingRequest(response_trailers=pb.HttpTrailers()),
    ])
    assert answers[1] == [streamed(sse(delta("Once")))]
    assert answers[2] == []
    assert answers[3] == [streamed(b"data: [DONE]"), RESPONSE_TRAILERS]
    assert session.done
    assert tokens_used(decider, info) == USAGE["total_tokens"]
    assert holds_nothing(decider) and [r.outcome for r in sink.records] == ["ok"]


# --- 8. cut streams ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cancelled", [False, True])
def test_a_request_stream_cut_before_its_body_is_in_holds_nothing(tmp_path: Path, cancelled: bool) -> None:
    decider, sink = decider_for(tmp_path)
    body = orjson.dumps(CHAT_BODY)
    messages = [request_headers(headers={"content-length": str(len(body))}), body_chunk(body[:30])]
    sent, gauge = process(decider, messages, "decision", cancelled=cancelled)
    assert sent == []  # nothing was decided, so nothing was forwarded
    assert gauge == [1.0, 1.0]  # the stream counted as open while it ran...
    assert streams_open(decider, "decision") == 0.0  # ...and no longer once it ended
    assert holds_nothing(decider) and decider.runtime.quota.stats.admitted == 0  # admission happens at the decision
    assert sink.records == []


def test_a_request_stream_cut_after_its_decision_leaves_the_call_to_the_sweeper(tmp_path: Path) -> None:
    """Decided at content-length, then reset before end_of_stream: the call may be on its way to the provider,
    so its slot and reservation stay held for its response stream, or, if none comes, for the sweeper."""
    decider, _ = decider_for(tmp_path)
    body = orjson.dumps(CHAT_BODY)
    messages = [request_headers(headers={"content-length": str(len(body))}), body_chunk(body)]
    sent, _ = process(decider, messages, "decision", cancelled=True)
    assert kinds(sent) == ["request_headers", "request_body"]
    assert streams_open(decider, "decision") == 0.0
    info = settle_info(decider, sent[0])
    assert decider.runtime.bulkhead.slots.in_flight(SCOPE) == 1 and len(decider.runtime.inflight) == 1  # type: ignore[arg-type]
    runtime = decider.runtime
    swept = asyncio.run(sweep_once(runtime.inflight, quota=runtime.quota, bulkhead=runtime.bulkhead,
                                   policy=runtime.policy, now=time.time() + 3600))
    assert swept == 1
    assert holds_nothing(decider)
    assert tokens_used(decider, info) == info.input_estimate  # what was sent is charged, the output given back


@pytest.mark.parametrize("cancelled", [False, True])
def test_a_usage_stream_cut_mid_body_settles_on_an_estimate(tmp_path: Path, cancelled: bool) -> None:
    decider, sink = decider_for(tmp_path)
    decided = decide_call(decider, {**CHAT_BODY, "stream": True})[0]
    info = settle_info(decider, decided)
    first, second = sse(delta("Once upon", usage_null=True)), sse(delta(" a time"))
    messages = [response_headers(decided, "text/event-stream", observe=False), response_body(first),
                response_body(second)]
    sent, gauge = process(decider, messages, "usage", cancelled=cancelled)
    assert sent == [RESPONSE_HEADERS, streamed(sse(delta("Once upon"))), streamed(second)]
    assert gauge == [1.0, 1.0, 1.0] and streams_open(decider, "usage") == 0.0
    output = math.ceil(len("Once upon a time") / 4)  # no usage chunk came: estimated from the text seen
    assert tokens_used(decider, info) == info.input_estimate + output
    assert holds_nothing(decider)  # the slot is given back at once, not at the sweep
    (record,) = sink.records
    assert (record.outcome, record.error, record.usage_reported) == ("cut", "stream_cut", False)
    assert (record.input_tokens, record.output_tokens) == (info.input_estimate, output)


def test_a_usage_stream_through_the_servicer_in_observability_mode_sends_nothing(tmp_path: Path) -> None:
    """The servicer opens the usage stream from the metadata alone, in the mode the first message says."""
    decider, sink = decider_for(tmp_path)
    decided = decide_call(decider, CHAT_BODY)[0]
    info = settle_info(decider, decided)
    answer = orjson.dumps({"choices": [{"message": {"content": "hi"}}], "usage": USAGE})
    sent, gauge = process(decider, [response_headers(decided, "application/json", observe=True),
                                    response_body(answer, end=True, observe=True)], "usage")
    assert sent == []
    assert gauge == [1.0] and streams_open(decider, "usage") == 0.0  # done at end_of_stream: no further read
    assert tokens_used(decider, info) == USAGE["total_tokens"]
    assert holds_nothing(decider) and [r.outcome for r in sink.records] == ["ok"]


# --- 9. body-less requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "authority", "credential"), [
    ({"authorization": "Bearer app-key"}, "api.openai.com", ("authorization", "Bearer sk-openai")),
    ({"anthropic-version": "2023-06-01"}, "api.anthropic.com", ("x-api-key", "sk-ant")),
])
def test_get_models_is_forwarded_on_its_headers_with_the_services_provider(
        tmp_path: Path, headers: dict[str, str], authority: str, credential: tuple[str, str]) -> None:
    decider, _ = decider_for(tmp_path)
    session = Session(decider)
    answers = send(session, request_headers("/v1/models", method="GET", headers=headers, end_of_stream=True))
    assert kinds(answers) == ["request_headers"]  # no body answer: there is no body
    mutation = set_headers(answers[0])
    assert (mutation[":authority"], mutation[":path"]) == (authority, "/v1/models")
    assert mutation[credential[0]] == credential[1]
    assert {"authorization", "x-api-key"} - {credential[0]} <= set(removed_headers(answers[0]))
    assert session.done  # end_of_stream on the headers: nothing more will come
    assert holds_nothing(decider)


def test_a_body_less_post_to_an_ai_endpoint_is_refused_on_its_headers(tmp_path: Path) -> None:
    decider, _ = decider_for(tmp_path)
    session = Session(decider)
    answers = send(session, request_headers(end_of_stream=True))
    assert len(answers) == 1
    status, error, details = immediate(answers[0])
    assert (status, details) == (400, "ai_empty_body")
    assert error["error"]["message"] == "request body is empty"  # type: ignore[index]
    assert session.done
