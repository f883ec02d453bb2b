"""Job records, header filtering, subject names, backoff and the worker's Envoy routing (no NATS needed)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from extproc.base.apis import Api
from extproc.base.tokens import Signer
from extproc.cli.jobs import envoy_router
from extproc.core.async_calls import JobLookup
from extproc.core.identity import Caller
from extproc.jobs.config import JobNames, subject_token
from extproc.jobs.errors import JobTooLarge, QueueFull, StoreUnavailable, UnknownJob
from extproc.jobs.executor import job_token
from extproc.jobs.model import Job, JobResult, JobState, JobView, StatusRecord, is_retriable_status, replay_headers
from extproc.jobs.worker import Backoff


def a_job(**changes: object) -> Job:
    fields: dict[str, object] = {"service": "user-service", "namespace": "demo", "api": "anthropic",
                                 "path": "/v1/messages?beta=true", "headers": [("content-type", "application/json")],
                                 "body": b'{"model":"m","messages":[]}\x00\xff', "reservation": "r-1",
                                 "policy_version": "v3", "now": 1700000000.5}
    fields.update(changes)
    return Job.new(**fields)  # type: ignore[arg-type]


def test_a_job_round_trips_and_keeps_binary_bodies() -> None:
    job = a_job()
    assert len(job.job_id) == 32 and job.api is Api.ANTHROPIC and job.method == "POST" and job.attempt == 0
    assert Job.decode(job.encode()) == job
    assert b"user-service" in job.encode() and b"\xff" not in job.encode()  # readable JSON, body in base64
    no_reservation = a_job(reservation=None, policy_version="")
    assert Job.decode(no_reservation.encode()) == no_reservation


@pytest.mark.parametrize("data", [b"", b"[]", b"{}", b'{"v":2}', b"not json",
                                  b'{"v":1,"id":"x","svc":"a","ns":"b","api":"openai","m":"POST","p":"/","h":[],'
                                  b'"b":"","t":0,"a":0}',
                                  b'{"v":1,"id":"0123456789abcdef0123456789abcdef","svc":"a","ns":"b","api":"grpc",'
                                  b'"m":"POST","p":"/","h":[],"b":"","t":0,"a":0}'])
def test_anything_else_is_not_a_job(data: bytes) -> None:
    with pytest.raises(ValueError):
        Job.decode(data)


def test_results_and_status_records_round_trip() -> None:
    result = JobResult("0123456789abcdef0123456789abcdef", 429, "application/json", b'{"error":{}}', 1.5, 3, "HTTP 429")
    assert JobResult.decode(result.encode()) == result
    record = StatusRecord(JobState.DEAD, "svc", "", 1.0, 5, "boom", 2.0, 3.0, 17, "openai")
    assert StatusRecord.decode(record.encode()) == record


def test_only_replayable_headers_are_stored() -> None:
    headers = replay_headers([
        (":authority", "api.openai.com"), (":path", "/v1/chat/completions"), (":method", "POST"),
        ("Content-Type", "application/json"), ("Authorization", "Bearer sk-caller"), ("x-api-key", "sk-ant"),
        ("api-key", "azure"), ("Connection", "keep-alive"), ("transfer-encoding", "chunked"),
        ("content-length", "12"), ("prefer", "respond-async"), ("x-ai-job", "forged"), ("x-envoy-internal", "true"),
        ("x-forwarded-for", "10.0.0.1"), ("accept-encoding", "gzip"), ("anthropic-version", "2023-06-01"),
        ("traceparent", "00-abc-def-01"), ("x-custom", "a"), ("x-custom", "b"),
    ])
    assert headers == (("host", "api.openai.com"), ("content-type", "application/json"),
                       ("anthropic-version", "2023-06-01"), ("traceparent", "00-abc-def-01"), ("x-custom", "a"),
                       ("x-custom", "b"))
    assert replay_headers([(":authority", "a"), ("host", "b")]) == (("host", "b"),)


def test_subject_tokens_are_safe_and_one_to_one() -> None:
    assert subject_token("user-service") == "user-service"
    assert subject_token("") == "_"
    assert subject_token("a.b") == "a%2Eb" != subject_token("a_b")
    assert subject_token("*") == "%2A" and subject_token(">") == "%3E" and subject_token("a b\t") == "a%20b%09"
    assert subject_token("50%") == "50%25"  # the escape itself is escaped: no two names share a token
    names = JobNames()
    assert names.submit_subject("", "x.y") == "ai.jobs.submit._.x%2Ey"
    assert names.result_subject("demo", "svc") == "ai.jobs.result.demo.svc"
    assert names.dead_subject("demo", "svc") == "ai.jobs.dead.demo.svc"


def test_prefixed_names_are_all_distinct_from_the_defaults() -> None:
    mine, default = JobNames.prefixed("t1"), JobNames()
    assert mine == JobNames("t1_AI_JOBS", "t1_AI_JOBS_DEAD", "t1_ai_job_results", "t1_ai_job_status", "t1.ai.jobs",
                            "t1-ai-jobs-worker")
    assert JobNames.prefixed("") == default
    with pytest.raises(ValueError):
        JobNames.prefixed("a.b")


def test_which_failures_are_retried() -> None:
    assert [s for s in (200, 400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504)
            if is_retriable_status(s)] == [408, 409, 429, 500, 502, 503, 504]


def test_backoff_doubles_up_to_its_cap_with_jitter_in_the_upper_half() -> None:
    backoff = Backoff(1.0, 10.0)
    assert [backoff.delay(n, lambda: 1.0) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 8, 10, 10]
    assert [backoff.delay(n, lambda: 0.0) for n in (1, 2, 5)] == [0.5, 1, 5]


def test_views_belong_to_their_submitter_and_dead_ones_explain_themselves() -> None:
    view = JobView("0" * 32, JobState.DEAD, "svc", "", 1.0, 5, "HTTP 503: overloaded")
    assert view.owned_by("svc", "") and not view.owned_by("svc", "other") and not view.owned_by("other", "")
    failure = view.failure()
    assert failure is not None and failure.kind.status == 503 and "5 attempt(s): HTTP 503" in failure.message
    assert b'"overloaded_error"' in failure.render(Api.ANTHROPIC)
    assert JobView("0" * 32, JobState.PENDING, "svc", "", 1.0, 0, "").failure() is None


def test_refusals_map_to_caller_errors() -> None:
    assert JobTooLarge(100, 101).api_error().kind.status == 413
    assert QueueFull("svc", 5, 5).api_error().kind.status == 429
    assert UnknownJob("x").api_error().kind.status == 404
    assert b"job_queue_full" in QueueFull("svc", 5, 5).api_error().render(Api.OPENAI)


def test_the_job_token_names_job_owner_and_reservation() -> None:
    signer = Signer(b"0123456789abcdef")
    job = a_job()
    assert signer.verify(job_token(signer, job, 60)) == {"job": job.job_id, "svc": "user-service", "ns": "demo",
                                                         "r": "r-1"}
    assert Signer(b"another key 0123456").verify(job_token(signer, job, 60)) is None


def test_the_worker_picks_the_envoy_of_the_jobs_service() -> None:
    route = envoy_router({"demo/user-service": "http://a", "order-service": "http://b"}, "http://default")
    assert route(a_job()) == "http://a"
    assert route(a_job(service="order-service", namespace="shop")) == "http://b"
    assert route(a_job(service="user-service", namespace="shop")) == "http://default"
    with pytest.raises(KeyError):
        envoy_router({}, None)(a_job())


# --- polls answer in the job's own API format; an unreachable store is a clear 503 ---------------------

class _Store:
    """Stands in for JobStore.get: returns a view, or raises."""

    def __init__(self, answer: JobView | Exception | None) -> None:
        self.answer = answer

    async def get(self, job_id: str) -> JobView | None:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


JOB_ID = "0123456789abcdef0123456789abcdef"
OWNER = Caller("order-service", "shop", None, "node")


def _poll(answer: JobView | Exception | None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    lookup = JobLookup(_Store(answer), f"/v1/ai-jobs/{JOB_ID}", headers or {}, OWNER)  # type: ignore[arg-type]
    reply = asyncio.run(lookup.reply())
    return reply.status, orjson.loads(reply.body)


def _dead(api: Api | None) -> JobView:
    return JobView(JOB_ID, JobState.DEAD, "order-service", "shop", 1.0, 5, "HTTP 500: boom", 2.0, api=api)


def test_the_status_record_keeps_the_api_of_the_call() -> None:
    record = StatusRecord(JobState.DEAD, "svc", "ns", 1.0, 5, "boom", api="anthropic")
    assert StatusRecord.decode(record.encode()).api_of_call is Api.ANTHROPIC
    assert StatusRecord(JobState.DEAD, "svc", "ns", 1.0).api_of_call is None  # written before the field
    assert StatusRecord(JobState.DEAD, "svc", "ns", 1.0, api="grpc").api_of_call is None


def test_a_dead_anthropic_job_is_answered_in_anthropic_format_whatever_the_poll_looks_like() -> None:
    # A bare GET on /v1/ai-jobs/<id> (no anthropic-version, no x-api-key) reads as an OpenAI caller.
    status, body = _poll(_dead(Api.ANTHROPIC))
    assert status == 503
    assert body["type"] == "error" and set(body) == {"type", "error"}
    error = body["error"]
    assert isinstance(error, dict) and error["type"] == "overloaded_error"
    assert "failed after 5 attempt(s): HTTP 500: boom" in error["message"]


def test_a_dead_openai_job_is_answered_in_openai_format_even_to_an_anthropic_looking_poll() -> None:
    status, body = _poll(_dead(Api.OPENAI), {"anthropic-version": "2023-06-01"})
    assert status == 503
    error = body["error"]
    assert isinstance(error, dict) and error["code"] == "job_failed" and error["type"] == "server_error"


def test_a_dead_job_of_unknown_api_falls_back_to_the_polls_format() -> None:
    assert _poll(_dead(None), {"anthropic-version": "2023-06-01"})[1]["type"] == "error"
    assert "code" in _poll(_dead(None))[1]["error"]  # type: ignore[operator]


def test_not_found_and_unavailable_stay_in_the_polls_format() -> None:
    status, body = _poll(None, {"anthropic-version": "2023-06-01"})
    assert status == 404 and body["type"] == "error"
    status, body = _poll(StoreUnavailable("NATS reconnecting"))
    assert status == 503
    error = body["error"]
    assert isinstance(error, dict) and error["code"] == "job_store_unavailable"
    assert "NATS reconnecting" in error["message"]


def test_an_unreachable_store_refuses_a_submission_with_a_503() -> None:
    error = StoreUnavailable("no answer within 1s").api_error()
    assert error.kind.status == 503 and error.code == "job_queue_unavailable"
    assert b'"job_queue_unavailable"' in error.render(Api.OPENAI)
    assert b'"overloaded_error"' in error.render(Api.ANTHROPIC)
