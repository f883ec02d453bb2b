"""Which ``Sidecar`` resources hide the hosts our filters need (``extproc check sidecars``).

An Istio ``Sidecar`` with ``egress`` limits what its workloads' proxies import: a host it does not
list gets no cluster and no virtual host there. Hidden from an opted-in workload, the processor
fails every AI call closed (500 ``cluster_not_available``), and a hidden provider host or egress
gateway leaves its calls without a route; nothing else says why. These functions evaluate Sidecar
objects against ``required_egress_hosts`` (extproc/envoy_config/istio.py) the way istiod selects
services:

* ``egress[].hosts`` entries are ``namespace/dnsName``. The namespace is ``*`` (any), ``.`` (the
  namespace the Sidecar takes effect in), ``~`` (none) or a name, compared with the namespace Istio
  finds the host in (a Service's own, a ServiceEntry's). The dnsName is ``*``, an exact FQDN, or a
  wildcard ``*suffix`` (``*.example.com``: any host ending in ``.example.com``, not ``example.com``).
* A listener with a ``port`` (not ``HTTP_PROXY``) imports a host on that port only. The route table
  of a port is made by the first listener on that port, else by the listener without a port: a
  host whose virtual host the filter patches must be imported there. A cluster needs any listener.
* No ``egress`` at all (or an empty list) imports everything, like no Sidecar.
* A Sidecar with ``workloadSelector`` governs the pods it selects in its namespace, instead of the
  namespace's one without (at most one per namespace); one without a selector in the root namespace
  is the mesh default for namespaces that have none of their own, and its ``.`` is each of those.
* ``outboundTrafficPolicy: REGISTRY_ONLY`` is expected: every needed host is in the registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from extproc.envoy_config.istio import EgressNeed

ROOT_NAMESPACE = "istio-system"  # meshConfig.rootNamespace by default
SIDECAR_API_GROUP = "networking.istio.io/"
HTTP_PROXY = "HTTP_PROXY"  # an egress listener used as an HTTP proxy imports every port of its hosts


# --- reading Sidecar objects ----------------------------------------------------------------------------------------


def sidecar_objects(documents: Iterable[Any]) -> list[dict[str, Any]]:
    """The Sidecar objects among YAML documents: plain ones and the items of ``kind: List`` objects
    (``kubectl get sidecars -A -o yaml``); anything else is skipped."""
    found: list[dict[str, Any]] = []
    for document in documents:
        if not isinstance(document, dict):
            continue
        items = document.get("items")
        if str(document.get("kind", "")).endswith("List") and isinstance(items, list):
            found.extend(sidecar_objects(items))
        elif document.get("kind") == "Sidecar" and str(document.get("apiVersion", "")).startswith(SIDECAR_API_GROUP):
            found.append(document)
    return found


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _metadata(sidecar: Mapping[str, Any]) -> tuple[str, str]:
    meta = _mapping(sidecar.get("metadata"))
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "?")


def _selector(sidecar: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    labels = _mapping(_mapping(_mapping(sidecar.get("spec")).get("workloadSelector")).get("labels"))
    return tuple(sorted((str(k), str(v)) for k, v in labels.items()))


@dataclass(frozen=True, slots=True)
class Listener:
    """One ``egress`` listener: its index, ``port.number`` (None: no port) and protocol, and its hosts."""

    index: int
    port: int | None
    protocol: str
    hosts: tuple[str, ...]

    @property
    def port_bound(self) -> bool:
        """Imports its hosts on its own port only (istiod's ``needsPortMatch``)."""
        return bool(self.port) and self.protocol.upper() != HTTP_PROXY

    @property
    def label(self) -> str:
        return f"egress[{self.index}]" + ("" if self.port is None else f" (port {self.port})")


def egress_listeners(sidecar: Mapping[str, Any]) -> list[Listener] | None:
    """The Sidecar's egress listeners; None when it has none (it then restricts nothing)."""
    egress = _mapping(sidecar.get("spec")).get("egress")
    if not isinstance(egress, list) or not egress:
        return None
    listeners = []
    for index, raw in enumerate(egress):
        listener = _mapping(raw)
        port = listener.get("port")
        number: int | None = None
        protocol = ""
        if isinstance(port, Mapping):
            try:
                number = int(port.get("number") or 0)
            except (TypeError, ValueError):
                number = 0
            protocol = str(port.get("protocol") or "")
        hosts = listener.get("hosts")
        listeners.append(Listener(index, number, protocol,
                                  tuple(str(h) for h in hosts) if isinstance(hosts, list) else ()))
    return listeners


# --- matching -------------------------------------------------------------------------------------------------------


def dns_name_matches(pattern: str, host: str) -> bool:
    """Istio's hostname rule for imports: ``*`` any host, ``*suffix`` a host ending in the suffix, else equal."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*"):
        return host.endswith(pattern[1:])
    return pattern == host


def entry_matches(entry: str, need: EgressNeed, namespace: str | None) -> bool:
    """Whether one ``namespace/dnsName`` entry imports the need's host (ports aside).

    ``namespace`` is where the Sidecar takes effect (what ``.`` means); None when not known, for the
    mesh default checked for no namespace in particular: ``.`` then matches nothing."""
    ns, slash, dns_name = entry.partition("/")
    if not slash:
        return False  # istiod ignores an entry that is not namespace/dnsName
    if ns == ".":
        if namespace is None:
            return False
        ns = namespace
    if ns == "~" or (ns != "*" and ns != need.namespace):
        return False
    return dns_name_matches(dns_name, need.host)


def imports(listener: Listener, need: EgressNeed, namespace: str | None) -> bool:
    if listener.port_bound and listener.port != need.port:
        return False
    return any(entry_matches(entry, need, namespace) for entry in listener.hosts)


def route_listener(listeners: Sequence[Listener], port: int) -> Listener | None:
    """The listener whose hosts make the route table of ``port`` (istiod's ``GetEgressListenerForRDS``):
    the first one on that port, or the one without a port (Istio requires it last)."""
    for listener in listeners:
        if listener.port is None or (port != 0 and listener.port == port):
            return listener
    return None


# --- verdicts -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hidden:
    need: EgressNeed
    reason: str

    @property
    def target(self) -> str:
        return f"{self.need.namespace}/{self.need.host}:{self.need.port} ({self.need.why})"


@dataclass(frozen=True, slots=True)
class Fix:
    """Egress host entries to add: to ``spec.egress[listener].hosts``, or (None) in a new listener
    without a port at the end of ``spec.egress``."""

    listener: int | None
    entries: tuple[str, ...]

    def lines(self) -> list[str]:
        if self.listener is None:
            return ["append to spec.egress (a listener without port: it must be the last one):",
                    "  - hosts:", *(f"    - {entry}" for entry in self.entries)]
        return [f"add to spec.egress[{self.listener}].hosts:", *(f"  - {entry}" for entry in self.entries)]


@dataclass(frozen=True, slots=True)
class Verdict:
    """One Sidecar, as it applies to the workloads it governs (``governs``)."""

    namespace: str
    name: str
    governs: str
    hidden: tuple[Hidden, ...] = ()
    fixes: tuple[Fix, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.hidden

    @property
    def title(self) -> str:
        return f"{self.namespace}/{self.name} ({self.governs})"


@dataclass(frozen=True, slots=True)
class Report:
    verdicts: tuple[Verdict, ...]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)


def _hosts_summary(listeners: Sequence[Listener]) -> str:
    return "; ".join(f"{listener.label}: {', '.join(listener.hosts) or 'no hosts'}" for listener in listeners)


def _reason(need: EgressNeed, listeners: Sequence[Listener], namespace: str | None) -> str | None:
    """Why the need is hidden, or None when it is imported."""
    if need.vhost:
        # The filter patches the host's virtual host: the port's route table must have it.
        governing = route_listener(listeners, need.port)
        if governing is None:
            return (f"no egress listener makes the routes of port {need.port} (none on that port, none without a "
                    f"port), so its virtual host {need.host}:{need.port} does not exist")
        if imports(governing, need, namespace):
            return None
        hosts = ", ".join(governing.hosts) or "none"
        if governing.port is None:
            return f"{governing.label} does not import it (hosts: {hosts})"
        return (f"{governing.label} does not import it (hosts: {hosts}), and the listener on port {need.port} "
                f"alone makes that port's routes")
    if any(imports(listener, need, namespace) for listener in listeners):
        return None
    other_port = [listener for listener in listeners if listener.port_bound and listener.port != need.port
                  and any(entry_matches(e, need, namespace) for e in listener.hosts)]
    if other_port:
        return f"{other_port[0].label} lists it, but for port {other_port[0].port} only"
    return f"no egress listener imports it ({_hosts_summary(listeners)})"


def _fix_target(need: EgressNeed, listeners: Sequence[Listener]) -> int | None:
    if need.vhost:
        governing = route_listener(listeners, need.port)
        return None if governing is None else governing.index
    for fits in (lambda lst: lst.port is None, lambda lst: not lst.port_bound, lambda lst: lst.port == need.port):
        for listener in listeners:
            if fits(listener):
                return listener.index
    return None


def check_sidecar(sidecar: Mapping[str, Any], needs: Sequence[EgressNeed], namespace: str | None,
                  governs: str) -> Verdict:
    """The needs one Sidecar hides from the workloads it governs; ``namespace`` is what ``.`` means for
    them (None: not known, see ``entry_matches``)."""
    own_namespace, name = _metadata(sidecar)
    notes: list[str] = []
    mode = _mapping(_mapping(sidecar.get("spec")).get("outboundTrafficPolicy")).get("mode")
    if mode == "REGISTRY_ONLY":
        notes.append("outboundTrafficPolicy REGISTRY_ONLY: expected (every needed host is registered)")
    listeners = egress_listeners(sidecar)
    if listeners is None:
        notes.insert(0, "no egress listeners: it imports every host (restricts nothing)")
        return Verdict(own_namespace, name, governs, notes=tuple(notes))
    for listener in listeners:
        bad = [entry for entry in listener.hosts if "/" not in entry]
        if bad:
            notes.append(f"{listener.label}: {', '.join(bad)} not namespace/dnsName (istiod ignores it)")
    if namespace is None and any(entry.startswith("./") for listener in listeners for entry in listener.hosts):
        notes.append("./ entries mean each workload's own namespace: not counted here "
                     "(name the namespaces with --client-namespace to check them)")
    hidden: list[Hidden] = []
    targets: dict[int | None, list[str]] = {}
    for need in needs:
        reason = _reason(need, listeners, namespace)
        if reason is None:
            continue
        hidden.append(Hidden(need, reason))
        entries = targets.setdefault(_fix_target(need, listeners), [])
        if need.entry not in entries:
            entries.append(need.entry)
    fixes = tuple(Fix(index, tuple(entries)) for index, entries in targets.items())
    return Verdict(own_namespace, name, governs, tuple(hidden), fixes, tuple(notes))


def check_sidecars(sidecars: Sequence[Mapping[str, Any]], needs: Sequence[EgressNeed],
                   namespaces: Sequence[str] = (), root_namespace: str = ROOT_NAMESPACE) -> Report:
    """Each Sidecar checked on its own, for the workloads Istio applies it to.

    ``namespaces``: where opted-in workloads run (optional). Those without a namespace-wide Sidecar
    of their own rely on the root namespace's (checked for each of them), or on none (a note)."""
    namespace_wide: dict[str, list[str]] = {}
    for sidecar in sidecars:
        if not _selector(sidecar):
            namespace, name = _metadata(sidecar)
            namespace_wide.setdefault(namespace, []).append(name)
    notes = [f"{namespace} has {len(names)} Sidecars without workloadSelector ({', '.join(names)}): Istio's "
             f"choice between them is undefined; keep one" for namespace, names in namespace_wide.items()
             if len(names) > 1]
    relying: list[str] = [ns for ns in dict.fromkeys(namespaces) if ns not in namespace_wide]
    # The root namespace's default Sidecar is checked for each namespace relying on it, or for None:
    # "namespaces without a Sidecar of their own", whose names are not known.
    clients: list[str | None] = [*relying] or [None]
    verdicts: list[Verdict] = []
    for sidecar in sidecars:
        namespace, name = _metadata(sidecar)
        selector = _selector(sidecar)
        if selector:
            labels = ",".join(f"{k}={v}" for k, v in selector)
            if namespace in namespace_wide:
                instead = f"{namespace}/{namespace_wide[namespace][0]}"
            elif namespace != root_namespace and root_namespace in namespace_wide:
                instead = f"the mesh default {root_namespace}/{namespace_wide[root_namespace][0]}"
            else:
                instead = "no Sidecar"
            verdict = check_sidecar(sidecar, needs, namespace, f"selector {labels}")
            verdicts.append(_with_note(verdict, f"the pods it selects in {namespace} use it instead of {instead}"))
        elif namespace == root_namespace:
            for client in clients:
                governs = (f"mesh default, for {client}" if client is not None
                           else "mesh default: namespaces without a Sidecar of their own")
                verdicts.append(check_sidecar(sidecar, needs, client, governs))
        else:
            verdicts.append(check_sidecar(sidecar, needs, namespace, "namespace-wide"))
    root_default = namespace_wide.get(root_namespace)
    for client in relying:
        if root_default:
            notes.append(f"{client} has no Sidecar of its own: it relies on the mesh default "
                         f"{root_namespace}/{root_default[0]}")
        else:
            notes.append(f"{client} has no Sidecar of its own and there is no mesh default in {root_namespace}: "
                         f"nothing restricts its egress")
    return Report(tuple(verdicts), tuple(notes))


def _with_note(verdict: Verdict, note: str) -> Verdict:
    return Verdict(verdict.namespace, verdict.name, verdict.governs, verdict.hidden, verdict.fixes,
                   (*verdict.notes, note))


# --- output ---------------------------------------------------------------------------------------------------------


def format_needs(needs: Sequence[EgressNeed]) -> str:
    return "".join(["hosts opted-in workloads need visible:\n",
                    *(f"  {n.namespace}/{n.host}:{n.port} ({n.why})\n" for n in needs)])


def format_report(report: Report) -> str:
    """One block per Sidecar: ``ok``, or each hidden ``namespace/host:port (why)`` and the entries to add."""
    lines: list[str] = []
    for verdict in report.verdicts:
        if verdict.ok:
            lines.append(f"{verdict.title}: ok")
        else:
            lines.append(f"{verdict.title}: hides {len(verdict.hidden)} needed host(s)")
            for hidden in verdict.hidden:
                lines.append(f"  missing {hidden.target}: {hidden.reason}")
            for fix in verdict.fixes:
                lines.extend(f"  {line}" for line in ["fix: " + fix.lines()[0], *fix.lines()[1:]])
        lines.extend(f"  note: {note}" for note in verdict.notes)
    lines.extend(f"note: {note}" for note in report.notes)
    if not report.verdicts:
        lines.append("no Sidecar resources: nothing restricts egress")
    bad = sum(not v.ok for v in report.verdicts)
    if bad:
        lines.append(f"{bad} of {len(report.verdicts)} hide needed hosts: AI calls from their workloads fail until "
                     f"the entries are added (processor hidden: 500 cluster_not_available; a provider or the "
                     f"gateway hidden: no route to it)")
    return "\n".join(lines) + "\n"
