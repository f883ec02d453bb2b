"""Trust boundaries, attacked the way an application pod could, through real Envoys wired like Istio's.

The application shares its sidecar's network namespace and so its mTLS identity: it can open an
ext_proc stream to the processor's port itself, present what it got at the egress gateway, or
replay what it saw. Here the test holds the workload certificates an app would (SPIFFE URI SANs from
a CA the test makes) and tries each of those against:

- the processor behind its own sidecar (mTLS required, x-forwarded-client-cert set as Istio does),
  run with ``--peer-identity xfcc --credentials-listen``;
- a client sidecar (our bootstrap, mTLS to the processor's sidecar and to the gateway);
- an egress-gateway-shaped Envoy with the credential filter, in front of the mock providers.
"""

from __future__ import annotations

import base64
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import openai
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from devtools.launch import LaunchError, Managed, find_envoy, free_port, start_mock_provider, start_processor
from extproc.base.tokens import Signer
from extproc.base.wire import METADATA_NAMESPACE, SETTLE_KEY
from extproc.core.identity import ATTR_APP, ATTR_NAMESPACE, ATTR_SERVICE_ACCOUNT
from extproc.envoy_config.bootstrap import SidecarSpec, Upstream, render_bootstrap
from extproc.server.protocol import ATTRIBUTES_KEY
from tests.conftest import missing
from tests.istio.mtls import (
    PROCESSOR_HOST,
    Identity,
    Pki,
    egress_gateway,
    processor_sidecar,
    start_envoy_config,
    to_sidecar_of,
)

pytestmark = pytest.mark.e2e
OPENAI_KEY, ANTHROPIC_KEY = "sk-mesh-openai-secret", "sk-ant-mesh-secret"
POLICY = """\
mesh:
  credential_injection: gateway
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_API_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_API_KEY}}
---
service: order-service
namespace: demo
ai_proxy:
  models:
  - {name: chat, provider: openai, model: gpt-4}
---
service: product-service
namespace: demo
ai_proxy:
  limits: {tokens: 50000/min}
  models:
  - {name: gpt-4, provider: openai, model: gpt-4, cache_ttl: 3600s}
"""
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}


