"""What a call costs: the policy's price overrides, then the shipped table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml

from extproc.policy.model import Price, Provider


@dataclass(frozen=True, slots=True)
class ModelPrice:
    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None

    def micro_usd(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> int:
        """Cost in millionths of a dollar, rounded up (so budgets are never undercounted)."""
        cached = cached_input_tokens if self.cached_input_per_mtok is not None else 0
        uncached = input_tokens - cached
        dollars_times_million = (uncached * self.input_per_mtok + cached * (self.cached_input_per_mtok or 0.0)
                                 + output_tokens * self.output_per_mtok)
        return math.ceil(dollars_times_million)  # tokens * USD per Mtok = micro-USD


@cache
def shipped_prices() -> Mapping[tuple[str, str], ModelPrice]:
    text = (resources.files("extproc.policy") / "prices.yaml").read_text()
    table: dict[tuple[str, str], ModelPrice] = {}
    for api, models in yaml.safe_load(text).items():
        for model, p in models.items():
            table[(api, model)] = ModelPrice(p["input"], p["output"], p.get("cached_input"))
    return table


class PriceTable:
    def __init__(self, overrides: Iterable[Price], providers: Mapping[str, Provider]) -> None:
        self._providers = providers
        self._overrides = {
            (p.provider, p.model): ModelPrice(p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok)
            for p in overrides
        }

    def lookup(self, provider: str, model: str) -> ModelPrice | None:
        found = self._overrides.get((provider, model))
        if found is None and provider in self._providers:
            found = shipped_prices().get((self._providers[provider].api, model))
        return found
