"""The caller's mTLS identity from x-forwarded-client-cert, and binding the claimed caller to it."""

from __future__ import annotations

import pytest

from extproc.core.identity import Caller, bind_to_peer
from extproc.core.peer import Peer, from_spiffe_id, from_xfcc

ORDER = Peer("cluster.local", "demo", "order-service")


@pytest.mark.parametrize(("header", "expected"), [
    ("URI=spiffe://cluster.local/ns/demo/sa/order-service", ORDER),
    ('By=spiffe://cluster.local/ns/ai-system/sa/ai-extproc;Hash=ab12;Subject="";'
     "URI=spiffe://cluster.local/ns/demo/sa/order-service", ORDER),
    # APPEND_FORWARD: what a client sent comes first, our sidecar's element last; only the last counts.
    ("URI=spiffe://cluster.local/ns/demo/sa/product-service,"
     "By=spiffe://cluster.local/ns/ai-system/sa/ai-extproc;URI=spiffe://cluster.local/ns/demo/sa/order-service", ORDER),
    ('Subject="CN=a,O=b";URI=spiffe://example.org/ns/x/sa/y', Peer("example.org", "x", "y")),
    ("URI=spiffe://cluster.local/ns/demo/sa/order-service,URI=", None),  # the last element names no one
    ("URI=https://example.com/ns/demo/sa/x", None),
    ("URI=spiffe://cluster.local/ns/demo", None),
    ("URI=spiffe://cluster.local/ns//sa/x", None),
    ("", None),
    ("garbage", None),
])
def test_xfcc_yields_the_immediate_peer(header: str, expected: Peer | None) -> None:
    assert from_xfcc(header) == expected


def test_spiffe_round_trip() -> None:
    assert from_spiffe_id(ORDER.spiffe_id) == ORDER
    assert from_spiffe_id("spiffe://cluster.local/ns/demo/sa/order-service/extra") is None


def node(service: str | None, namespace: str | None = "demo", account: str | None = None) -> Caller:
    return Caller(service, namespace, account, "node")


def test_a_caller_acting_as_itself_is_bound_to_its_peer() -> None:
    bound = bind_to_peer(node("order-service"), ORDER, None)
    assert bound == Caller("order-service", "demo", "order-service", "node")
    assert bind_to_peer(node("order-service", None), ORDER, None) == bound  # metadata may leave a field out


@pytest.mark.parametrize(("caller", "accounts", "why"), [
    (node("product-service"), None, "may not act as demo/product-service"),
    (node("order-service", "shop"), None, "claims namespace 'shop'"),
    (node("order-service", account="admin"), None, "claims service account 'admin'"),
    (node("order-service"), ("order-svc-v2",), "allows order-svc-v2"),
    (node("order-service"), ("other-ns/order-service",), "allows other-ns/order-service"),
    (node(None), None, "may not act as demo/unidentified"),
])
def test_a_claim_that_contradicts_the_peer_is_refused(caller: Caller, accounts: tuple[str, ...] | None,
                                                      why: str) -> None:
    refused = bind_to_peer(caller, ORDER, accounts)
    assert isinstance(refused, str) and why in refused
    assert ORDER.spiffe_id in refused or "claims" in refused


def test_a_policy_may_name_other_accounts_for_its_service() -> None:
    shared = Peer("cluster.local", "demo", "shop-backend")
    assert not isinstance(bind_to_peer(node("order-service", account="shop-backend"), shared,
                                       ("shop-backend",)), str)
    assert not isinstance(bind_to_peer(node("order-service", account="shop-backend"), shared,
                                       ("demo/shop-backend",)), str)
    gateway = Peer("cluster.local", "gateways", "api-gateway")  # a trusted-header caller from elsewhere
    header = Caller("order-service", "demo", None, "header")
    assert not isinstance(bind_to_peer(header, gateway, ("gateways/api-gateway",)), str)
    assert isinstance(bind_to_peer(header, gateway, ("api-gateway",)), str)  # a bare name is the service's namespace