@dataclass
class Mesh:
    pki: Pki
    order: Identity
    product: Identity
    decision_port: int  # the processor's sidecar, inbound to the decision port
    gateway_port: int
    sidecar_port: int  # order-service's sidecar
    admin_port: int
    mock_port: int
    processor_port: int  # the processor itself, behind its sidecar
    parts: list[Managed]

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.admin_port}/metrics").text

    def refused(self, kind: str) -> float:
        for line in self.metrics().splitlines():
            if line.startswith(f'ai_extproc_tokens_refused_total{{kind="{kind}"}}'):
                return float(line.split()[-1])
        return 0.0

    def mock_requests(self) -> list[dict[str, object]]:
        return list(httpx.get(f"http://127.0.0.1:{self.mock_port}/_mock/requests").json())


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    try:
        find_envoy()
    except LaunchError as exc:
        missing(str(exc))
    work = tmp_path_factory.mktemp("trust")
    pki = Pki(work)
    policies = work / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(POLICY)
    parts: list[Managed] = []
    try:
        openai_port, anthropic_port = free_port(), free_port()
        parts.append(start_mock_provider(openai_port, ["--openai-key", OPENAI_KEY], "openai", work))
        parts.append(start_mock_provider(anthropic_port, ["--anthropic-key", ANTHROPIC_KEY], "anthropic", work))
        processor_port, credentials_port, admin_port = free_port(), free_port(), free_port()
        parts.append(start_processor(
            [policies], processor_port, env={"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY},
            log_dir=work, extra_args=["--peer-identity", "xfcc", "--credentials-listen",
                                      f"127.0.0.1:{credentials_port}", "--admin", f"127.0.0.1:{admin_port}"]))
        decision_in, credentials_in = free_port(), free_port()
        parts.append(start_envoy_config("processor-sidecar", processor_sidecar(
            admin_port=free_port(), identity=pki.issue("ai-system", "ai-extproc", (PROCESSOR_HOST,)),
            ports={"decision": (decision_in, processor_port, True),
                   "credentials": (credentials_in, credentials_port, True)}), decision_in, free_port(), work))
        gateway_port = free_port()
        parts.append(start_envoy_config("ai-egress", egress_gateway(
            listen_port=gateway_port, admin_port=free_port(), identity=pki.issue("ai-system", "ai-egress"),
            credential_port=credentials_in,
            providers={"api.openai.com": openai_port, "api.anthropic.com": anthropic_port}),
            gateway_port, free_port(), work))
        order = pki.issue("demo", "order-service")
        sidecar_port, sidecar_admin = free_port(), free_port()
        spec = SidecarSpec(service="order-service", namespace="demo", listen_port=sidecar_port,
                           admin_port=sidecar_admin, processor=("127.0.0.1", decision_in),
                           upstreams=(Upstream("api.openai.com", 80, "127.0.0.1", gateway_port),
                                      Upstream("api.anthropic.com", 80, "127.0.0.1", gateway_port)))
        bootstrap = to_sidecar_of(render_bootstrap(spec), order, processor="ai-extproc",
                                  providers=("outbound|80||api.openai.com", "outbound|80||api.anthropic.com"))
        parts.append(start_envoy_config("order-service", bootstrap, sidecar_port, sidecar_admin, work))
        yield Mesh(pki, order, pki.issue("demo", "product-service"), decision_in, gateway_port, sidecar_port,
                   admin_port, openai_port, processor_port, parts)
    finally:
        for part in reversed(parts):
            part.stop()


# --- a direct ext_proc client: what an application can do with its sidecar's identity ----------------------


def decision_stub(mesh: Mesh, identity: Identity) -> pb_grpc.ExternalProcessorStub:
    credentials = grpc.ssl_channel_credentials(identity.ca.read_bytes(), identity.key.read_bytes(),
                                               identity.cert.read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{mesh.decision_port}", credentials,
                                  options=[("grpc.ssl_target_name_override", PROCESSOR_HOST)])
    return pb_grpc.ExternalProcessorStub(channel)


def claim(app: str, namespace: str = "demo", account: str | None = None) -> struct_pb2.Struct:
    fields = struct_pb2.Struct()
    fields.update({ATTR_APP: app, ATTR_NAMESPACE: namespace, **({ATTR_SERVICE_ACCOUNT: account} if account else {})})
    return fields


def decide_directly(mesh: Mesh, identity: Identity, attributes: struct_pb2.Struct, body: bytes
                    ) -> list[pb.ProcessingResponse]:
    headers = [(":method", "POST"), (":path", "/v1/chat/completions"), (":authority", "api.openai.com"),
               ("content-type", "application/json"), ("content-length", str(len(body)))]
    first = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers])))
    first.attributes[ATTRIBUTES_KEY].CopyFrom(attributes)
    messages = [first, pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))]
    return list(decision_stub(mesh, identity).Process(iter(messages), timeout=10))


def set_headers(response: pb.ProcessingResponse) -> dict[str, str]:
    mutation = response.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def test_a_call_gets_its_key_only_at_the_gateway(mesh: Mesh) -> None:
    before = len(mesh.mock_requests())
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{mesh.sidecar_port}/v1", api_key="app-key", max_retries=0)
    completion = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hello"}])
    assert completion.choices[0].message.content == "mock reply from gpt-4: hello"
    sent = mesh.mock_requests()[before:]
    assert len(sent) == 1
    headers = sent[0]["headers"]
    assert isinstance(headers, dict)
    assert headers["authorization"] == f"Bearer {OPENAI_KEY}"  # added by the gateway
    assert "x-ai-grant" not in headers  # the grant is taken off where the key goes on


