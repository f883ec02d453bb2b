"""Fallback chains: which provider to try next, and the signed state an attempt carries.

The mechanism (docs/design/fallback.md): the decision forwards a call to the first live hop of its
chain with the state below in the ``x-ai-fallback`` header. Each provider route's cluster is an
aggregate of [provider, relay]; when the attempt fails (connect failure, reset, 5xx, 429, first-byte
timeout) Envoy's retry goes to the relay, which records the failure, advances the state and answers
307. Envoy follows it internally, re-sending the body, and the decision filter sees the call again
with the advanced state: it transforms the request for the next hop (translating between APIs when
needed) without charging quota twice. Envoy owns every retry; the processor keeps nothing in memory
between attempts, so each attempt may reach any replica.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from extproc.base.apis import ApiError, ErrorKind
from extproc.base.tokens import Signer
from extproc.core.routing import Target
from extproc.core.settlement import SettleInfo
from extproc.policy.model import ModelRoute, Provider
from extproc.telemetry.metrics import CallLabels, bounded
from extproc.telemetry.record import Hop

if TYPE_CHECKING:
    from extproc.core.runtime import Runtime
    from extproc.policy.compiled import PolicySet

# A token lives as long as its call may: the call's whole timeout, plus the time Envoy takes to retry.
_TOKEN_GRACE_S = 5.0


def new_nonce() -> str:
    return secrets.token_urlsafe(12)


def nonce_ttl(state: HopState) -> float:
    """How long a used nonce must be remembered: until its token would have expired anyway."""
    return max(1.0, state.started_at + state.timeout_ms / 1000 + _TOKEN_GRACE_S - time.time())


@dataclass(frozen=True, slots=True)
class HopState:
    """What every attempt of one call needs to know, beyond its request.

    The call itself (caller, route, the model asked for, the hops so far, its id) is its
    :class:`SettleInfo`, which the response side reads too: kept once, not copied field by field.
    """

    settle: SettleInfo  # the call as the response side sees it: quota reservation, cache key, estimates
    first: tuple[str, str]  # provider and model of hop 0 (the A/B variant, when split)
    index: int  # the hop this attempt is for
    hop_started_at: float  # epoch seconds this hop was sent
    timeout_ms: int  # the whole call's budget, every hop included
    limit: int = 1_000  # how many hops of the chain this call may use (what its request can be sent to)
    nonce: str = ""
    # Made by the relay (the attempt before failed): the only kind the decision honours. One the decision
    # made is only good at the relay. So a token cannot be cycled through the decision alone: each
    # extra hop costs a relay round trip, and the chain's length bounds them.
    relayed: bool = False  # single use: each hop's token is honoured once (the in-flight store remembers it)

    @property
    def namespace(self) -> str:
        return self.settle.namespace

    @property
    def service(self) -> str:
        return self.settle.service

    @property
    def route(self) -> str:
        return self.settle.route  # the policy model entry's name

    @property
    def requested(self) -> str:
        return self.settle.requested  # the model name the caller sent

    @property
    def caller_api(self) -> str:
        return self.settle.caller_api

    @property
    def variant(self) -> str:
        return self.settle.variant

    @property
    def hops(self) -> tuple[Hop, ...]:
        return self.settle.hops  # earlier hops and why each was left

    @property
    def started_at(self) -> float:
        return self.settle.decided_at  # epoch seconds of the first decision

    @property
    def call_id(self) -> str:
        return self.settle.call_id

    def at(self, index: int, hops: tuple[Hop, ...]) -> HopState:
        """This state moved on to hop ``index``, with ``hops`` tried or skipped before it."""
        return replace(self, index=index, settle=replace(self.settle, hops=hops))

    def encode(self, signer: Signer) -> str:
        return signer.sign({
            "st": self.settle.encode(), "f": list(self.first), "i": self.index, "th": self.hop_started_at,
            "to": self.timeout_ms, "lm": self.limit, "n": self.nonce, "rl": self.relayed,
        }, max(1.0, self.started_at + self.timeout_ms / 1000 + _TOKEN_GRACE_S - time.time()))

    @classmethod
    def decode(cls, token: str, signer: Signer) -> HopState | None:
        verified = signer.verify(token)
        if verified is None:
            return None
        raw: dict[str, Any] = dict(verified)  # signed by us, shape checked by the conversions below
        try:
            first = raw["f"]
            return cls(SettleInfo.decode(str(raw["st"])), (str(first[0]), str(first[1])), int(raw["i"]),
                       float(raw["th"]), int(raw["to"]), int(raw["lm"]), str(raw["n"]), bool(raw["rl"]))
        except (KeyError, TypeError, ValueError, IndexError):
            return None

    def failed(self, target: Target, reason: str, now: float | None = None) -> HopState:
        """The state for the next hop, after ``target`` (this hop) failed for ``reason``."""
        hop = Hop(target.provider.name, target.model, reason, self.hop_started_at)
        return replace(self.at(self.index + 1, (*self.hops, hop)), hop_started_at=now or time.time(),
                       nonce=new_nonce(), relayed=True)


def chain(route: ModelRoute, first: Target, providers: Mapping[str, Provider]) -> list[Target]:
    """Hop 0 (the chosen target or variant), then the route's fallbacks in order."""
    return [first, *(Target(providers[f.provider], f.model, None) for f in route.fallback
                     if f.provider in providers)]


