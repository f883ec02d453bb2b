"""The resilience core without gRPC or Envoy: circuit breakers, bulkheads, signed fallback state, the
fallback chain through the decision, and the relay that moves a failed call on to its next hop.

Every clock is injected (breakers, bulkhead, quota, token expiry, the relay's notion of now), so no
assertion depends on how fast the test runs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest

from extproc.base.tokens import Signer
from extproc.base.wire import FALLBACK_MARKER
from extproc.cache.store import ResponseCache
from extproc.core import fallback
from extproc.core.breaker import BreakerKey, Breakers, State
from extproc.core.bulkhead import Bulkhead
from extproc.core.credentials import CredentialStore
from extproc.core.decision import Decider, Forward, LocalReply
from extproc.core.routing import Target
from extproc.core.runtime import Runtime
from extproc.core.settlement import SettleInfo
from extproc.policy.compiled import PolicySet
from extproc.policy.loader import load_policy
from extproc.policy.model import BreakerSettings, CacheSettings, QuotaSettings
from extproc.quota.engine import QuotaEngine
from extproc.server import relay as relay_module
from extproc.server.relay import RelayAnswer
from extproc.server.relay import relay as relay_async
from extproc.telemetry.record import Hop
from tests.unit.test_decision import ENV, decide, error_of, headers_of, settle_json


class Clock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


KEY: BreakerKey = ("shop", "order-service", "claude", "claude-3")
OTHER_KEY: BreakerKey = ("shop", "user-service", "claude", "claude-3")


def breaker_settings(**kwargs: object) -> BreakerSettings:
    """Only the trip being tested can fire: the other one is out of reach unless set."""
    return BreakerSettings(**{"consecutive_failures": 1000, "error_rate": 1.0, "min_calls": 1000,
                              "window": "10s", "open_for": "10s", **kwargs})


# --- 1. Breaker --------------------------------------------------------------------------------------------


def test_breaker_opens_after_exactly_n_consecutive_failures() -> None:
    breakers, settings = Breakers(clock=Clock()), breaker_settings(consecutive_failures=3)
    for _ in range(2):
        breakers.record(KEY, settings, failed=True)
        assert breakers.state(KEY) == State.CLOSED and breakers.allow(KEY, settings)
    breakers.record(KEY, settings, failed=True)
    assert breakers.state(KEY) == State.OPEN
    assert not breakers.allow(KEY, settings)


def test_breaker_success_resets_the_consecutive_count() -> None:
    breakers, settings = Breakers(clock=Clock()), breaker_settings(consecutive_failures=3)
    for failed in (True, True, False, True, True):
        breakers.record(KEY, settings, failed=failed)
    assert breakers.state(KEY) == State.CLOSED  # never three in a row
    breakers.record(KEY, settings, failed=True)
    assert breakers.state(KEY) == State.OPEN


def test_breaker_error_rate_trips_only_once_min_calls_reached() -> None:
    breakers, settings = Breakers(clock=Clock()), breaker_settings(error_rate=0.5, min_calls=4)
    for _ in range(3):
        breakers.record(KEY, settings, failed=True)  # 100% failures, but only 3 calls in the window
    assert breakers.state(KEY) == State.CLOSED
    breakers.record(KEY, settings, failed=False)  # 4 calls, 3 failed: 75% >= 50%
    assert breakers.state(KEY) == State.OPEN


def test_breaker_error_rate_below_threshold_stays_closed() -> None:
    breakers, settings = Breakers(clock=Clock()), breaker_settings(error_rate=0.5, min_calls=4)
    for failed in (True, False, False, False, True, False):  # 2 of 6 failed: 33%
        breakers.record(KEY, settings, failed=failed)
    assert breakers.state(KEY) == State.CLOSED


def test_breaker_window_expiry_drops_old_outcomes() -> None:
    clock = Clock(1000.0)
    breakers, settings = Breakers(clock=clock), breaker_settings(error_rate=0.5, min_calls=4, window="10s")
    for _ in range(3):
        breakers.record(KEY, settings, failed=True)
    clock.now = 1011.0  # the three failures are now 11s old, outside the 10s window
    breakers.record(KEY, settings, failed=False)  # had they been kept: 4 calls, 75% failed → open
    assert breakers.state(KEY) == State.CLOSED
    breakers.record(KEY, settings, failed=False)
    breakers.record(KEY, settings, failed=False)
    breakers.record(KEY, settings, failed=True)  # window: S S S F = 25%
    assert breakers.state(KEY) == State.CLOSED
    breakers.record(KEY, settings, failed=True)  # S S S F F = 40%
    assert breakers.state(KEY) == State.CLOSED
    breakers.record(KEY, settings, failed=True)  # S S S F F F = 50%
    assert breakers.state(KEY) == State.OPEN


def test_open_breaker_refuses_until_open_for_elapses() -> None:
    clock = Clock(1000.0)
    breakers, settings = Breakers(clock=clock), breaker_settings(consecutive_failures=1, open_for="10s")
    breakers.record(KEY, settings, failed=True)
    for now in (1000.0, 1005.0, 1009.5):
        clock.now = now
        assert not breakers.allow(KEY, settings)
        assert breakers.state(KEY) == State.OPEN
    clock.now = 1010.0
    assert breakers.allow(KEY, settings)
    assert breakers.state(KEY) == State.HALF_OPEN


def _half_open(clock: Clock, breakers: Breakers, settings: BreakerSettings) -> None:
    """Open the breaker at 1000 and let its first probe through at 1010."""
    clock.now = 1000.0
    breakers.record(KEY, settings, failed=True)
    assert breakers.state(KEY) == State.OPEN
    clock.now = 1010.0
    assert breakers.allow(KEY, settings)
    assert breakers.state(KEY) == State.HALF_OPEN


def test_half_open_lets_exactly_one_probe_through() -> None:
    clock = Clock()
    breakers, settings = Breakers(clock=clock), breaker_settings(consecutive_failures=1, open_for="10s")
    _half_open(clock, breakers, settings)
    assert not breakers.allow(KEY, settings)  # a second, concurrent call
    clock.now = 1015.0
    assert not breakers.allow(KEY, settings)
    assert breakers.state(KEY) == State.HALF_OPEN


def test_probe_success_closes() -> None:
    clock = Clock()
    breakers, settings = Breakers(clock=clock), breaker_settings(consecutive_failures=2, open_for="10s")
    clock.now = 1000.0
    breakers.record(KEY, settings, failed=True)
    breakers.record(KEY, settings, failed=True)
    clock.now = 1010.0
    assert breakers.allow(KEY, settings)
    breakers.record(KEY, settings, failed=False)
    assert breakers.state(KEY) == State.CLOSED
    assert breakers.allow(KEY, settings) and breakers.allow(KEY, settings)
    # Closed afresh: the failures from before the trip no longer count.
    breakers.record(KEY, settings, failed=True)
    assert breakers.state(KEY) == State.CLOSED
    breakers.record(KEY, settings, failed=True)
    assert breakers.state(KEY) == State.OPEN


def test_probe_failure_reopens_for_a_full_open_for() -> None:
    clock = Clock()
    breakers, settings = Breakers(clock=clock), breaker_settings(consecutive_failures=1, open_for="10s")
    _half_open(clock, breakers, settings)
    clock.now = 1012.0
    breakers.record(KEY, settings, failed=True)
    assert breakers.state(KEY) == State.OPEN
    clock.now = 1021.0
    assert not breakers.allow(KEY, settings)  # reopened at 1012: refuses until 1022
    clock.now = 1022.0
    assert breakers.allow(KEY, settings)
    assert breakers.state(KEY) == State.HALF_OPEN


def test_lost_probe_does_not_block_forever() -> None:
    clock = Clock()
    breakers, settings = Breakers(clock=clock), breaker_settings(consecutive_failures=1, open_for="10s")
    _half_open(clock, breakers, settings)  # the probe leaves at 1010 and is never heard of again
    clock.now = 1019.5
    assert not breakers.allow(KEY, settings)
    clock.now = 1020.0
    assert breakers.allow(KEY, settings)  # another probe
    assert not breakers.allow(KEY, settings)  # and still only one at a time
    assert breakers.state(KEY) == State.HALF_OPEN
    breakers.record(KEY, settings, failed=False)
    assert breakers.state(KEY) == State.CLOSED


def test_disabled_breaker_always_allows() -> None:
    changes: list[tuple[BreakerKey, State]] = []
    breakers = Breakers(clock=Clock(), on_change=lambda key, state: changes.append((key, state)))
    settings = breaker_settings(enabled=False, consecutive_failures=1)
    for _ in range(50):
        breakers.record(KEY, settings, failed=True)
        assert breakers.allow(KEY, settings)
    assert breakers.state(KEY) == State.CLOSED
    assert breakers.snapshot() == {}
    assert changes == []


def test_breaker_state_is_per_key() -> None:
    clock = Clock()
    breakers, settings = Breakers(clock=clock), breaker_settings(consecutive_failures=2)
    breakers.record(KEY, settings, failed=True)
    breakers.record(OTHER_KEY, settings, failed=True)  # not a second failure in a row for KEY
    assert breakers.state(KEY) == State.CLOSED and breakers.state(OTHER_KEY) == State.CLOSED
    breakers.record(KEY, settings, failed=True)
    assert breakers.state(KEY) == State.OPEN
    assert breakers.state(OTHER_KEY) == State.CLOSED
    assert breakers.allow(OTHER_KEY, settings)
    other_model: BreakerKey = ("shop", "order-service", "claude", "claude-3-haiku")
    assert breakers.allow(other_model, settings) and breakers.state(other_model) == State.CLOSED
    assert breakers.snapshot() == {KEY: State.OPEN, OTHER_KEY: State.CLOSED, other_model: State.CLOSED}


def test_on_change_reports_every_transition_exactly() -> None:
    clock = Clock()
    changes: list[tuple[BreakerKey, State]] = []
    breakers = Breakers(clock=clock, on_change=lambda key, state: changes.append((key, state)))
    settings = breaker_settings(consecutive_failures=2, open_for="10s")
    clock.now = 1000.0
    breakers.record(KEY, settings, failed=True)
    assert breakers.allow(KEY, settings)
    assert changes == []
    breakers.record(KEY, settings, failed=True)
    assert changes == [(KEY, State.OPEN)]
    assert not breakers.allow(KEY, settings)
    breakers.record(KEY, settings, failed=True)  # a late answer while open: ignored
    assert changes == [(KEY, State.OPEN)]
    clock.now = 1010.0
    assert breakers.allow(KEY, settings)
    assert not breakers.allow(KEY, settings)
    assert changes == [(KEY, State.OPEN), (KEY, State.HALF_OPEN)]
    breakers.record(KEY, settings, failed=False)
    assert changes == [(KEY, State.OPEN), (KEY, State.HALF_OPEN), (KEY, State.CLOSED)]
    breakers.record(KEY, settings, failed=False)
    assert breakers.allow(KEY, settings)
    assert len(changes) == 3


def test_on_change_reports_a_failed_probe_reopening() -> None:
    clock = Clock()
    changes: list[State] = []
    breakers = Breakers(clock=clock, on_change=lambda _key, state: changes.append(state))
    settings = breaker_settings(consecutive_failures=1, open_for="10s")
    _half_open(clock, breakers, settings)
    breakers.record(KEY, settings, failed=True)
    assert changes == [State.OPEN, State.HALF_OPEN, State.OPEN]


def test_new_settings_for_a_key_reset_it() -> None:
    clock = Clock()
    breakers = Breakers(clock=clock)
    old, new = breaker_settings(consecutive_failures=1), breaker_settings(consecutive_failures=2)
    breakers.record(KEY, old, failed=True)
    assert breakers.state(KEY) == State.OPEN and not breakers.allow(KEY, old)
    assert breakers.allow(KEY, new)  # a policy change: a fresh, closed breaker
    assert breakers.state(KEY) == State.CLOSED
    breakers.record(KEY, new, failed=True)
    assert breakers.state(KEY) == State.CLOSED  # the new threshold (2) applies, and the count restarted
    breakers.record(KEY, new, failed=True)
    assert breakers.state(KEY) == State.OPEN


def test_settings_reset_of_an_open_breaker_is_reported() -> None:
    changes: list[State] = []
    breakers = Breakers(clock=Clock(), on_change=lambda _key, state: changes.append(state))
    old, new = breaker_settings(consecutive_failures=1), breaker_settings(consecutive_failures=2)
    breakers.record(KEY, old, failed=True)
    assert changes == [State.OPEN]
    assert breakers.allow(KEY, new)
    assert changes == [State.OPEN, State.CLOSED]


# --- 2. Bulkhead -------------------------------------------------------------------------------------------

SCOPE = ("shop", "order-service")
OTHER_SCOPE = ("shop", "user-service")


def test_bulkhead_cap_is_enforced_per_scope() -> None:
    bulkhead = Bulkhead(clock=Clock())
    assert bulkhead.enter(SCOPE, "a", 2)
    assert bulkhead.enter(SCOPE, "b", 2)
    assert not bulkhead.enter(SCOPE, "c", 2)
    assert bulkhead.in_flight(SCOPE) == 2
    # Another scope has its own slots.
    assert bulkhead.enter(OTHER_SCOPE, "c", 2)
    assert bulkhead.enter(OTHER_SCOPE, "d", 2)
    assert not bulkhead.enter(OTHER_SCOPE, "e", 2)
    assert bulkhead.in_flight(SCOPE) == 2 and bulkhead.in_flight(OTHER_SCOPE) == 2


def test_bulkhead_leave_frees_a_slot() -> None:
    bulkhead = Bulkhead(clock=Clock())
    assert bulkhead.enter(SCOPE, "a", 1)
    assert not bulkhead.enter(SCOPE, "b", 1)
    bulkhead.leave(OTHER_SCOPE, "a")  # another scope's leave frees nothing here
    bulkhead.leave(SCOPE, "unknown")
    assert not bulkhead.enter(SCOPE, "b", 1)
    bulkhead.leave(SCOPE, "a")
    assert bulkhead.in_flight(SCOPE) == 0
    assert bulkhead.enter(SCOPE, "b", 1)
    assert bulkhead.in_flight(SCOPE) == 1


def test_bulkhead_entries_expire_after_ttl() -> None:
    clock = Clock(1000.0)
    bulkhead = Bulkhead(ttl_s=60.0, clock=clock)
    assert bulkhead.enter(SCOPE, "lost", 1)  # its end is never seen
    clock.now = 1059.0
    assert not bulkhead.enter(SCOPE, "b", 1)
    clock.now = 1060.0
    assert bulkhead.enter(SCOPE, "b", 1)
    assert bulkhead.in_flight(SCOPE) == 1  # "lost" is gone, "b" holds the slot
    clock.now = 1100.0
    assert not bulkhead.enter(SCOPE, "c", 1)  # "b" entered at 1060: counts until 1120


# --- 3. Signer ---------------------------------------------------------------------------------------------

SIGNING_KEY = b"k" * 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign_raw(body: bytes, key: bytes = SIGNING_KEY) -> str:
    """A token with a genuine signature over an arbitrary body."""
    return f"v1.{_b64(body)}.{_b64(hmac.new(key, b'v1' + body, hashlib.sha256).digest()[:20])}"


def test_signer_round_trip() -> None:
    signer = Signer(SIGNING_KEY)
    payload = {"a": 1, "b": "two", "c": [1.5, None], "d": {"e": True}}
    token = signer.sign(payload, ttl_s=60, now=1000.0)
    assert token.startswith("v1.") and token.count(".") == 2
    assert signer.verify(token, now=1000.0) == payload
    assert signer.verify(token, now=1060.0) == payload  # valid up to and including its expiry
    assert Signer(SIGNING_KEY).verify(token, now=1030.0) == payload  # any replica with the key


def test_signer_expired_token_is_refused() -> None:
    signer = Signer(SIGNING_KEY)
    token = signer.sign({"a": 1}, ttl_s=60, now=1000.0)
    assert signer.verify(token, now=1060.5) is None
    assert signer.verify(token, now=5000.0) is None


def test_signer_tampered_body_or_mac_is_refused() -> None:
    signer = Signer(SIGNING_KEY)
    version, body, mac = signer.sign({"service": "a"}, ttl_s=60, now=1000.0).split(".")
    _, other_body, other_mac = signer.sign({"service": "b"}, ttl_s=60, now=1000.0).split(".")
    assert signer.verify(f"{version}.{body}.{mac}", now=1000.0) == {"service": "a"}
    assert signer.verify(f"{version}.{other_body}.{mac}", now=1000.0) is None
    assert signer.verify(f"{version}.{body}.{other_mac}", now=1000.0) is None
    assert signer.verify(f"{version}.{body}.{'A' if mac[0] != 'A' else 'B'}{mac[1:]}", now=1000.0) is None
    assert signer.verify(f"{version}.{body}.{mac[:-4]}", now=1000.0) is None  # a truncated mac
    assert signer.verify(f"v2.{body}.{mac}", now=1000.0) is None


def test_signer_wrong_key_is_refused() -> None:
    token = Signer(SIGNING_KEY).sign({"a": 1}, ttl_s=60, now=1000.0)
    assert Signer(b"x" * 32).verify(token, now=1000.0) is None


@pytest.mark.parametrize("token", [
    "", ".", "..", "v1", "v1.", "v1..", "v1.a.b", "v1.a.b.c", "a.b.c", "v1.!!!.???", "v1.é.é", "v1.a",
    "not a token at all", "v1.eyJhIjoxfQ", "v1.eyJhIjoxfQ.",
])
def test_signer_garbage_is_refused(token: str) -> None:
    assert Signer(SIGNING_KEY).verify(token, now=1000.0) is None


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"7", b'{"a": 1}', b'{"a": 1, "exp": "soon"}', b"{not json"])
def test_signer_genuine_mac_over_a_bad_payload_is_refused(body: bytes) -> None:
    """Not a JSON object, no expiry, or an expiry that is not a number: refused even with a valid mac."""
    assert Signer(SIGNING_KEY).verify(_sign_raw(body), now=1000.0) is None


def test_signer_key_shorter_than_16_bytes_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Signer(b"x" * 15)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Signer(b"")
    Signer(b"x" * 16)  # the minimum is accepted


# --- 4. HopState -------------------------------------------------------------------------------------------

FALLBACK_POLICY = """\
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_KEY}}
---
service: order-service
ai_proxy:
  models:
  - name: fraud_detector
    provider: claude
    model: claude-3
    first_byte_timeout: 1500ms
    rate_limit: 1/min
    fallback: [openai/gpt-4o]
    circuit_breaker: {consecutive_failures: 2, open_for: 10s}
  - {name: chat, provider: openai, model: gpt-4, rate_limit: 1/min}
