"""Choosing the upstream target of a model: its provider and model, and the A/B variant if split."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass

from extproc.policy.model import ModelRoute, Provider


@dataclass(frozen=True, slots=True)
class Target:
    provider: Provider
    model: str
    variant: str | None


def _bucket(route: ModelRoute, sticky_value: str, total: int) -> int:
    digest = hashlib.blake2b(f"{route.name}\x00{sticky_value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % total


def choose_target(
    route: ModelRoute,
    providers: Mapping[str, Provider],
    headers: Mapping[str, str],
    rng: random.Random | None = None,
) -> Target:
    """The route's own target, or one of its weighted variants.

    With ``sticky_header`` set and present, the same header value always lands on the same variant
    (while weights are unchanged); without it each call is drawn independently.
    """
    if not route.variants:
        return Target(providers[route.provider], route.model, None)
    total = sum(v.weight for v in route.variants)
    sticky = headers.get(route.sticky_header) if route.sticky_header else None
    point = _bucket(route, sticky, total) if sticky else (rng or random).randrange(total)
    for variant in route.variants:
        if point < variant.weight:
            return Target(
                providers[variant.provider or route.provider], variant.model or route.model, variant.name
            )
        point -= variant.weight
    raise AssertionError("unreachable: point is below the total weight")
