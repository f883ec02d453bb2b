"""The relay (extproc/server/relay.py) that moves a failed call on to its next hop: a 307 with the advanced
state, a first-byte timeout told from an upstream error by the time elapsed, a missing, forged, expired or
exhausted state as a 502 in the path's format, and, in the mesh, only a call from its own namespace moved on."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest

from extproc.base.tokens import Signer
from extproc.core import fallback
from extproc.core.breaker import State
from extproc.core.decision import Decider
from extproc.server import relay as relay_module
from extproc.telemetry.record import Hop
from tests.unit.resilience_support import (
    ANTHROPIC_BODY,
    CLAUDE_KEY,
    OPENAI_KEY,
    SIGNING_KEY,
    fallbacks_counted,
    fallbacks_total,
    hop_state,
    make_decider,
    relay,
    route_breaker,
)
from tests.unit.test_decision import decide


def fresh_token(decider: Decider) -> tuple[str, fallback.HopState]:
    forward = decide(decider, ANTHROPIC_BODY, path="/v1/messages")
    token = forward.metadata["fallback_state"]
    state = fallback.HopState.decode(token, decider.runtime.signer)
    assert state is not None and state.index == 0
    return token, state


def test_relay_answers_307_with_the_advanced_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decider = make_decider(tmp_path)
    token, state = fresh_token(decider)
    now = state.hop_started_at + 0.5  # well inside the 1500ms first-byte timeout: an upstream error
    monkeypatch.setattr(relay_module, "time", SimpleNamespace(time=lambda: now))
    answer = relay(decider, {"x-ai-fallback": token, "content-type": "application/json"}, "127.0.0.1:10000",
                   "/v1/messages?beta=true")
    assert answer.status == 307 and answer.body == b""
    assert set(answer.headers) == {"location", "x-ai-fallback", "content-length"}
    assert answer.headers["location"] == "http://127.0.0.1:10000/v1/messages?beta=true"
    assert answer.headers["content-length"] == "0"
    advanced = fallback.HopState.decode(answer.headers["x-ai-fallback"], decider.runtime.signer)
    left = Hop("claude", "claude-3", "upstream_error", state.hop_started_at)
    assert advanced is not None and advanced.nonce and advanced.nonce != state.nonce  # each hop's token: its own
    assert advanced == replace(state.at(1, (left,)), hop_started_at=now, nonce=advanced.nonce, relayed=True)
    # One failure recorded against claude for order-service: the breaker (2 in a row) is one failure from opening.
    assert decider.runtime.breakers.state(CLAUDE_KEY) == State.CLOSED
    decider.runtime.breakers.record(CLAUDE_KEY, route_breaker(decider), failed=True)
    assert decider.runtime.breakers.state(CLAUDE_KEY) == State.OPEN
    assert decider.runtime.breakers.state(OPENAI_KEY) == State.CLOSED
    assert fallbacks_counted(decider, "claude", "openai", "upstream_error") == 1.0
    assert fallbacks_total(decider) == 1.0


def test_relay_tells_a_first_byte_timeout_by_the_time_elapsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decider = make_decider(tmp_path)
    token, state = fresh_token(decider)
    now = state.hop_started_at + 1.4  # >= 90% of first_byte_timeout (1350ms)
    monkeypatch.setattr(relay_module, "time", SimpleNamespace(time=lambda: now))
    answer = relay(decider, {"x-ai-fallback": token}, "127.0.0.1:10000", "/v1/messages")
    assert answer.status == 307
    advanced = fallback.HopState.decode(answer.headers["x-ai-fallback"], decider.runtime.signer)
    assert advanced is not None and advanced.hops == (Hop("claude", "claude-3", "timeout", state.hop_started_at),)
    assert fallbacks_counted(decider, "claude", "openai", "timeout") == 1.0
    assert fallbacks_counted(decider, "claude", "openai", "upstream_error") is None


@pytest.mark.parametrize("token", [
    None, "", "garbage", "v1.e30.AAAA", hop_state(index=0).encode(Signer(b"x" * 32)),
    hop_state(route="gone").encode(Signer(SIGNING_KEY)),  # genuine, but the route is not in the policy
])
def test_relay_invalid_state_is_a_502_in_the_paths_format(tmp_path: Path, token: str | None) -> None:
    decider = make_decider(tmp_path)
    headers = {} if token is None else {"x-ai-fallback": token}
    anthropic = relay(decider, headers, "127.0.0.1:10000", "/v1/messages")
    assert anthropic.status == 502 and anthropic.headers == {"content-type": "application/json"}
    body = orjson.loads(anthropic.body)
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    assert "fallback state is missing, expired or no longer matches the policy" in body["error"]["message"]
    openai = relay(decider, headers, "127.0.0.1:10000", "/v1/chat/completions")
    assert openai.status == 502 and openai.headers == {"content-type": "application/json"}
    error = orjson.loads(openai.body)["error"]
    assert (error["code"], error["type"]) == ("fallback_state_invalid", "server_error")
    assert decider.runtime.breakers.snapshot() == {}  # nothing recorded against any provider
    assert fallbacks_total(decider) == 0


def test_relay_expired_state_is_a_502(tmp_path: Path) -> None:
    decider = make_decider(tmp_path)
    raw = orjson.loads(base64.urlsafe_b64decode(hop_state().encode(decider.runtime.signer).split(".")[1] + "=="))
    del raw["exp"]
    expired = decider.runtime.signer.sign(raw, ttl_s=900, now=1_000_000.0)  # expired long ago
    answer = relay(decider, {"x-ai-fallback": expired}, "h", "/v1/chat/completions")
    assert answer.status == 502
    assert orjson.loads(answer.body)["error"]["code"] == "fallback_state_invalid"
    assert decider.runtime.breakers.snapshot() == {}


def test_relay_exhausted_chain_is_a_502(tmp_path: Path) -> None:
    decider = make_decider(tmp_path)
    token, _ = fresh_token(decider)
    relayed = relay(decider, {"x-ai-fallback": token}, "h", "/v1/messages").headers["x-ai-fallback"]
    assert decider.runtime.breakers.snapshot() == {CLAUDE_KEY: State.CLOSED}
    # The relay's own token sent back to it is refused: only a decision's token moves a call on.
    assert relay(decider, {"x-ai-fallback": relayed}, "h", "/v1/messages").status == 502
    # What a decision at the last hop would carry, had the chain let it mint one.
    at_last = fallback.HopState.decode(relayed, decider.runtime.signer)
    assert at_last is not None
    last = replace(at_last, relayed=False, nonce="n-last").encode(decider.runtime.signer)
    answer = relay(decider, {"x-ai-fallback": last}, "h", "/v1/chat/completions")
    assert answer.status == 502 and answer.headers == {"content-type": "application/json"}
    error = orjson.loads(answer.body)["error"]
    assert (error["code"], error["type"]) == ("fallback_exhausted", "server_error")
    assert error["message"] == "the provider failed and no fallback is left"
    # The same token once more is a replay: refused as invalid state, in the path's format.
    anthropic = relay(decider, {"x-ai-fallback": last}, "h", "/v1/messages")
    assert anthropic.status == 502 and orjson.loads(anthropic.body)["type"] == "error"
    assert "fallback state is missing" in orjson.loads(anthropic.body)["error"]["message"]
    # Neither the last hop's breaker nor the fallback count moved.
    assert decider.runtime.breakers.snapshot() == {CLAUDE_KEY: State.CLOSED}
    assert fallbacks_total(decider) == 1.0


def test_relay_in_the_mesh_moves_a_call_on_only_for_its_own_namespace(tmp_path: Path) -> None:
    decider = make_decider(tmp_path)
    token, _ = fresh_token(decider)
    decider.runtime.peer_identity = True  # as with --peer-identity xfcc
    xfcc = "By=spiffe://cluster.local/ns/ai-system/sa/ai-extproc;URI=spiffe://cluster.local/ns/{}/sa/order-service"
    for headers in ({"x-ai-fallback": token},  # no verified peer
                    {"x-ai-fallback": token, "x-forwarded-client-cert": xfcc.format("elsewhere")}):
        assert relay(decider, headers, "h", "/v1/messages").status == 502
    answer = relay(decider, {"x-ai-fallback": token, "x-forwarded-client-cert": xfcc.format("shop")}, "h",
                   "/v1/messages")
    assert answer.status == 307
