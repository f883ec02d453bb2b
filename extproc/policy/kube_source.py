"""Policy from the Kubernetes API: ``AIPolicy`` and ``AIProvider`` objects, listed and watched.

Each kind runs one informer thread with the official client: list (remember the list's
resourceVersion), then watch from it, following every event's resourceVersion so that a dropped or
timed-out watch resumes where it stopped; reconnects back off exponentially; a 410 Gone (the
resourceVersion was compacted away) means relist.

Objects are judged one by one, with the same loader and model as files: an object that fails is
reported ``Rejected`` in its status with the reason, and *its* last accepted version keeps serving
(or none, if it never had one) while every other object's policy goes on. The evaluation is pure
and runs inside :meth:`PolicyStore.reload`, so files (the mesh ConfigMap) and objects are always
validated together; status writes happen afterwards on the informer threads.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from extproc.policy.crd import (
    GROUP,
    POLICY_PLURAL,
    PROVIDER_PLURAL,
    SECRETS_DIR,
    VERSION,
    ObjectError,
    ObjectKey,
    key_of,
    policy_document,
    provider_document,
    spec_path,
)
from extproc.policy.loader import Document, check_documents

log = logging.getLogger(__name__)

POLICY, PROVIDER = "AIPolicy", "AIProvider"
_GONE = 410


@dataclass(frozen=True, slots=True)
class KubeOptions:
    root_namespace: str = "istio-system"  # AIPolicies here are mesh-wide (per service)
    provider_namespace: str = "ai-system"  # AIProviders are read from here only (the platform team's)
    secrets_dir: str = SECRETS_DIR
    watch_timeout_seconds: int = 300  # the server ends each watch after this; we resume from our resourceVersion
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


@dataclass(frozen=True, slots=True)
class ObjectStatus:
    state: str  # Accepted | Rejected
    reason: str
    observed_generation: int
    serving_generation: int | None

    def as_dict(self) -> dict[str, Any]:
        status: dict[str, Any] = {"state": self.state, "reason": self.reason,
                                  "observedGeneration": self.observed_generation}
        if self.serving_generation is not None:
            status["servingGeneration"] = self.serving_generation
        return status


class Backoff:
    """Exponential with full jitter, so many replicas do not reconnect in lockstep."""

    def __init__(self, initial: float, maximum: float, rand: Callable[[], float] = random.random) -> None:
        self._initial, self._max, self._rand = initial, maximum, rand
        self._attempt = 0

    def next(self) -> float:
        ceiling = min(self._max, self._initial * 2.0 ** self._attempt)
        self._attempt += 1
        return ceiling / 2 + ceiling / 2 * self._rand()

    def reset(self) -> None:
        self._attempt = 0


def _generation(obj: Mapping[str, Any]) -> int:
    return int((obj.get("metadata") or {}).get("generation") or 0)


def _order(item: tuple[ObjectKey, Mapping[str, Any]]) -> tuple[int, str, str, str]:
    # Providers first (policies refer to them); among policies the oldest wins a conflict.
    key, obj = item
    created = str((obj.get("metadata") or {}).get("creationTimestamp") or "")
    return (0 if key.kind == PROVIDER else 1, created, key.namespace, key.name)


# Per object, the (object, document) pairs it may serve as, best first (KubePolicySource._choices).
_Choices = dict[ObjectKey, list[tuple[dict[str, Any], Document]]]


def _settle(base: Sequence[Document], options: _Choices,
            reasons: Mapping[ObjectKey, str]) -> tuple[dict[ObjectKey, int], dict[ObjectKey, str]]:
    """Which choice of each object serves (an index into its options; past the end: none), and why the
    objects that fail as they are now fail (those not already in ``reasons``)."""
    chosen = {key: 0 for key in options}
    failures: dict[ObjectKey, str] = {}
    settled: list[Document] = list(base)
    # Providers are settled first, so a policy is judged against the providers that will serve.
    for kind in (PROVIDER, POLICY):
        keys = [key for key in options if key.kind == kind]
        while True:  # ends: each round drops one choice of a failing object
            active = [(key, options[key][chosen[key]][1]) for key in keys if chosen[key] < len(options[key])]
            problems = check_documents([*settled, *(doc for _, doc in active)])
            failed = {p.file for p in problems}
            bad = [key for key, _ in active if key.label in failed]
            if not bad:
                settled.extend(doc for _, doc in active)
                break
            for key in bad:
                if chosen[key] == 0 and key not in reasons:  # the object as it is now failed
                    failures[key] = "; ".join(f"{spec_path(key, p.path)}: {p.message}"
                                              for p in problems if p.file == key.label)
                chosen[key] += 1
    return chosen, failures


def _status(obj: Mapping[str, Any], serving: Mapping[str, Any] | None, reason: str | None) -> ObjectStatus:
    """Accepted, or Rejected with the reason and which generation, if any, still serves."""
    if reason is None:
        return ObjectStatus("Accepted", "", _generation(obj), _generation(obj))
    kept = f"; still serving generation {_generation(serving)}" if serving is not None else "; not serving"
    return ObjectStatus("Rejected", reason + kept, _generation(obj),
                        _generation(serving) if serving is not None else None)


class KubePolicySource:
    """Holds the watched objects; turns them into accepted policy documents and statuses."""

    def __init__(self, api_client: client.ApiClient, options: KubeOptions = KubeOptions()) -> None:
        self._api = client.CustomObjectsApi(api_client)
        self._options = options
        self._lock = threading.Lock()
        self._objects: dict[ObjectKey, dict[str, Any]] = {}
        self._last_good: dict[ObjectKey, dict[str, Any]] = {}
        self._statuses: dict[ObjectKey, ObjectStatus] = {}
        self._written: dict[ObjectKey, dict[str, Any]] = {}
        self._on_change: Callable[[], object] = lambda: None
        self._stop = threading.Event()
        self._synced = {POLICY: threading.Event(), PROVIDER: threading.Event()}
        self._threads: list[threading.Thread] = []
        self._watches: dict[str, watch.Watch] = {}
        self._status_due = threading.Event()

    # ---- evaluation ---------------------------------------------------------------------------

    def documents(self, base: Sequence[Document]) -> list[Document]:
        """The documents to serve next to ``base`` (the files); records every object's status."""
        with self._lock:
            objects = sorted(self._objects.items(), key=_order)
            last_good = dict(self._last_good)
        options, reasons = self._choices(objects, last_good)
        chosen, failures = _settle(base, options, reasons)
        reasons.update(failures)
        statuses: dict[ObjectKey, ObjectStatus] = {}
        accepted: list[Document] = []
        new_good: dict[ObjectKey, dict[str, Any]] = {}
        for key, obj in objects:
            serving = options[key][chosen[key]] if chosen[key] < len(options[key]) else None
            if serving is not None:
                accepted.append(serving[1])
                new_good[key] = serving[0]
            statuses[key] = _status(obj, serving[0] if serving is not None else None, reasons.get(key))
        self._record(new_good, statuses)
        return accepted

    def _choices(self, objects: Sequence[tuple[ObjectKey, dict[str, Any]]],
                 last_good: Mapping[ObjectKey, dict[str, Any]]) -> tuple[_Choices, dict[ObjectKey, str]]:
        """Each object's candidates, best first: as it is now (unless it cannot be read), then its last
        accepted version (if another generation); and why the ones that cannot be read cannot."""
        options: _Choices = {}
        reasons: dict[ObjectKey, str] = {}
        for key, obj in objects:
            choices = []
            try:
                choices.append((obj, self._document(key, obj)))
            except ObjectError as exc:
                reasons[key] = str(exc)
            good = last_good.get(key)
            if good is not None and _generation(good) != _generation(obj):
                choices.append((good, self._document(key, good)))
            options[key] = choices
        return options, reasons

    def _record(self, new_good: Mapping[ObjectKey, dict[str, Any]], statuses: dict[ObjectKey, ObjectStatus]) -> None:
        with self._lock:
            for key, good in new_good.items():
                if key in self._objects:  # deleted meanwhile: forget it
                    self._last_good[key] = good
            if statuses != self._statuses:
                self._statuses = statuses
                self._status_due.set()  # written by the status thread, never on the caller's (event loop) thread

    def _document(self, key: ObjectKey, obj: Mapping[str, Any]) -> Document:
        if key.kind == POLICY:
            return policy_document(obj, self._options.root_namespace)
        return provider_document(obj, self._options.secrets_dir)

    # ---- informers ----------------------------------------------------------------------------

    def start(self) -> None:
        for kind in (PROVIDER, POLICY):
            thread = threading.Thread(target=self._informer, args=(kind,), name=f"watch-{kind}", daemon=True)
            thread.start()
            self._threads.append(thread)
        writer = threading.Thread(target=self._status_writer, name="status-writer", daemon=True)
        writer.start()
        self._threads.append(writer)

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True once both kinds have been listed (the processor serves only after that)."""
        return all(event.wait(timeout) for event in self._synced.values())

    def attach(self, on_change: Callable[[], object]) -> None:
        """Call ``on_change`` (the store's reload) on every change, starting now."""
        self._on_change = on_change
        self._changed()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._status_due.set()
        for stream in list(self._watches.values()):
            stream.stop()  # shuts the socket down, so a thread blocked reading the stream wakes up
        for thread in self._threads:
            thread.join(timeout)

    def _list(self, kind: str, **kwargs: Any) -> Any:
        if kind == POLICY:
            return self._api.list_cluster_custom_object(GROUP, VERSION, POLICY_PLURAL, **kwargs)
        return self._api.list_namespaced_custom_object(GROUP, VERSION, self._options.provider_namespace,
                                                       PROVIDER_PLURAL, **kwargs)

    def _informer(self, kind: str) -> None:
        backoff = Backoff(self._options.backoff_initial, self._options.backoff_max)
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._relist(kind)
                    backoff.reset()
                for event_type, obj in self._watch(kind, version):
                    version = str(obj["metadata"]["resourceVersion"])
                    if event_type == "BOOKMARK":
                        continue
                    self._apply(kind, event_type, obj)
                    self._changed()
                    backoff.reset()
                # The server ended the watch (its timeout): resume from the last resourceVersion.
            except ApiException as exc:
                if exc.status == _GONE:
                    log.info("%s watch: resourceVersion %s is gone (410); relisting", kind, version)
                    version = None
                    continue
                log.warning("%s list/watch failed (%s %s); retrying", kind, exc.status, exc.reason)
                self._stop.wait(backoff.next())
            except Exception as exc:  # connection refused/reset, truncated stream, bad JSON: reconnect
                log.warning("%s list/watch interrupted (%s: %s); reconnecting", kind, type(exc).__name__, exc)
                self._stop.wait(backoff.next())

    def _relist(self, kind: str) -> str:
        listing = self._list(kind)
        items = listing.get("items") or []
        with self._lock:
            for key in [k for k in self._objects if k.kind == kind]:
                self._objects.pop(key)
            for obj in items:
                self._objects[key_of(kind, obj)] = obj
            self._forget_missing()
        self._synced[kind].set()
        log.info("listed %d %s object(s) at resourceVersion %s", len(items), kind,
                 listing["metadata"]["resourceVersion"])
        self._changed()
        return str(listing["metadata"]["resourceVersion"])

    def _watch(self, kind: str, version: str) -> Iterator[tuple[str, dict[str, Any]]]:
        timeout = self._options.watch_timeout_seconds
        self._watches[kind] = current = watch.Watch()
        stream = current.stream(
            self._list, kind, resource_version=version, timeout_seconds=timeout, allow_watch_bookmarks=True,
            # A read timeout beyond the server's own, so a silently dead connection is noticed.
            _request_timeout=(5, timeout + 30),
        )
        for event in stream:
            if self._stop.is_set():
                return
            yield str(event["type"]), event["raw_object"]

    def _apply(self, kind: str, event_type: str, obj: dict[str, Any]) -> None:
        key = key_of(kind, obj)
        with self._lock:
            if event_type == "DELETED":
                self._objects.pop(key, None)
                self._forget_missing()
            else:
                self._objects[key] = obj

    def _forget_missing(self) -> None:
        for table in (self._last_good, self._written):
            for key in [k for k in table if k not in self._objects]:
                table.pop(key)

    def _changed(self) -> None:
        try:
            self._on_change()
        except Exception:
            log.exception("policy reload after a Kubernetes change failed")
        # An event also re-checks statuses: one may have been overwritten by someone else.
        self._status_due.set()

    def _status_writer(self) -> None:
        while not self._stop.is_set():
            self._status_due.wait()
            self._status_due.clear()
            if not self._stop.is_set():
                self.write_statuses()

    def write_statuses(self) -> None:
        """Patch each object's status subresource where it differs from what we decided."""
        with self._lock:
            todo = []
            for key, status in self._statuses.items():
                obj = self._objects.get(key)
                wanted = status.as_dict()
                if obj is None or obj.get("status") == wanted or self._written.get(key) == wanted:
                    continue
                todo.append((key, wanted))
        for key, wanted in todo:
            try:
                self._patch_status(key, wanted)
            except ApiException as exc:
                log.warning("cannot write the status of %s: %s %s", key.label, exc.status, exc.reason)
                continue
            except Exception as exc:
                log.warning("cannot write the status of %s: %s", key.label, exc)
                continue
            with self._lock:
                if key in self._objects:
                    self._written[key] = wanted

    def _patch_status(self, key: ObjectKey, status: dict[str, Any]) -> None:
        plural = POLICY_PLURAL if key.kind == POLICY else PROVIDER_PLURAL
        # A merge patch of the status only: other fields and other writers' keys stay untouched.
        self._api.patch_namespaced_custom_object_status(GROUP, VERSION, key.namespace, plural, key.name,
                                                        {"status": status},
                                                        _content_type="application/merge-patch+json")


def api_client(server: str | None = None) -> client.ApiClient:
    """In a pod: the service account; else ~/.kube/config; or an explicit API URL (tests, proxies)."""
    from kubernetes import config

    if server:
        configuration = client.Configuration()
        configuration.host = server
        return client.ApiClient(configuration)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()
