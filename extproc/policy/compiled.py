"""The compiled policy set: immutable, indexed for the per-request lookups of the decision core."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from extproc.policy.model import AIProxy, BreakerSettings, MeshSettings, ModelRoute, Price, Provider, ServicePolicy
from extproc.policy.prices import PriceTable


@dataclass(frozen=True, slots=True)
class ServiceModels:
    """The models one service may call, indexed by every name it may use for them."""

    source: str
    proxy: AIProxy
    _by_name: Mapping[str, ModelRoute] = field(repr=False)
    # (namespace or None, service) of the policy: what its quota counters are kept under. None for the
    # mesh default policy, whose counters are kept per calling service.
    scope: tuple[str | None, str] | None = None

    @property
    def version(self) -> str:
        """A digest of this service's own policy: it changes exactly when that policy does."""
        return hashlib.sha256(self.proxy.model_dump_json().encode()).hexdigest()[:12]

    @classmethod
    def build(cls, source: str, proxy: AIProxy, scope: tuple[str | None, str] | None = None) -> ServiceModels:
        by_name: dict[str, ModelRoute] = {}
        # Logical names win over upstream model names; among upstream names the first entry wins.
        for model in proxy.models:
            by_name[model.name] = model
        for model in proxy.models:
            by_name.setdefault(model.model, model)
        return cls(source, proxy, MappingProxyType(by_name), scope)

    def resolve(self, requested: str) -> ModelRoute | None:
        return self._by_name.get(requested)

    @property
    def allowed(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.proxy.models)


@dataclass(frozen=True, slots=True)
class PolicySet:
    mesh: MeshSettings
    providers: Mapping[str, Provider]
    services: Mapping[tuple[str | None, str], ServiceModels]
    default: ServiceModels | None
    version: str
    prices: PriceTable
    model_names: frozenset[str] = frozenset()  # every logical and upstream model name the policy mentions
    known_services: frozenset[str] = frozenset()

    def for_caller(self, service: str | None, namespace: str | None) -> ServiceModels | None:
        """The caller's own policy (namespace-specific first), else the mesh default if enabled."""
        if service is not None:
            found = self.services.get((namespace, service)) or self.services.get((None, service))
            if found is not None:
                return found
        return self.default if self.mesh.unknown_service == "default" else None

    def fails_open(self, service: str | None, namespace: str | None) -> bool:
        """Whether the service's sidecar lets calls pass untouched when the processor is unreachable."""
        models = self.for_caller(service, namespace)
        choice = models.proxy.on_processor_failure if models is not None else None
        return (choice or self.mesh.resilience.on_processor_failure) == "open"

    def breaker_settings(self, namespace: str, service: str, route: str) -> BreakerSettings | None:
        """The breaker settings of a service's model entry (None if the policy no longer has it)."""
        models = self.services.get((namespace or None, service)) or self.services.get((None, service)) or self.default
        found = models.resolve(route) if models is not None else None
        if found is None:
            return None
        return found.breaker(self.mesh.resilience.circuit_breaker)

    @property
    def service_names(self) -> tuple[str, ...]:
        return tuple(sorted({name for _, name in self.services}))


def compile_policy_set(
    *,
    mesh: MeshSettings,
    providers: Iterable[Provider],
    services: Iterable[tuple[str, ServicePolicy]],
    version: str,
    prices: Iterable[Price] = (),
) -> PolicySet:
    by_name = MappingProxyType({p.name: p for p in providers})
    services = list(services)
    return PolicySet(
        mesh=mesh,
        providers=by_name,
        services=MappingProxyType(
            {(p.namespace, p.service): ServiceModels.build(source, p.ai_proxy, (p.namespace, p.service))
             for source, p in services}
        ),
        default=ServiceModels.build("mesh.default_policy", mesh.default_policy) if mesh.default_policy else None,
        version=version,
        prices=PriceTable(prices, by_name),
        model_names=frozenset(
            name
            for proxy in [p.ai_proxy for _, p in services] + ([mesh.default_policy] if mesh.default_policy else [])
            for route in proxy.models
            for name in (route.name, route.model, *(v.model for v in route.variants if v.model),
                         *(f.model for f in route.fallback))
        ),
        known_services=frozenset(p.service for _, p in services),
    )
