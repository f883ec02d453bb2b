"""Real Envoys wired the way Istio wires a mesh, with certificates this test makes.

- A CA, and workload certificates whose URI SAN is the SPIFFE identity Istio gives a pod
  (``spiffe://cluster.local/ns/<namespace>/sa/<service account>``).
- The processor's sidecar: inbound mTLS listeners that require a client certificate, replace
  ``x-forwarded-client-cert`` with the peer's URI (Istio's SANITIZE_SET) and forward to the processor.
- A client sidecar (our standard bootstrap) whose processor cluster and provider clusters speak mTLS
  with the client's certificate: to the processor's sidecar, and to the egress gateway.
- An egress-gateway-shaped Envoy: mTLS from sidecars, our credential filter, routes to the providers.

Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devtools.launch import Managed, find_envoy
from extproc.envoy_config.bootstrap import to_yaml
from extproc.envoy_config.filter import credential_filter

TRUST_DOMAIN = "cluster.local"
PROCESSOR_HOST = "ai-extproc.ai-system.svc.cluster.local"


def spiffe(namespace: str, account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{account}"


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path
    ca: Path


class Pki:
    """A mesh CA (Istio's would be istiod's) and the workload certificates it signs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test mesh CA")])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                      .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                      .not_valid_before(now - datetime.timedelta(minutes=5))
                      .not_valid_after(now + datetime.timedelta(days=1))
                      .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                      .sign(self._key, hashes.SHA256()))
        self.ca = directory / "ca.pem"
        self.ca.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, namespace: str, account: str, dns: tuple[str, ...] = ()) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe(namespace, account)),
                                         *(x509.DNSName(d) for d in dns)]
        cert = (x509.CertificateBuilder().subject_name(x509.Name([]))
                .issuer_name(self._cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(hours=2))
                .add_extension(x509.SubjectAlternativeName(names), critical=True)
                .sign(self._key, hashes.SHA256()))
        stem = self.directory / f"{namespace}-{account}"
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return Identity(cert_path, key_path, self.ca)


def _certificates(identity: Identity) -> dict[str, Any]:
    return {"tls_certificates": [{"certificate_chain": {"filename": str(identity.cert)},
                                  "private_key": {"filename": str(identity.key)}}],
            "validation_context": {"trusted_ca": {"filename": str(identity.ca)}}}


def upstream_mtls(identity: Identity, sni: str, alpn: tuple[str, ...] = ()) -> dict[str, Any]:
    context: dict[str, Any] = {"common_tls_context": _certificates(identity), "sni": sni}
    if alpn:
        context["common_tls_context"]["alpn_protocols"] = list(alpn)
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", **context}}


def downstream_mtls(identity: Identity) -> dict[str, Any]:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {**_certificates(identity), "alpn_protocols": ["h2", "http/1.1"]}}}


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _cluster(name: str, port: int, *, http2: bool, transport: dict[str, Any] | None = None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _address(port)}}]}]},
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    if transport is not None:
        cluster["transport_socket"] = transport
    return cluster


def _hcm(stat: str, routes: list[dict[str, Any]], filters: list[dict[str, Any]], *, xfcc: bool) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": stat,
        "codec_type": "AUTO",
        "route_config": {"name": stat, "virtual_hosts": routes},
        "http_filters": [*filters, {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    if xfcc:
        # As Istio's inbound sidecar: whatever the client sent is replaced by what its certificate says.
        hcm["forward_client_cert_details"] = "SANITIZE_SET"
        hcm["set_current_client_cert_details"] = {"uri": True}
    return hcm


def processor_sidecar(*, admin_port: int, identity: Identity, ports: dict[str, tuple[int, int, bool]]
                      ) -> dict[str, Any]:
    """Inbound listeners ``name → (listen port, processor port, http2)``, mTLS required, XFCC set."""
    listeners, clusters = [], []
    for name, (listen, target, http2) in ports.items():
        cluster = f"inbound|{target}||"
        clusters.append(_cluster(cluster, target, http2=http2))
        routes = [{"name": "inbound", "domains": ["*"],
                   "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}]}]
        listeners.append({
            "name": f"inbound_{name}", "address": _address(listen), "enable_reuse_port": False,
            "filter_chains": [{"transport_socket": downstream_mtls(identity), "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": _hcm(f"inbound_{name}", routes, [], xfcc=True)}]}],
        })
    return {"admin": {"address": _address(admin_port)},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


def egress_gateway(*, listen_port: int, admin_port: int, identity: Identity, credential_port: int,
                   providers: dict[str, int]) -> dict[str, Any]:
    """mTLS from sidecars; the credential filter (the one the Istio EnvoyFilter renders); providers by host."""
    credentials_cluster = f"outbound|50053||{PROCESSOR_HOST}"
    routes = [{"name": host, "domains": [host, f"{host}:*"],
               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": f"provider|{host}", "timeout": "60s"}}]}
              for host in providers]
    hcm = _hcm("ai_egress", routes, [credential_filter(cluster_name=credentials_cluster, authority=PROCESSOR_HOST)],
               xfcc=False)
    hcm["access_log"] = [{"name": "envoy.access_loggers.stdout", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
        "log_format": {"json_format": {"authority": "%REQ(:AUTHORITY)%", "status": "%RESPONSE_CODE%",
                                       "details": "%RESPONSE_CODE_DETAILS%",
                                       "peer": "%DOWNSTREAM_PEER_URI_SAN%"}}}}]
    clusters = [_cluster(credentials_cluster, credential_port, http2=True,
                         transport=upstream_mtls(identity, PROCESSOR_HOST, ("h2",))),
                *(_cluster(f"provider|{host}", port, http2=False) for host, port in providers.items())]
    return {"admin": {"address": _address(admin_port)},
            "static_resources": {"listeners": [{
                "name": "ai_egress", "address": _address(listen_port), "enable_reuse_port": False,
                "filter_chains": [{"transport_socket": downstream_mtls(identity), "filters": [{
                    "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
                "clusters": clusters}}


def to_sidecar_of(bootstrap: dict[str, Any], identity: Identity, *, processor: str,
                  providers: tuple[str, ...]) -> dict[str, Any]:
    """A client bootstrap's processor and provider clusters speaking mTLS with the workload's certificate."""
    for cluster in bootstrap["static_resources"]["clusters"]:
        if cluster["name"] == processor:
            cluster["transport_socket"] = upstream_mtls(identity, PROCESSOR_HOST, ("h2",))
        elif cluster["name"] in providers:
            cluster["transport_socket"] = upstream_mtls(identity, cluster["name"].rsplit("|", 1)[-1])
    return bootstrap


def start_envoy_config(name: str, config: dict[str, Any], listen_port: int, admin_port: int,
                       log_dir: Path | None = None) -> Managed:
    directory = log_dir or Path(tempfile.mkdtemp(prefix="extproc-mesh-"))
    path = directory / f"envoy-{name}.yaml"
    path.write_text(to_yaml(config))
    return Managed(f"envoy-{name}", [find_envoy(), "-c", str(path), "--log-level", "warn", "--concurrency", "1",
                                     "--base-id", str(admin_port)], log_dir=directory).start_listening(listen_port, 20)
