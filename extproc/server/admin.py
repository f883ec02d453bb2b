"""The admin HTTP port: liveness, readiness, the active policy and live quota usage (no secrets); and the
metrics-only port, which serves nothing but the same /metrics."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from extproc.cache.store import ResponseCache
from extproc.policy.compiled import PolicySet
from extproc.quota.engine import QuotaEngine
from extproc.quota.report import report
from extproc.telemetry.metrics import Metrics


async def serve_app(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve an aiohttp app on HOST:PORT (failing loudly if the port is taken); cleanup() stops it."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=False).start()
    return runner


class MetricsServer:
    """GET /metrics (Prometheus text) and nothing else: a port a scraper may reach without the mesh's mTLS."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self._app = web.Application()
        self._app.router.add_get("/metrics", self._prometheus)

    async def start(self, host: str, port: int) -> None:
        self._runner = await serve_app(self._app, host, port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"x-content-type-options": "nosniff"})


class AdminServer(MetricsServer):
    """/metrics plus health, readiness, the active policy, quota usage and cache statistics."""

    def __init__(self, policy: Callable[[], PolicySet], quota: QuotaEngine, cache: ResponseCache,
                 metrics: Metrics) -> None:
        super().__init__(metrics)
        self._policy = policy
        self._quota = quota
        self._cache = cache
        self.ready = False
        self._app.router.add_get("/healthz", self._healthz)
        self._app.router.add_get("/readyz", self._readyz)
        self._app.router.add_get("/config", self._config)
        self._app.router.add_get("/quota", self._quota_usage)
        self._app.router.add_get("/cache", self._cache_stats)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": self.ready}, status=200 if self.ready else 503)

    async def _config(self, request: web.Request) -> web.Response:
        policy = self._policy()
        return web.json_response({
            "policy_version": policy.version,
            "quota_backend": self._quota.backend_name,
            "providers": {name: {"api": p.api, "authority": p.authority} for name, p in policy.providers.items()},
            "services": {f"{ns}/{name}" if ns else name: {
                "version": models.version, "source": models.source,
                "models": [m.name for m in models.proxy.models]}
                for (ns, name), models in policy.services.items()},
        })

    async def _cache_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"backend": self._cache.backend_name, "stats": vars(self._cache.stats)})

    async def _quota_usage(self, request: web.Request) -> web.Response:
        lines = await report(self._policy(), self._quota, request.query.get("service"))
        return web.json_response({"backend": self._quota.backend_name, "stats": vars(self._quota.stats),
                                  "limits": [line.as_dict() for line in lines]})