def identity_refusals(mesh: Mesh) -> float:
    for line in mesh.metrics().splitlines():
        if line.startswith('ai_extproc_identity_refusals_total{reason="mismatch"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_direct_client_claiming_another_service_is_refused(mesh: Mesh) -> None:
    before = identity_refusals(mesh)
    for attributes in (claim("product-service"),  # another service, same namespace
                       claim("order-service", namespace="shop"),  # itself, in another namespace
                       claim("order-service", account="product-service")):  # itself, with another account
        (answer,) = decide_directly(mesh, mesh.order, attributes, orjson.dumps({**CHAT, "model": "gpt-4"}))
        assert answer.HasField("immediate_response"), answer
        assert answer.immediate_response.status.code == 403
        error = orjson.loads(answer.immediate_response.body)["error"]
        assert error["code"] == "identity_mismatch"
        assert "spiffe://cluster.local/ns/demo/sa/order-service" in error["message"]
    assert identity_refusals(mesh) == before + 3  # each counted (and logged)


def gateway_client(identity: Identity) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(identity.ca))
    context.check_hostname = False  # the gateway's certificate names its SPIFFE identity, not 127.0.0.1
    context.load_cert_chain(str(identity.cert), str(identity.key))
    return httpx.Client(verify=context, timeout=10)


def redeem(mesh: Mesh, identity: Identity, grant: str, body: bytes, path: str = "/v1/chat/completions"
           ) -> httpx.Response:
    with gateway_client(identity) as client:
        return client.post(f"https://127.0.0.1:{mesh.gateway_port}{path}", content=body,
                           headers={"host": "api.openai.com", "content-type": "application/json",
                                    "x-ai-grant": grant})


def test_a_direct_client_gets_a_grant_but_never_a_key(mesh: Mesh) -> None:
    body = orjson.dumps(CHAT)
    responses = decide_directly(mesh, mesh.order, claim("order-service"), body)
    headers = set_headers(responses[0])
    assert "x-ai-grant" in headers
    everything = b"".join(r.SerializeToString() for r in responses)
    assert OPENAI_KEY.encode() not in everything and ANTHROPIC_KEY.encode() not in everything
    assert "authorization" not in headers and "x-api-key" not in headers
    forwarded = responses[1].request_body.response.body_mutation.body or body  # rewritten: model gpt-4
    grant = headers["x-ai-grant"]
    # The grant buys exactly this call: not another body, not for another workload, and only once.
    wrong_body = redeem(mesh, mesh.order, grant, forwarded.replace(b"hello", b"something else"))
    assert wrong_body.status_code == 403 and wrong_body.json()["error"]["code"] == "grant_wrong_body"
    other_path = redeem(mesh, mesh.order, grant, forwarded, "/v1/embeddings")
    assert other_path.status_code == 403 and other_path.json()["error"]["code"] == "grant_wrong_request"
    other_caller = redeem(mesh, mesh.product, grant, forwarded)
    assert other_caller.status_code == 403 and other_caller.json()["error"]["code"] == "grant_wrong_caller"
    used = redeem(mesh, mesh.order, grant, forwarded)
    assert used.status_code == 200, used.text  # the call the policy decided, nothing more
    replayed = redeem(mesh, mesh.order, grant, forwarded)
    assert replayed.status_code == 403 and replayed.json()["error"]["code"] == "grant_replayed"
    forged = redeem(mesh, mesh.order, grant[:-4] + "AAAA", forwarded)
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "grant_invalid"
    no_grant = redeem(mesh, mesh.order, "", forwarded)
    assert no_grant.status_code == 403


def forged_usage_stream(mesh: Mesh, identity: Identity, settle: str, body: bytes) -> list[pb.ProcessingResponse]:
    headers = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":status", raw_value=b"200"),
        base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")])), observability_mode=True)
    headers.metadata_context.filter_metadata[METADATA_NAMESPACE].update({SETTLE_KEY: settle})
    messages = [headers, pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=True),
                                              observability_mode=True)]
    return list(decision_stub(mesh, identity).Process(iter(messages), timeout=10))


