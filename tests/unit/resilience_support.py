"""What the resilience tests share (test_breaker, test_bulkhead, test_tokens, test_fallback,
test_decision_fallback, test_relay, test_admission, test_forwarding, test_sessions): an injected clock, breaker
settings, the fallback policy and a :class:`Decider` built on it, the relay called synchronously, hand-made hop
states, and the metrics a fallback moves.

Every clock is injected (breakers, bulkhead, quota, token expiry, the relay's notion of now), so no
assertion depends on how fast the test runs.
"""

from __future__ import annotations

import asyncio
from dataclasses import fields, replace
from pathlib import Path

from extproc.base.tokens import Signer
from extproc.cache.store import ResponseCache
from extproc.core import fallback
from extproc.core.breaker import BreakerKey, Breakers, State
from extproc.core.credentials import CredentialStore
from extproc.core.decision import Decider
from extproc.core.runtime import Runtime
from extproc.core.settlement import SettleInfo
from extproc.policy.compiled import PolicySet
from extproc.policy.loader import load_policy
from extproc.policy.model import BreakerSettings, CacheSettings, QuotaSettings
from extproc.quota.engine import QuotaEngine
from extproc.server.relay import RelayAnswer
from extproc.server.relay import relay as relay_async
from tests.unit.test_decision import ENV


class Clock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def breaker_settings(**kwargs: object) -> BreakerSettings:
    """Only the trip being tested can fire: the other one is out of reach unless set."""
    return BreakerSettings(**{"consecutive_failures": 1000, "error_rate": 1.0, "min_calls": 1000,
                              "window": "10s", "open_for": "10s", **kwargs})


SCOPE = ("shop", "order-service")
OTHER_SCOPE = ("shop", "user-service")
SIGNING_KEY = b"k" * 32

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


ANTHROPIC_BODY = {"model": "fraud_detector", "max_tokens": 10, "system": "be brief",
                  "messages": [{"role": "user", "content": "hi"}]}
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
