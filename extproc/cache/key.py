"""What makes two calls identical, and whether a call may be cached at all."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from extproc.base.wire import CACHE_HEADER
from extproc.policy.model import ModelRoute


@dataclass(frozen=True, slots=True)
class CachePlan:
    key: str
    ttl_s: int
    read: bool   # may be answered from the cache
    write: bool  # its response may be stored


def plan_cache(
    *,
    prefix: str,
    scope: str,
    provider: str,
    operation: str,
    route: ModelRoute,
    body: Mapping[str, object],
    headers: Mapping[str, str],
) -> CachePlan | None:
    """``body`` is the request as it will reach the provider (after routing), so variants never mix."""
    if route.cache_ttl is None:
        return None
    if headers.get(CACHE_HEADER, "").strip().lower() == "bypass":
        return None
    directives = {d.strip().lower() for d in headers.get("cache-control", "").split(",")}
    if "no-store" in directives:
        return None
    if not route.cache.nondeterministic and not _deterministic(body, operation):
        return None
    # Key order, whitespace and 0 vs 0.0 never matter: the key is a hash of canonical JSON.
    canonical = orjson.dumps(_canonical(body), option=orjson.OPT_SORT_KEYS)
    pool = f"pool={route.cache.share_as}" if route.cache.share_as else f"svc={scope}"
    digest = hashlib.sha256(b"%s\x00%s\x00%s" % (provider.encode(), operation.encode(), canonical)).hexdigest()
    ttl_s = max(1, route.cache_ttl // 1000)
    return CachePlan(f"{prefix}:{{{pool}}}:{digest}", ttl_s, read="no-cache" not in directives, write=True)


def _canonical(value: object) -> object:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def _deterministic(body: Mapping[str, object], operation: str) -> bool:
    if operation == "embeddings":
        return True  # the same input always embeds the same
    temperature = body.get("temperature")
    n = body.get("n", 1)
    return isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0 and n == 1