def used(mesh: Mesh) -> int:
    limits = httpx.get(f"http://127.0.0.1:{mesh.admin_port}/quota").json()["limits"]
    return sum(int(line["used"]) for line in limits if line["service"] == "demo/product-service")


def cache_stores(mesh: Mesh) -> int:
    return int(httpx.get(f"http://127.0.0.1:{mesh.admin_port}/cache").json()["stats"]["stores"])


def wait_refused(mesh: Mesh, count: float) -> None:
    deadline = time.monotonic() + 5
    while mesh.refused("settlement") < count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mesh.refused("settlement") == count


ANSWER = orjson.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "gpt-4", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "attacker content"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})


def test_forged_and_replayed_settlements_touch_no_quota_and_no_cache(mesh: Mesh) -> None:
    # product-service's own call, decided as its sidecar would have it: tokens reserved, a cache fill planned.
    body = orjson.dumps({"model": "gpt-4", "max_tokens": 1000, "temperature": 0,
                         "messages": [{"role": "user", "content": "recommend"}]})
    decided = decide_directly(mesh, mesh.product, claim("product-service"), body)
    sealed = decided[0].dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields[SETTLE_KEY].string_value
    reserved, stores, refused = used(mesh), cache_stores(mesh), mesh.refused("settlement")
    assert reserved > 1000
    # Forged: the genuine record (readable, it is only signed) with the reservation made negative, re-signed
    # with a key that is not the processors'.
    payload = sealed.split(".")[1]
    record = orjson.loads(orjson.loads(base64.urlsafe_b64decode(payload + "=="))["si"])
    reservation = orjson.loads(record["r"])
    reservation[3] = [-40_000 for _ in reservation[3]]
    record["r"] = orjson.dumps(reservation).decode()
    forged = Signer(b"not-the-processors-key-0123456789").sign({"si": orjson.dumps(record).decode()}, 600)
    forged_usage_stream(mesh, mesh.product, forged, ANSWER)
    unsigned = orjson.dumps(record).decode()  # and what used to be accepted: the record in the clear
    forged_usage_stream(mesh, mesh.product, unsigned, ANSWER)
    wait_refused(mesh, refused + 2)
    assert used(mesh) == reserved and cache_stores(mesh) == stores
    # Genuine, from the caller's namespace: settled once (the real usage replaces the reservation)...
    forged_usage_stream(mesh, mesh.product, sealed, ANSWER)
    deadline = time.monotonic() + 5
    while used(mesh) == reserved and time.monotonic() < deadline:
        time.sleep(0.1)
    settled = used(mesh)
    assert settled < reserved
    # ...and never twice: a replay is refused and changes nothing.
    stores = cache_stores(mesh)
    forged_usage_stream(mesh, mesh.product, sealed, ANSWER)
    wait_refused(mesh, refused + 3)
    assert used(mesh) == settled and cache_stores(mesh) == stores


def test_a_request_without_a_verified_peer_is_refused(mesh: Mesh) -> None:
    """Straight to the processor's own port, around its sidecar (what a NetworkPolicy also stops): no XFCC."""
    port = mesh.processor_port
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    body = orjson.dumps(CHAT)
    first = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in (
            (":method", "POST"), (":path", "/v1/chat/completions"), ("content-type", "application/json"))])))
    first.attributes[ATTRIBUTES_KEY].CopyFrom(claim("order-service"))
    answers = list(pb_grpc.ExternalProcessorStub(channel).Process(iter([
        first, pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))]), timeout=10))
    assert answers[0].HasField("immediate_response")
    assert orjson.loads(answers[0].immediate_response.body)["error"]["code"] == "unverified_caller"
