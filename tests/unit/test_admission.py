"""Admission through the decision (extproc/core/admission.py): the bulkhead's max_in_flight refusing a call
and giving back its quota, a slot for each call whatever its request id, and a call's slot and tokens given
back when the decision fails after admitting it, or by the sweeper when its response is never read."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from extproc.core.decision import Decider, Forward, LocalReply
from tests.unit.resilience_support import OTHER_SCOPE, SCOPE, make_decider
from tests.unit.test_decision import decide, error_of, settle_json

BULKHEAD_POLICY = """\
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_KEY}}
---
service: order-service
ai_proxy:
  max_in_flight: 1
  limits: {tokens: 1000/min}
  models:
  - {name: chat, provider: openai, model: gpt-4}
  - {name: fraud_detector, provider: claude, model: claude-3, rate_limit: 2/min}
"""
CHAT = {"model": "chat", "max_tokens": 400, "messages": [{"role": "user", "content": "x"}]}


def bulkhead_rejections(decider: Decider) -> float | None:
    return decider.runtime.metrics.registry.get_sample_value("ai_extproc_bulkhead_rejections_total",
                                                     {"service": "order-service", "namespace": "shop"})


def test_bulkhead_refuses_the_second_concurrent_call_and_refunds_its_tokens(tmp_path: Path) -> None:
    decider = make_decider(tmp_path, BULKHEAD_POLICY)
    first = decide(decider, CHAT, headers={"x-request-id": "call-1"})
    assert isinstance(first, Forward)
    assert decider.runtime.bulkhead.slots.in_flight(SCOPE) == 1
    call_id = settle_json(decider, first)["id"]  # so the response side can leave
    assert call_id != "call-1" and len(call_id) == 32  # made by the processor, not the caller's request id
    remaining = int(first.metadata["remaining_tokens"])
    used = 1000 - remaining
    assert 400 < used < 500  # max_tokens plus the prompt estimate
    refused = decide(decider, CHAT, headers={"x-request-id": "call-2"})
    status, body = error_of(refused)
    assert status == 429
    assert (body["error"]["code"], body["error"]["type"]) == ("too_many_calls_in_flight", "requests")  # type: ignore[index]
    assert "max_in_flight" in body["error"]["message"]  # type: ignore[index]
    assert bulkhead_rejections(decider) == 1.0
    assert decider.runtime.bulkhead.slots.in_flight(SCOPE) == 1
    anthropic = decide(decider, {**CHAT, "model": "fraud_detector"}, path="/v1/messages",
                       headers={"x-request-id": "call-3"})
    status, body = error_of(anthropic)
    assert status == 429 and body["type"] == "error" and body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert isinstance(anthropic, LocalReply) and anthropic.details == "ai_too_many_calls_in_flight"
    assert bulkhead_rejections(decider) == 2.0
    # The first call ends; the refused ones gave their token reservations back, so a third fits the 1000/min.
    decider.runtime.bulkhead.slots.leave(SCOPE, call_id)
    third = decide(decider, CHAT, headers={"x-request-id": "call-4"})
    assert isinstance(third, Forward)
    assert int(third.metadata["remaining_tokens"]) == remaining - used
    # Another service is not held back by order-service's bulkhead.
    assert decider.runtime.bulkhead.slots.in_flight(OTHER_SCOPE) == 0


def test_bulkhead_refusal_refunds_the_request_count(tmp_path: Path) -> None:
    decider = make_decider(tmp_path, BULKHEAD_POLICY)
    body = {**CHAT, "model": "fraud_detector", "max_tokens": 10}
    first = decide(decider, body, path="/v1/messages", headers={"x-request-id": "call-1"})
    assert isinstance(first, Forward) and first.metadata["remaining_requests"] == "1"
    assert error_of(decide(decider, body, path="/v1/messages", headers={"x-request-id": "call-2"}))[0] == 429
    decider.runtime.bulkhead.slots.leave(SCOPE, settle_json(decider, first)["id"])
    third = decide(decider, body, path="/v1/messages", headers={"x-request-id": "call-3"})
    assert isinstance(third, Forward), third  # 2/min: call-2 was never sent, so one request is left
    assert third.metadata["remaining_requests"] == "0"


def test_calls_sharing_one_request_id_each_take_their_own_slot(tmp_path: Path) -> None:
    """The slot is keyed by an id the processor makes: a caller reusing x-request-id cannot share one slot."""
    decider = make_decider(tmp_path, BULKHEAD_POLICY.replace("max_in_flight: 1", "max_in_flight: 2"))
    answers = [decide(decider, CHAT, headers={"x-request-id": "same"}) for _ in range(8)]
    forwarded = [a for a in answers if isinstance(a, Forward)]
    assert len(forwarded) == 2
    assert [error_of(a)[0] for a in answers[2:]] == [429] * 6
    assert decider.runtime.bulkhead.slots.in_flight(SCOPE) == 2
    ids = {settle_json(decider, a)["id"] for a in forwarded}
    assert len(ids) == 2 and "same" not in ids


def reserved_tokens(decider: Decider) -> int:
    keys = [k for k in decider.runtime.quota._local._values if k.endswith("total_tokens") or "tokens" in k]
    return sum(asyncio.run(decider.runtime.quota.read(keys)))


@pytest.mark.parametrize("extra", [{"stop": 5}, {"temperature": []}, {"tools": 2.5}])
def test_a_call_refused_after_admission_gives_back_its_slot_and_tokens(tmp_path: Path, extra: dict[str, object]
                                                                      ) -> None:
    """Translation fails after the bulkhead and quota admitted the call: both are undone at once."""
    policy = BULKHEAD_POLICY.replace("max_in_flight: 1", "max_in_flight: 2")
    decider = make_decider(tmp_path, policy)
    for _ in range(3):  # more than max_in_flight
        refused = decide(decider, {**CHAT, "model": "fraud_detector", **extra})  # an OpenAI call to claude
        status, body = error_of(refused)
        assert status == 400, body
        assert decider.runtime.bulkhead.slots.in_flight(SCOPE) == 0
    assert reserved_tokens(decider) == 0
    assert len(decider.runtime.inflight) == 0  # type: ignore[arg-type]


def test_an_unexpected_failure_is_a_400_that_holds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decider = make_decider(tmp_path, BULKHEAD_POLICY)

    def broken(*_: object, **__: object) -> object:
        raise KeyError("internal detail")

    monkeypatch.setattr("extproc.core.forwarding.for_provider", broken)
    refused = decide(decider, CHAT)
    status, body = error_of(refused)
    assert status == 400 and body["error"]["code"] == "unprocessable_request"  # type: ignore[index]
    assert "internal detail" not in str(body) and "KeyError" not in str(body)
    assert decider.runtime.bulkhead.slots.in_flight(SCOPE) == 0
    assert reserved_tokens(decider) == 0


def test_a_decided_call_is_tracked_until_its_response_is_read(tmp_path: Path) -> None:
    decider = make_decider(tmp_path, BULKHEAD_POLICY)
    forward = decide(decider, CHAT)
    assert isinstance(forward, Forward)
    assert len(decider.runtime.inflight) == 1  # type: ignore[arg-type]
    call_id = settle_json(decider, forward)["id"]
    # The response is never read (the caller left): past the deadline the sweeper releases it, once.
    from extproc.core.admission import sweep_once

    def sweep(now: float) -> int:
        runtime = decider.runtime
        return asyncio.run(sweep_once(runtime.inflight, quota=runtime.quota, bulkhead=runtime.bulkhead,
                                      policy=runtime.policy, now=now))

    assert sweep(time.time()) == 0  # not yet due
    assert sweep(time.time() + 3600) == 1
    assert decider.runtime.bulkhead.slots.in_flight(SCOPE) == 0
    assert asyncio.run(decider.runtime.inflight.close(call_id)) is False  # a late settlement finds it released
    assert sweep(time.time() + 3600) == 0