---
service: user-service
ai_proxy:
  models:
  - name: fraud_detector
    provider: claude
    model: claude-3
    fallback: [openai/gpt-4o]
    circuit_breaker: {consecutive_failures: 2, open_for: 10s}
"""
QUOTA_NOW = 1_800_000_030.0  # the quota engine's fixed clock: every call falls in one minute window


def load(tmp_path: Path, text: str = FALLBACK_POLICY) -> PolicySet:
    (tmp_path / "policy.yaml").write_text(text)
    return load_policy([tmp_path])


def make_decider(tmp_path: Path, text: str = FALLBACK_POLICY, clock: Clock | None = None) -> Decider:
    policy = load(tmp_path, text)
    return Decider(Runtime(lambda: policy, CredentialStore(environ=ENV),
                           QuotaEngine(QuotaSettings(), clock=lambda: QUOTA_NOW), ResponseCache(CacheSettings()),
                           signer=Signer(SIGNING_KEY), breakers=Breakers(clock=clock or Clock())))


def relay(decider: Decider, headers: dict[str, str], authority: str, path: str) -> RelayAnswer:
    return asyncio.run(relay_async(decider.runtime, headers, authority, path))


_SETTLE_FIELDS = frozenset(f.name for f in fields(SettleInfo))


def hop_state(**changes: object) -> fallback.HopState:
    """A call's hop state; the call's own facts (caller, route, hops so far, ...) live in its SettleInfo."""
    settle = SettleInfo(None, "anthropic", 0, "claude", "claude-3", namespace="shop", service="order-service",
                        route="fraud_detector", requested="fraud_detector", caller_api="anthropic",
                        decided_at=1_700_000_000.25, call_id="call-1", policy_version="v1")
    settle = replace(settle, **{k: v for k, v in changes.items() if k in _SETTLE_FIELDS})  # type: ignore[arg-type]
    state = fallback.HopState(settle, first=("claude", "claude-3"), index=0, hop_started_at=1_700_000_000.5,
                              timeout_ms=8000, nonce="n-1")
    return replace(state, **{k: v for k, v in changes.items() if k not in _SETTLE_FIELDS})  # type: ignore[arg-type]


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


# --- 5. Decision with fallback -----------------------------------------------------------------------------

ANTHROPIC_BODY = {"model": "fraud_detector", "max_tokens": 10, "system": "be brief",
                  "messages": [{"role": "user", "content": "hi"}]}
OPENAI_TRANSLATED = {"model": "gpt-4o", "max_completion_tokens": 10,
                     "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
ROUTE_BREAKER = breaker_settings(consecutive_failures=2, open_for="10s", error_rate=0.5, min_calls=20,
                                 window="30s")
CLAUDE_KEY: BreakerKey = ("shop", "order-service", "claude", "claude-3")
OPENAI_KEY: BreakerKey = ("shop", "order-service", "openai", "gpt-4o")


def route_breaker(decider: Decider) -> BreakerSettings:
    route = decider.runtime.policy().for_caller("order-service", "shop").resolve("fraud_detector")  # type: ignore[union-attr]
    assert route is not None and route.circuit_breaker == ROUTE_BREAKER
    return route.circuit_breaker


def open_breaker(decider: Decider, key: BreakerKey) -> None:
    settings = route_breaker(decider)
    for _ in range(settings.consecutive_failures):
        decider.runtime.breakers.record(key, settings, failed=True)
    assert decider.runtime.breakers.state(key) == State.OPEN


def fallbacks_counted(decider: Decider, source: str, to: str, reason: str, service: str = "order-service"
                      ) -> float | None:
    return decider.runtime.metrics.registry.get_sample_value("ai_extproc_fallbacks_total", {
        "service": service, "namespace": "shop", "from_provider": source, "to_provider": to, "reason": reason})


def fallbacks_total(decider: Decider) -> float:
    return sum(s.value for metric in decider.runtime.metrics.registry.collect() if metric.name == "ai_extproc_fallbacks"
               for s in metric.samples if s.name == "ai_extproc_fallbacks_total")


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


# --- 6. relay() --------------------------------------------------------------------------------------------


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


# --- 7. Bulkhead through the decision ----------------------------------------------------------------------

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


RESPONSES_POLICY = """\
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_KEY}}
---
service: order-service
ai_proxy:
  models:
  - {name: assistant, provider: openai, model: gpt-4o, fallback: [claude/claude-3, openai/gpt-4o-mini]}
  - {name: claude_first, provider: claude, model: claude-3, fallback: [openai/gpt-4o]}