def hops_header(hops: tuple[Hop, ...], final: Target | None) -> str:
    """``claude/claude-3=upstream_error, openai/gpt-4o``: every provider tried, in order, and why each was left."""
    tried = [f"{h.provider}/{h.model}={h.outcome}" for h in hops]
    return ", ".join([*tried, f"{final.provider.name}/{final.model}"] if final is not None else tried)


def resume(policy: PolicySet, state: HopState) -> tuple[ModelRoute, list[Target]] | None:
    """The route and chain a call's state goes on with, as the current policy has them (cut to what the
    call's request can be sent to); None when the policy no longer has its model or first provider."""
    models = policy.for_caller(state.service, state.namespace or None)
    route = models.resolve(state.route) if models is not None else None
    first = policy.providers.get(state.first[0])
    if route is None or first is None:
        return None
    return route, chain(route, Target(first, state.first[1], state.variant or None), policy.providers)[:state.limit]


def count(runtime: Runtime, policy: PolicySet, caller: tuple[str, str], left: str, to: str, reason: str) -> None:
    """One provider left for the next: the only place a fallback is counted (relay and decision alike)."""
    runtime.metrics.fallbacks.labels(*caller, bounded(policy, left), bounded(policy, to), reason).inc()


def first_live(runtime: Runtime, policy: PolicySet, scope: tuple[str, str], route: ModelRoute,
               hops: list[Target], index: int = 0, before: tuple[Hop, ...] = ()) -> tuple[int | None, tuple[Hop, ...]]:
    """The first hop from ``index`` whose breaker lets a call of ``scope`` (namespace, service) through,
    and every hop tried or skipped before it (``before``: those of earlier attempts). Each skip is
    counted once, here."""
    settings = route.breaker(policy.mesh.resilience.circuit_breaker)
    skipped = list(before)
    for i in range(index, len(hops)):
        target = hops[i]
        if settings is None or runtime.breakers.allow((*scope, target.provider.name, target.model), settings):
            if len(skipped) > len(before):  # labels only when there is something to count: this is every call's path
                caller = _caller_labels(policy, *scope)
                for hop in skipped[len(before):]:
                    count(runtime, policy, caller, hop.provider, target.provider.name, hop.outcome)
            return i, tuple(skipped)
        skipped.append(Hop(target.provider.name, target.model, "breaker_open", time.time()))
    return None, tuple(skipped)


def after_failure(runtime: Runtime, state: HopState, now: float) -> HopState | ApiError:
    """The relay's step: the attempt at ``state.index`` failed. Its breaker learns it, the fallback is
    counted, and the state moves on to the next hop; or the error when no hop is left."""
    policy = runtime.policy()
    resumed = resume(policy, state)
    if resumed is None:
        return ApiError(ErrorKind.UNAVAILABLE, "the provider failed and the call's fallback state is missing, "
                        "expired or no longer matches the policy", "fallback_state_invalid")
    route, hops = resumed
    if state.index + 1 >= len(hops):
        return ApiError(ErrorKind.UNAVAILABLE, "the provider failed and no fallback is left", "fallback_exhausted")
    failed, following = hops[state.index], hops[state.index + 1]
    reason = "upstream_error"
    if route.first_byte_timeout is not None and (now - state.hop_started_at) * 1000 >= route.first_byte_timeout * 0.9:
        reason = "timeout"  # Envoy does not say why it retried; time tells a first-byte timeout apart
    settings = route.breaker(policy.mesh.resilience.circuit_breaker)
    if settings is not None:
        runtime.breakers.record((state.namespace, state.service, failed.provider.name, failed.model), settings,
                                failed=True)
    count(runtime, policy, _caller_labels(policy, state.namespace, state.service), failed.provider.name,
          following.provider.name, reason)
    return state.failed(failed, reason, now)


def _caller_labels(policy: PolicySet, namespace: str, service: str) -> tuple[str, str]:
    return CallLabels.of(policy, service=service, namespace=namespace).caller
