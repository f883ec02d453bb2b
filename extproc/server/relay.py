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

from extproc.base.apis import ApiError, ErrorKind, api_of_caller
from extproc.base.wire import FALLBACK_HEADER, XFCC_HEADER
from extproc.core import fallback
from extproc.core.peer import from_xfcc
from extproc.core.runtime import Runtime
from extproc.server.admin import serve_app


@dataclass(frozen=True, slots=True)
class RelayAnswer:
    status: int
    headers: dict[str, str]
    body: bytes = b""


async def relay(runtime: Runtime, headers: dict[str, str], authority: str, path: str) -> RelayAnswer:
    """The answer to one failed attempt: a redirect to the same URL with the next hop's state."""
    api = api_of_caller(path, headers)
    state = await _verified_state(runtime, headers)
    if state is None:
        error: ApiError = ApiError(ErrorKind.UNAVAILABLE, "the provider failed and the call's fallback state is "
                                   "missing, expired or no longer matches the policy", "fallback_state_invalid")
    else:
        moved = fallback.after_failure(runtime, state, time.time())
        if isinstance(moved, fallback.HopState):
            return RelayAnswer(307, {"location": f"http://{authority}{path}",
                                     FALLBACK_HEADER: moved.encode(runtime.signer), "content-length": "0"})
        error = moved
    return RelayAnswer(502, {"content-type": "application/json"}, error.render(api))


async def _verified_state(runtime: Runtime, headers: dict[str, str]) -> fallback.HopState | None:
    """The attempt's state, if genuine, made by a decision (not by the relay), presented from the call's own
    namespace (in the mesh) and not seen before."""
    state = fallback.HopState.decode(headers.get(FALLBACK_HEADER, ""), runtime.signer)
    if state is None or state.relayed:
        return None  # forged or expired; or the relay's own output sent back to it
    if runtime.peer_identity:
        # In the mesh the retry comes through the processor's sidecar from the caller's own sidecar.
        peer = from_xfcc(headers.get(XFCC_HEADER, ""))
        if peer is None or peer.namespace != state.namespace:
            runtime.metrics.identity_refusals.labels("mismatch" if peer else "no_peer").inc()
            return None
    if not await runtime.inflight.first_use(state.nonce, fallback.nonce_ttl(state)):
        runtime.metrics.tokens_refused.labels("fallback").inc()
        return None  # a replayed token: each attempt is moved on once
    return state


class RelayServer:
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
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
        answer = await relay(self._runtime, headers, request.host, request.path_qs)
        return web.Response(status=answer.status, headers=answer.headers, body=answer.body or None)