"""


@pytest.mark.parametrize(("extra", "hops"), [
    ({}, 2),  # openai, then claude (translated); not back to openai: the body is Anthropic's by then
    ({"previous_response_id": "resp_1"}, 1),  # state only its provider keeps: no fallback at all
    ({"tools": [{"type": "web_search"}]}, 1),  # a built-in tool: OpenAI providers only (the next is claude)
])
def test_a_responses_call_falls_back_only_where_it_can_be_served(tmp_path: Path, extra: dict[str, object],
                                                                 hops: int) -> None:
    decider = make_decider(tmp_path, RESPONSES_POLICY)
    forward = decide(decider, {"model": "assistant", "input": "hi", **extra}, path="/v1/responses")
    assert isinstance(forward, Forward), forward
    headers = headers_of(forward)
    assert headers[":path"] == "/v1/responses" and headers[":authority"] == "api.openai.com"
    if hops == 1:
        assert "x-ai-fallback" not in headers and "fallback_state" not in forward.metadata
    else:
        state = fallback.HopState.decode(forward.metadata["fallback_state"], decider.runtime.signer)
        assert state is not None and state.limit == hops and state.caller_api == "openai_responses"


def test_a_responses_call_to_an_anthropic_model_is_translated(tmp_path: Path) -> None:
    decider = make_decider(tmp_path, RESPONSES_POLICY)
    forward = decide(decider, {"model": "claude_first", "input": "hi", "instructions": "be brief",
                               "max_output_tokens": 20}, path="/v1/responses")
    assert isinstance(forward, Forward) and forward.body is not None
    headers = headers_of(forward)
    assert headers[":path"] == "/v1/messages" and headers["x-ai-usage"] == "translate"
    sent = orjson.loads(forward.body)
    assert sent["model"] == "claude-3" and sent["system"] == "be brief" and sent["max_tokens"] == 20
    settle = settle_json(decider, forward)
    assert (settle["api"], settle["ca"]) == ("anthropic", "openai_responses")
    refused = decide(decider, {"model": "claude_first", "input": "hi", "previous_response_id": "resp_1"},
                     path="/v1/responses")
    status, body = error_of(refused)
    assert status == 400 and body["error"]["code"] == "untranslatable_request"  # type: ignore[index]
    assert "previous_response_id" in body["error"]["message"]  # type: ignore[index]


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
