"""A Kubernetes API server on 127.0.0.1 speaking the list/watch/status protocol for our two CRDs.

No API server runs on these machines, so this is the one stand-in: it keeps objects with a global
resourceVersion counter as etcd does, answers lists with the collection's resourceVersion, streams
watch events (newline-delimited JSON, chunked) from a given resourceVersion, answers a watch from a
compacted resourceVersion with an ERROR event carrying a 410 Status, merges status patches through
the status subresource (generation unchanged, a MODIFIED event emitted), and can drop every open
watch connection abruptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

GROUP_PATH = "/apis/ai.extproc.io/v1alpha1"
KINDS = {"aipolicies": "AIPolicy", "aiproviders": "AIProvider"}


@dataclass
class Request:
    method: str
    plural: str
    namespace: str | None
    watch: bool
    resource_version: str | None


@dataclass
class FakeKube:
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    events: list[tuple[int, str, str, dict[str, Any]]] = field(default_factory=list)  # rv, plural, type, object
    requests: list[Request] = field(default_factory=list)
    patches: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)
    revision: int = 100
    compacted: int = 0  # watches from a resourceVersion below this get 410 Gone
    drops: int = 0  # bumped to make every open watch connection die abruptly
    lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- what a test does to the "cluster" --------------------------------------------------------

    def put(self, plural: str, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Create or update (a spec change bumps generation, as the API server does)."""
        with self.lock:
            key = (plural, namespace, name)
            old = self.objects.get(key)
            self.revision += 1
            created = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(seconds=self.revision)
            meta = {"name": name, "namespace": namespace, "resourceVersion": str(self.revision), "generation": 1,
                    "uid": f"uid-{name}", "creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ")}
            obj: dict[str, Any] = {"apiVersion": "ai.extproc.io/v1alpha1", "kind": KINDS[plural], "metadata": meta,
                                   "spec": copy.deepcopy(spec)}
            if old is not None:
                meta["generation"] = old["metadata"]["generation"] + (old["spec"] != spec)
                meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
                if "status" in old:
                    obj["status"] = old["status"]
            self.objects[key] = obj
            self.events.append((self.revision, plural, "MODIFIED" if old else "ADDED", copy.deepcopy(obj)))
            return copy.deepcopy(obj)

    def delete(self, plural: str, namespace: str, name: str) -> None:
        with self.lock:
            obj = self.objects.pop((plural, namespace, name))
            self.revision += 1
            obj["metadata"]["resourceVersion"] = str(self.revision)
            self.events.append((self.revision, plural, "DELETED", obj))

    def compact(self) -> None:
        """Forget history (etcd compaction): older resourceVersions now get 410 Gone."""
        with self.lock:
            self.compacted = self.revision + 1
            self.events.clear()

    def drop_watches(self) -> None:
        with self.lock:
            self.drops += 1

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.objects[(plural, namespace, name)])

    def watch_count(self, plural: str) -> int:
        return sum(1 for r in self.requests if r.plural == plural and r.watch)

    def list_count(self, plural: str) -> int:
        return sum(1 for r in self.requests if r.plural == plural and r.method == "GET" and not r.watch)

    # ---- the HTTP side -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(GROUP_PATH + "/{plural}", self._collection)
        app.router.add_get(GROUP_PATH + "/namespaces/{namespace}/{plural}", self._collection)
        app.router.add_patch(GROUP_PATH + "/namespaces/{namespace}/{plural}/{name}/status", self._patch_status)
        return app

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        plural = request.match_info["plural"]
        namespace = request.match_info.get("namespace")
        watching = request.query.get("watch") in ("true", "True", "1")
        version = request.query.get("resourceVersion")
        drops = self.drops  # read before the request is visible to a test, so a drop after that reaches it
        self.requests.append(Request("GET", plural, namespace, watching, version))
        if plural not in KINDS:
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        if not watching:
            with self.lock:
                items = [copy.deepcopy(o) for (p, ns, _), o in sorted(self.objects.items())
                         if p == plural and namespace in (None, ns)]
                revision = self.revision
            return web.json_response({"apiVersion": "ai.extproc.io/v1alpha1", "kind": KINDS[plural] + "List",
                                      "metadata": {"resourceVersion": str(revision)}, "items": items})
        return await self._watch(request, plural, namespace, int(version or 0),
                                 float(request.query.get("timeoutSeconds", "30")), drops)

    async def _watch(self, request: web.Request, plural: str, namespace: str | None, since: int,
                     timeout: float, drops: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if since < self.compacted:
            gone = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                "reason": "Expired", "code": 410,
                                                "message": f"too old resource version: {since} ({self.compacted})"}}
            await response.write(json.dumps(gone).encode() + b"\n")
            await response.write_eof()
            return response
        deadline = time.monotonic() + timeout
        sent = since
        while time.monotonic() < deadline:
            if self.drops != drops:
                if request.transport is not None:
                    request.transport.abort()  # no terminating chunk: the client sees a broken stream
                return response
            with self.lock:
                pending = [(rv, t, o) for rv, p, t, o in self.events
                           if p == plural and rv > sent and namespace in (None, o["metadata"]["namespace"])]
            for rv, event_type, obj in pending:
                await response.write(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")
                sent = rv
            await asyncio.sleep(0.02)
        with contextlib.suppress(ConnectionError):  # the client may have gone already
            await response.write_eof()
        return response

    async def _patch_status(self, request: web.Request) -> web.Response:
        plural, namespace, name = (request.match_info[k] for k in ("plural", "namespace", "name"))
        assert request.content_type == "application/merge-patch+json", request.content_type
        body = await request.json()
        self.requests.append(Request("PATCH", plural, namespace, False, None))
        with self.lock:
            obj = self.objects.get((plural, namespace, name))
            if obj is None:
                return web.json_response({"kind": "Status", "code": 404}, status=404)
            self.patches.append((plural, namespace, name, body))
            obj["status"] = {**obj.get("status", {}), **body.get("status", {})}  # only status is writable here
            self.revision += 1
            obj["metadata"]["resourceVersion"] = str(self.revision)
            self.events.append((self.revision, plural, "MODIFIED", copy.deepcopy(obj)))
            return web.json_response(copy.deepcopy(obj))


class Served:
    """Runs a FakeKube on 127.0.0.1 in a background thread."""

    def __init__(self, kube: FakeKube, port: int = 0) -> None:
        self.kube = kube
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake API server did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner = web.AppRunner(self.kube.app(), handle_signals=False, shutdown_timeout=0.5)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.kube.drop_watches()
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
