"""The decision with fallback (extproc/core/decision.py, extproc/core/forwarding.py): a fresh call forwarded
to its first hop with its fallback state, an open breaker skipped, every breaker open as a 503 in the caller's
format, a call moved on by the relay re-entering at its next hop without being charged again, and forged,
replayed, borrowed or cycled tokens decided afresh."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest

from extproc.base.tokens import Signer
from extproc.base.wire import FALLBACK_MARKER
from extproc.core import fallback
from extproc.core.decision import Forward, LocalReply
from extproc.server import relay as relay_module
from tests.unit.resilience_support import (
    ANTHROPIC_BODY,
    CLAUDE_KEY,
    FALLBACK_POLICY,
    OPENAI_KEY,
    SCOPE,
    Clock,
    fallbacks_counted,
    fallbacks_total,
    hop_state,
    make_decider,
    open_breaker,
    relay,
)
from tests.unit.test_decision import decide, error_of, headers_of, settle_json

OPENAI_TRANSLATED = {"model": "gpt-4o", "max_completion_tokens": 10,
                     "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}


def test_fresh_decision_forwards_to_the_first_hop_with_fallback_state(tmp_path: Path) -> None:
    decider = make_decider(tmp_path)
    forward = decide(decider, ANTHROPIC_BODY, path="/v1/messages", headers={"authorization": "Bearer app-key"})
    headers = headers_of(forward)
    assert isinstance(forward, Forward)
    assert headers[":authority"] == "api.anthropic.com" and headers[":path"] == "/v1/messages"
    assert headers["x-api-key"] == "sk-ant"
    assert headers["x-envoy-upstream-rq-per-try-timeout-ms"] == "1500"
    assert headers["x-ai-usage"] == "observe"
    assert "x-ai-fallback" not in forward.remove_headers
    assert headers["x-ai-fallback"] == FALLBACK_MARKER  # what Envoy retries on; the state is in the metadata
    state = fallback.HopState.decode(forward.metadata["fallback_state"], decider.runtime.signer)
    assert state is not None
    assert (state.namespace, state.service, state.route, state.requested, state.caller_api) == (
        "shop", "order-service", "fraud_detector", "fraud_detector", "anthropic")
    assert (state.first, state.index, state.hops, state.variant) == (("claude", "claude-3"), 0, (), "")
    assert state.settle.nonce and state.settle.policy_version == decider.runtime.policy().version
    assert "fallback_hops" not in forward.metadata
    assert forward.metadata["provider"] == "claude" and forward.metadata["limit_requests"] == "1"
    assert fallbacks_total(decider) == 0


def test_route_without_fallback_or_first_byte_timeout_carries_neither(tmp_path: Path) -> None:
    forward = decide(make_decider(tmp_path), {"model": "chat", "messages": []})
    headers = headers_of(forward)
    assert isinstance(forward, Forward)
    assert headers[":authority"] == "api.openai.com"
    assert "x-ai-fallback" not in headers and "x-ai-fallback" in forward.remove_headers
    assert "x-envoy-upstream-rq-per-try-timeout-ms" not in headers
    assert "x-envoy-upstream-rq-per-try-timeout-ms" in forward.remove_headers  # a caller's value never passes


def test_open_breaker_sends_the_fresh_call_straight_to_the_fallback(tmp_path: Path) -> None:
    decider = make_decider(tmp_path)
    open_breaker(decider, CLAUDE_KEY)
    forward = decide(decider, ANTHROPIC_BODY, path="/v1/messages", headers={"x-api-key": "app-key"})
    headers = headers_of(forward)
    assert isinstance(forward, Forward) and forward.body is not None
    assert headers[":authority"] == "api.openai.com" and headers[":path"] == "/v1/chat/completions"
    assert headers["authorization"] == "Bearer sk-openai"
    assert "x-api-key" in forward.remove_headers
    # The Anthropic caller's anthropic-version stays: Envoy's own error replies pick the caller's format by it.
    assert "anthropic-version" not in forward.remove_headers
    assert orjson.loads(forward.body) == OPENAI_TRANSLATED
    assert headers["content-length"] == str(len(forward.body))
    assert headers["x-ai-usage"] == "translate"
    # The last hop: nothing left to fall back to.
    assert "x-ai-fallback" not in headers and "x-ai-fallback" in forward.remove_headers
    assert forward.metadata["fallback_hops"] == "claude/claude-3=breaker_open, openai/gpt-4o"
    assert (forward.metadata["provider"], forward.metadata["model"]) == ("openai", "gpt-4o")
    settle = settle_json(decider, forward)
    assert [h[:3] for h in settle["h"]] == [["claude", "claude-3", "breaker_open"]]
    assert fallbacks_counted(decider, "claude", "openai", "breaker_open") == 1.0
    assert fallbacks_total(decider) == 1.0
    # Another service's breaker for the same provider and model is its own: still closed.
    other = decide(decider, ANTHROPIC_BODY, path="/v1/messages", service="user-service")
    assert headers_of(other)[":authority"] == "api.anthropic.com"


def test_all_breakers_open_is_a_503_in_the_callers_format(tmp_path: Path) -> None:
    clock = Clock()
    decider = make_decider(tmp_path, clock=clock)
    open_breaker(decider, CLAUDE_KEY)
    open_breaker(decider, OPENAI_KEY)
    refused = decide(decider, {**ANTHROPIC_BODY, "max_tokens": 10}, path="/v1/chat/completions")
    status, body = error_of(refused)
    assert status == 503
    assert body["error"]["code"] == "providers_unavailable"  # type: ignore[index]
    assert body["error"]["type"] == "server_error"  # type: ignore[index]
    assert "claude/claude-3 (breaker_open), openai/gpt-4o (breaker_open)" in body["error"]["message"]  # type: ignore[index]
    assert isinstance(refused, LocalReply)
    assert dict(refused.headers)["x-ai-fallback-hops"] == "claude/claude-3=breaker_open, openai/gpt-4o=breaker_open"
    assert refused.details == "ai_providers_unavailable"
    anthropic = decide(decider, ANTHROPIC_BODY, path="/v1/messages")
    status, body = error_of(anthropic)
    assert status == 503 and body["type"] == "error"
    assert body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert isinstance(anthropic, LocalReply) and anthropic.details == "ai_providers_unavailable"
    assert fallbacks_total(decider) == 0  # no hop was taken
    # Neither refusal used the 1/min quota: once claude may be probed, the call is admitted.
    clock.now += 10.0
    probe = decide(decider, ANTHROPIC_BODY, path="/v1/messages")
    assert headers_of(probe)[":authority"] == "api.anthropic.com"


def test_re_entry_goes_to_the_next_hop_without_charging_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    decider = make_decider(tmp_path)
    first = decide(decider, ANTHROPIC_BODY, path="/v1/messages", headers={"authorization": "Bearer app-key"})
    assert isinstance(first, Forward) and first.body is not None
    token = first.metadata["fallback_state"]
    state = fallback.HopState.decode(token, decider.runtime.signer)
    assert state is not None
    monkeypatch.setattr(relay_module, "time", SimpleNamespace(time=lambda: state.hop_started_at + 0.25))
    answer = relay(decider, {"x-ai-fallback": token}, "127.0.0.1:10000", "/v1/messages")
    assert answer.status == 307
    advanced = answer.headers["x-ai-fallback"]
    # Envoy follows the 307 internally: the same path, the body as sent to claude, the advanced state.
    again = decide(decider, orjson.loads(first.body), path="/v1/messages",
                   headers={"x-ai-fallback": advanced, "x-api-key": "sk-ant", "anthropic-version": "2023-06-01"})
    headers = headers_of(again)
    assert isinstance(again, Forward) and again.body is not None
    assert headers[":authority"] == "api.openai.com" and headers[":path"] == "/v1/chat/completions"
    assert headers["authorization"] == "Bearer sk-openai"
    assert "x-api-key" in again.remove_headers and "anthropic-version" not in again.remove_headers
    assert orjson.loads(again.body) == OPENAI_TRANSLATED
    assert headers["content-length"] == str(len(again.body))
    assert headers["x-ai-usage"] == "translate"
    assert headers["x-envoy-upstream-rq-per-try-timeout-ms"] == "1500"
    assert "x-ai-fallback" not in headers and "x-ai-fallback" in again.remove_headers
    assert again.metadata["fallback_hops"] == "claude/claude-3=upstream_error, openai/gpt-4o"
    assert "limit_requests" not in again.metadata  # not admitted (nor counted) a second time
    settle = settle_json(decider, again)
    assert (settle["p"], settle["m"], settle["api"], settle["ca"]) == ("openai", "gpt-4o", "openai", "anthropic")
    # The 1/min limit: the re-entry above was still admitted, while a second fresh call is refused.
    status, body = error_of(decide(decider, ANTHROPIC_BODY, path="/v1/messages"))
    assert status == 429 and body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_re_entry_skips_a_next_hop_whose_breaker_is_open(tmp_path: Path) -> None:
    decider = make_decider(tmp_path)
    first = decide(decider, ANTHROPIC_BODY, path="/v1/messages")
    answer = relay(decider, {"x-ai-fallback": first.metadata["fallback_state"]}, "h", "/v1/messages")
    open_breaker(decider, OPENAI_KEY)
    refused = decide(decider, ANTHROPIC_BODY, path="/v1/messages", headers={"x-ai-fallback": answer.headers[
        "x-ai-fallback"]})
    status, body = error_of(refused)
    assert status == 503 and body["type"] == "error"  # the caller's (Anthropic) format
    assert isinstance(refused, LocalReply) and refused.details == "ai_providers_unavailable"
    hops = dict(refused.headers)["x-ai-fallback-hops"]
    assert hops.startswith("claude/claude-3=") and hops.endswith(", openai/gpt-4o=breaker_open")


@pytest.mark.parametrize("forged", [
    "garbage",
    "v1.e30.AAAA",
    hop_state(index=1).encode(Signer(b"x" * 32)),  # a well-formed state with another key
])
def test_forged_fallback_header_on_a_fresh_call_is_ignored(tmp_path: Path, forged: str) -> None:
    decider = make_decider(tmp_path)
    forward = decide(decider, ANTHROPIC_BODY, path="/v1/messages", headers={"x-ai-fallback": forged})
    headers = headers_of(forward)
    assert isinstance(forward, Forward)
    assert headers[":authority"] == "api.anthropic.com"  # hop 0, decided afresh
    assert forward.metadata["fallback_state"] != forged
    assert forward.metadata["limit_requests"] == "1" and forward.metadata["remaining_requests"] == "0"  # charged
    assert error_of(decide(decider, ANTHROPIC_BODY, path="/v1/messages"))[0] == 429


def test_replayed_first_hop_token_is_decided_and_charged_afresh(tmp_path: Path) -> None:
    """A genuine token at index 0 is what every first attempt carries: it never exempts a call from quota."""
    decider = make_decider(tmp_path)
    first = decide(decider, {"model": "chat", "messages": []})
    assert isinstance(first, Forward)
    token = decide(decider, ANTHROPIC_BODY, path="/v1/messages").metadata["fallback_state"]
    replayed = decide(decider, ANTHROPIC_BODY, path="/v1/messages", headers={"x-ai-fallback": token})
    assert error_of(replayed)[0] == 429


def test_re_entry_token_of_another_service_is_not_honoured(tmp_path: Path) -> None:
    decider = make_decider(tmp_path)
    first = decide(decider, ANTHROPIC_BODY, path="/v1/messages")
    token = relay(decider, {"x-ai-fallback": first.metadata["fallback_state"]}, "h", "/v1/messages"
                  ).headers["x-ai-fallback"]
    borrowed = decide(decider, ANTHROPIC_BODY, path="/v1/messages", service="user-service",
                      headers={"x-ai-fallback": token})
    assert isinstance(borrowed, Forward)
    settle = settle_json(decider, borrowed)
    assert settle["sv"] == "user-service"
    assert headers_of(borrowed)[":authority"] == "api.anthropic.com"  # decided afresh for user-service


def test_a_hop_token_cannot_be_cycled_through_the_decision(tmp_path: Path) -> None:
    """A decision honours only the relay's tokens, and mints only tokens the relay takes: an app holding a
    relayed token gets one uncharged hop from it, and the token it gets back is no good at a decision."""
    decider = make_decider(tmp_path, FALLBACK_POLICY.replace("fallback: [openai/gpt-4o]",
                                                             "fallback: [openai/gpt-4o, openai/gpt-4o-mini]", 1))
    first = decide(decider, ANTHROPIC_BODY, path="/v1/messages")
    relayed = relay(decider, {"x-ai-fallback": first.metadata["fallback_state"]}, "h", "/v1/messages"
                    ).headers["x-ai-fallback"]
    hop = decide(decider, ANTHROPIC_BODY, path="/v1/messages", headers={"x-ai-fallback": relayed})
    assert isinstance(hop, Forward) and headers_of(hop)[":authority"] == "api.openai.com"  # uncharged hop 1
    minted = hop.metadata["fallback_state"]  # its own token for hop 1 (a third hop is left): only the relay takes it
    again = decide(decider, ANTHROPIC_BODY, path="/v1/messages", headers={"x-ai-fallback": minted})
    assert error_of(again)[0] == 429  # decided afresh: charged, and the 1/min limit is spent
    onward = relay(decider, {"x-ai-fallback": minted}, "h", "/v1/chat/completions")
    assert onward.status == 307  # at the relay it moves the call on, once: the chain bounds the hops
    assert error_of(decide(decider, ANTHROPIC_BODY, path="/v1/messages",
                           headers={"x-ai-fallback": relayed}))[0] == 429  # and the relayed one is used up
    assert relay(decider, {"x-ai-fallback": relayed}, "h", "/v1/messages").status == 502  # not at the relay either


def test_a_fallback_hop_refused_by_the_decision_gives_back_what_the_call_holds(tmp_path: Path) -> None:
    """All the next hops' breakers open: the call ends at the decision, with no response stream to settle it."""
    policy = FALLBACK_POLICY.replace("  models:\n  - name: fraud_detector", "  max_in_flight: 1\n  models:\n"
                                     "  - name: fraud_detector", 1)
    decider = make_decider(tmp_path, policy)
    first = decide(decider, ANTHROPIC_BODY, path="/v1/messages")
    assert isinstance(first, Forward) and decider.runtime.bulkhead.slots.in_flight(SCOPE) == 1
    assert len(decider.runtime.inflight) == 1  # type: ignore[arg-type]
    relayed = relay(decider, {"x-ai-fallback": first.metadata["fallback_state"]}, "h", "/v1/messages"
                    ).headers["x-ai-fallback"]
    open_breaker(decider, OPENAI_KEY)
    refused = decide(decider, ANTHROPIC_BODY, path="/v1/messages", headers={"x-ai-fallback": relayed})
    assert error_of(refused)[0] == 503
    assert decider.runtime.bulkhead.slots.in_flight(SCOPE) == 0  # given back now, not at the sweep
    assert len(decider.runtime.inflight) == 0  # type: ignore[arg-type]
