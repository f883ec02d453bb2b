"""Live usage against every limit in the policy: what `extproc quota show` and the admin endpoint print."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from extproc.policy.compiled import PolicySet
from extproc.quota.engine import QuotaEngine
from extproc.quota.plan import Counter, plan_counters


@dataclass(frozen=True, slots=True)
class Line:
    service: str
    limit_label: str
    metric: str
    used: int
    limit: int
    resets_in_s: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def all_counters(policy: PolicySet, now: float, service: str | None = None) -> list[tuple[str, Counter]]:
    """Every counter any call of each (or one) service could touch in the current windows."""
    seen: dict[str, tuple[str, Counter]] = {}
    for (namespace, name), models in policy.services.items():
        if service is not None and service not in (name, f"{namespace}/{name}"):
            continue
        caller = f"{namespace}/{name}" if namespace else name
        for route in models.proxy.models:
            providers = {route.provider, *(v.provider for v in route.variants if v.provider)}
            for provider in sorted(providers):
                for counter in plan_counters(prefix=policy.mesh.quota.key_prefix, namespace=namespace,
                                             service=name, proxy=models.proxy, mesh=policy.mesh, route=route,
                                             provider=provider, now=now):
                    seen.setdefault(counter.key, (caller, counter))
    return list(seen.values())


async def report(policy: PolicySet, engine: QuotaEngine, service: str | None = None) -> list[Line]:
    now = engine.now()
    counters = all_counters(policy, now, service)
    values = await engine.read([c.key for _, c in counters])
    return [Line(caller, c.label, c.metric, used, c.limit, max(0, int(c.window_end - now)))
            for (caller, c), used in zip(counters, values, strict=True)]


def format_lines(lines: list[Line]) -> str:
    if not lines:
        return "no limits configured"
    rows = [("service", "limit", "used", "of", "remaining", "resets in")]
    for line in lines:
        used, limit = _fmt(line.metric, line.used), _fmt(line.metric, line.limit)
        remaining = _fmt(line.metric, max(0, line.limit - line.used))
        rows.append((line.service, line.limit_label.split(" for ")[0], used, limit, remaining, f"{line.resets_in_s}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _fmt(metric: str, value: int) -> str:
    return f"${value / 1_000_000:.4f}" if metric == "cost" else str(value)
