"""The fallback relay: where Envoy sends the retry of a failed attempt (docs/design/fallback.md).

It never sees a provider's answer, only that the attempt failed: it records the failure against
the provider's circuit breaker, advances the call's signed fallback state and answers 307 to the
same URL, which Envoy follows internally (re-sending the body) so the decision filter can send the
call to the next provider. Everything it needs is in the request's headers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web

from extproc.core import fallback
from extproc.core.apis import ApiError, ErrorKind, api_of_caller
from extproc.core.decision import Decider
from extproc.core.peer import XFCC_HEADER, from_xfcc
from extproc.core.routing import Target
from extproc.server.admin import serve_app
from extproc.telemetry.metrics import CallLabels, bounded


@dataclass(frozen=True, slots=True)
class RelayAnswer:
    status: int
    headers: dict[str, str]
    body: bytes = b""


async def relay(decider: Decider, headers: dict[str, str], authority: str, path: str) -> RelayAnswer:
    """The answer to one failed attempt: a redirect to the same URL with the next hop's state."""
    api = api_of_caller(path, headers)
    state = fallback.HopState.decode(headers.get(fallback.HEADER, ""), decider.signer)
    if state is not None and state.relayed:
        state = None  # the relay's own output, sent back to it: only a decision's token moves a call on
    if state is not None and decider.peer_identity:
        # In the mesh the retry comes through the processor's sidecar from the caller's own sidecar.
        peer = from_xfcc(headers.get(XFCC_HEADER, ""))
        if peer is None or peer.namespace != state.namespace:
            decider.metrics.identity_refusals.labels("mismatch" if peer else "no_peer").inc()
            state = None
    if state is not None and not await decider.inflight.first_use(state.nonce, fallback.nonce_ttl(state)):
        decider.metrics.tokens_refused.labels("fallback").inc()
        state = None  # a replayed token: each attempt is moved on once
    policy = decider.policy()
    models = policy.for_caller(state.service, state.namespace or None) if state is not None else None
    route = models.resolve(state.route) if state is not None and models is not None else None
    first = policy.providers.get(state.first[0]) if state is not None else None
    if state is None or route is None or first is None:
        error = ApiError(ErrorKind.UNAVAILABLE, "the provider failed and the call's fallback state is missing, "
                         "expired or no longer matches the policy", "fallback_state_invalid")
        return RelayAnswer(502, {"content-type": "application/json"}, error.render(api))
    hops = fallback.chain(route, Target(first, state.first[1], state.variant or None), policy.providers)
    if state.index + 1 >= min(len(hops), state.limit):
        error = ApiError(ErrorKind.UNAVAILABLE, "the provider failed and no fallback is left", "fallback_exhausted")
        return RelayAnswer(502, {"content-type": "application/json"}, error.render(api))
    failed, following = hops[state.index], hops[state.index + 1]
    now = time.time()
    reason = "upstream_error"
    if route.first_byte_timeout is not None and (now - state.hop_started_at) * 1000 >= route.first_byte_timeout * 0.9:
        reason = "timeout"  # Envoy does not say why it retried; time tells a first-byte timeout apart
    settings = route.breaker(policy.mesh.resilience.circuit_breaker)
    if settings is not None:
        decider.breakers.record((state.namespace, state.service, failed.provider.name, failed.model), settings,
                                failed=True)
    labels = CallLabels.of(policy, service=state.service, namespace=state.namespace)
    decider.metrics.fallbacks.labels(*labels.caller, bounded(policy, failed.provider.name),
                                     bounded(policy, following.provider.name), reason).inc()
    token = state.failed(failed, reason, now).encode(decider.signer)
    return RelayAnswer(307, {"location": f"http://{authority}{path}", fallback.HEADER: token,
                             "content-length": "0"})


class RelayServer:
    def __init__(self, decider: Decider) -> None:
        self._decider = decider
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._app = app

    async def start(self, host: str, port: int) -> None:
        self._runner = await serve_app(self._app, host, port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        answer = await relay(self._decider, headers, request.host, request.path_qs)
        return web.Response(status=answer.status, headers=answer.headers, body=answer.body or None)
