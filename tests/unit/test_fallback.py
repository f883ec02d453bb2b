"""The fallback state and chain (extproc/core/fallback.py) without a decision: the signed HopState's
round trip, its advance past a failed hop, tokens of another key or the wrong shape refused, and a route's
chain of hops with the x-ai-fallback-hops header that names them."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import orjson

from extproc.base.tokens import Signer
from extproc.core import fallback
from extproc.core.routing import Target
from extproc.telemetry.record import Hop
from tests.unit.resilience_support import SIGNING_KEY, hop_state, load


def test_hop_state_round_trip() -> None:
    signer = Signer(SIGNING_KEY)
    state = hop_state()
    assert fallback.HopState.decode(state.encode(signer), signer) == state
    later = hop_state(index=2, variant="candidate", first=("openai", "gpt-4o-mini"),
                      hops=(Hop("openai", "gpt-4o-mini", "timeout", 1.5),
                            Hop("claude", "claude-3", "breaker_open", 2.0)))
    assert fallback.HopState.decode(later.encode(signer), signer) == later


def test_hop_state_failed_advances_and_records_the_hop(tmp_path: Path) -> None:
    policy = load(tmp_path)
    target = Target(policy.providers["claude"], "claude-3", None)
    state = hop_state()
    after = state.failed(target, "upstream_error", now=1_700_000_002.0)
    assert after.index == 1
    assert after.hops == (Hop("claude", "claude-3", "upstream_error", state.hop_started_at),)
    assert after.hop_started_at == 1_700_000_002.0
    assert after.nonce and after.nonce != state.nonce  # a new token, honoured once
    # Nothing else changed.
    assert after.relayed  # the relay's token: the only kind a decision honours
    assert replace(after.at(0, ()), hop_started_at=state.hop_started_at, nonce=state.nonce, relayed=False) == state
    second = after.failed(Target(policy.providers["openai"], "gpt-4o", None), "timeout", now=1_700_000_003.0)
    assert second.index == 2
    assert second.hops == (*after.hops, Hop("openai", "gpt-4o", "timeout", 1_700_000_002.0))


def test_hop_state_signed_by_another_key_is_refused() -> None:
    token = hop_state().encode(Signer(b"x" * 32))
    assert fallback.HopState.decode(token, Signer(SIGNING_KEY)) is None
    assert fallback.HopState.decode("garbage", Signer(SIGNING_KEY)) is None


def test_hop_state_genuine_token_with_wrong_shape_is_refused() -> None:
    signer = Signer(SIGNING_KEY)
    assert fallback.HopState.decode(signer.sign({"ns": "shop"}, 60), signer) is None
    raw = orjson.loads(base64.urlsafe_b64decode(hop_state().encode(signer).split(".")[1] + "=="))
    del raw["exp"]
    bad_hops = orjson.dumps({**orjson.loads(raw["st"]), "h": [["claude"]]}).decode()
    assert fallback.HopState.decode(signer.sign({**raw, "st": bad_hops}, 60), signer) is None
    assert fallback.HopState.decode(signer.sign({**raw, "st": "{}"}, 60), signer) is None
    assert fallback.HopState.decode(signer.sign({**raw, "i": "one"}, 60), signer) is None
    assert fallback.HopState.decode(signer.sign({**raw, "f": ["claude"]}, 60), signer) is None


def test_chain_and_hops_header(tmp_path: Path) -> None:
    policy = load(tmp_path)
    route = policy.for_caller("order-service", "shop").resolve("fraud_detector")  # type: ignore[union-attr]
    assert route is not None
    first = Target(policy.providers["claude"], "claude-3", None)
    hops = fallback.chain(route, first, policy.providers)
    assert [(t.provider.name, t.model) for t in hops] == [("claude", "claude-3"), ("openai", "gpt-4o")]
    assert hops[0] is first
    tried = (Hop("claude", "claude-3", "breaker_open"),)
    assert fallback.hops_header(tried, hops[1]) == "claude/claude-3=breaker_open, openai/gpt-4o"
    assert fallback.hops_header((*tried, Hop("openai", "gpt-4o", "timeout")), None) == (
        "claude/claude-3=breaker_open, openai/gpt-4o=timeout")
