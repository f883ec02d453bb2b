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

from extproc.core.routing import Target
from extproc.core.settlement import SettleInfo
from extproc.core.tokens import Signer
from extproc.policy.model import ModelRoute, Provider
from extproc.telemetry.record import Hop

HEADER = "x-ai-fallback"
# What a provider's attempt carries in HEADER: only that the call may fall back. The signed state
# goes in the call's metadata under STATE_KEY, copied into HEADER only on the relay's attempt.
MARKER = "1"
STATE_KEY = "fallback_state"
# A token lives as long as its call may: the call's whole timeout, plus the time Envoy takes to retry.
_TOKEN_GRACE_S = 5.0


def new_nonce() -> str:
    return secrets.token_urlsafe(12)


def nonce_ttl(state: HopState) -> float:
    """How long a used nonce must be remembered: until its token would have expired anyway."""
    return max(1.0, state.started_at + state.timeout_ms / 1000 + _TOKEN_GRACE_S - time.time())


@dataclass(frozen=True, slots=True)
class HopState:
    """What every attempt of one call needs to know, beyond its request."""

    namespace: str
    service: str
    route: str  # the policy model entry's name
    requested: str  # the model name the caller sent
    caller_api: str
    first: tuple[str, str]  # provider and model of hop 0 (the A/B variant, when split)
    variant: str
    index: int  # the hop this attempt is for
    hops: tuple[Hop, ...]  # earlier hops and why each was left
    started_at: float  # epoch seconds of the first decision
    hop_started_at: float  # epoch seconds this hop was sent
    call_id: str
    settle: SettleInfo  # what the response side needs: quota reservation, cache key, estimates
    policy_version: str
    timeout_ms: int  # the whole call's budget, every hop included
    limit: int = 1_000  # how many hops of the chain this call may use (what its request can be sent to)
    nonce: str = ""
    # Made by the relay (the attempt before failed): the only kind the decision honours. One the decision
    # made is only good at the relay. So a token cannot be cycled through the decision alone: each
    # extra hop costs a relay round trip, and the chain's length bounds them.
    relayed: bool = False  # single use: each hop's token is honoured once (the in-flight store remembers it)

    def encode(self, signer: Signer) -> str:
        return signer.sign({
            "ns": self.namespace, "sv": self.service, "rt": self.route, "rq": self.requested, "ca": self.caller_api,
            "f": list(self.first), "va": self.variant, "i": self.index,
            "h": [[h.provider, h.model, h.outcome, h.started_at] for h in self.hops],
            "t0": self.started_at, "th": self.hop_started_at, "id": self.call_id, "st": self.settle.encode(),
            "pv": self.policy_version, "to": self.timeout_ms, "lm": self.limit, "n": self.nonce,
            "rl": self.relayed,
        }, max(1.0, self.started_at + self.timeout_ms / 1000 + _TOKEN_GRACE_S - time.time()))

    @classmethod
    def decode(cls, token: str, signer: Signer) -> HopState | None:
        raw = signer.verify(token)
        if raw is None:
            return None
        try:
            first = raw["f"]
            return cls(
                str(raw["ns"]), str(raw["sv"]), str(raw["rt"]), str(raw["rq"]), str(raw["ca"]),
                (str(first[0]), str(first[1])), str(raw["va"]), int(raw["i"]),
                tuple(Hop(str(p), str(m), str(o), float(t)) for p, m, o, t in raw["h"]),
                float(raw["t0"]), float(raw["th"]), str(raw["id"]), SettleInfo.decode(str(raw["st"])), str(raw["pv"]),
                int(raw["to"]), int(raw["lm"]), str(raw["n"]), bool(raw["rl"]))
        except (KeyError, TypeError, ValueError, IndexError):
            return None

    def failed(self, target: Target, reason: str, now: float | None = None) -> HopState:
        """The state for the next hop, after ``target`` (this hop) failed for ``reason``."""
        hop = Hop(target.provider.name, target.model, reason, self.hop_started_at)
        return replace(self, index=self.index + 1, hops=(*self.hops, hop), hop_started_at=now or time.time(),
                       nonce=new_nonce(), relayed=True)


def chain(route: ModelRoute, first: Target, providers: Mapping[str, Provider]) -> list[Target]:
    """Hop 0 (the chosen target or variant), then the route's fallbacks in order."""
    return [first, *(Target(providers[f.provider], f.model, None) for f in route.fallback
                     if f.provider in providers)]


def hops_header(hops: tuple[Hop, ...], final: Target | None) -> str:
    """``claude/claude-3=upstream_error, openai/gpt-4o``: every provider tried, in order, and why each was left."""
    tried = [f"{h.provider}/{h.model}={h.outcome}" for h in hops]
    return ", ".join([*tried, f"{final.provider.name}/{final.model}"] if final is not None else tried)
