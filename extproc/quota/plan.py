"""Which counters one call touches, and by how much: plain data, no I/O."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from extproc.policy.model import AIProxy, Limits, MeshSettings, ModelRoute
from extproc.quota.windows import MONTH, describe_period, window

METRIC_REQUESTS = "requests"
TOKEN_METRICS = {"input": "input_tokens", "output": "output_tokens", "total": "total_tokens"}
METRIC_COST = "cost"


@dataclass(frozen=True, slots=True)
class Estimate:
    input_tokens: int
    output_tokens: int
    cost_micro_usd: int

    def amount(self, metric: str) -> int:
        return {
            METRIC_REQUESTS: 1,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
            METRIC_COST: self.cost_micro_usd,
        }[metric]


@dataclass(frozen=True, slots=True)
class Counter:
    key: str
    metric: str
    limit: int
    window_end: int
    label: str  # what the caller is told when it trips, e.g. "requests per minute for demo/user-service"


def plan_counters(
    *,
    prefix: str,
    namespace: str | None,
    service: str,
    proxy: AIProxy,
    mesh: MeshSettings,
    route: ModelRoute | None,
    provider: str,
    now: float,
) -> tuple[Counter, ...]:
    """Every counter a call under the policy of ``service`` to ``route`` on ``provider`` must fit under, now.

    ``namespace``/``service`` name the policy's scope: a policy without a namespace keeps one budget
    for that service name wherever it runs.
    """
    caller = f"{namespace}/{service}" if namespace else service
    # A hash tag keeps one caller's keys in one Redis Cluster slot, so one script can touch them all.
    base = f"{prefix}:{{{caller}}}"
    service_limits = proxy.limits if proxy.limits is not None else mesh.default_limits
    scopes: list[tuple[str, str, Limits | None]] = [
        ("svc", caller, service_limits),
        (f"provider={provider}", f"{caller} on provider {provider}", proxy.provider_limits.get(provider)),
    ]
    if route is not None:  # None: a provider path outside the AI endpoints (no model)
        scopes.insert(1, (f"model={route.name}", f"{caller} model {route.name}", _model_limits(route)))
    return tuple(
        counter
        for scope, who, limits in scopes
        if limits is not None
        for counter in _counters(f"{base}:{scope}", who, limits, now)
    )


def _model_limits(route: ModelRoute) -> Limits | None:
    if route.rate_limit is None:
        return route.limits
    extra = (route.rate_limit,)
    if route.limits is None:
        return Limits(requests=extra)
    return route.limits.model_copy(update={"requests": route.limits.requests + extra})


def _counters(base: str, who: str, limits: Limits, now: float) -> Iterator[Counter]:
    for rate in limits.requests:
        yield _counter(base, METRIC_REQUESTS, rate.count, rate.per_seconds, f"requests per {_per(rate.per_seconds)} "
                       f"({rate.count}) for {who}", now)
    for token in limits.tokens:
        metric = TOKEN_METRICS[token.type]
        yield _counter(base, metric, token.rate.count, token.rate.per_seconds,
                       f"{token.type} tokens per {_per(token.rate.per_seconds)} ({token.rate.count}) for {who}", now)
    for cost in limits.cost:
        period = 86400 if cost.per == "day" else MONTH
        yield _counter(base, METRIC_COST, round(cost.usd * 1_000_000), period,
                       f"spend per {cost.per} (${cost.usd:g}) for {who}", now)


def _per(period_seconds: int) -> str:
    return describe_period(period_seconds)


def _counter(base: str, metric: str, limit: int, period: int, label: str, now: float) -> Counter:
    start, end = window(period, now)
    return Counter(f"{base}:{metric}:{period}:{start}", metric, limit, end, label)
