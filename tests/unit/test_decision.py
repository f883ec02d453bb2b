"""The decision core without gRPC: identify → resolve policy → route → mutations, and every refusal."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import orjson
import pytest

from extproc.cache.entry import CacheEntry
from extproc.cache.store import ResponseCache
from extproc.core.credentials import CredentialStore
from extproc.core.decision import Decider, Exchange, Forward, HttpRequest, LocalReply
from extproc.core.identity import ATTR_APP, ATTR_NAMESPACE, ATTR_WORKLOAD
from extproc.core.paths import ProviderCall
from extproc.core.routing import choose_target
from extproc.core.runtime import Runtime
from extproc.policy.loader import load_policy
from extproc.policy.model import CacheSettings, QuotaSettings
from extproc.quota.engine import QuotaEngine

POLICY = """\
mesh:
  unknown_paths: {unknown_paths}
  unknown_service: {unknown_service}
  max_body_bytes: 2048
  identity: {{trust_header: {trust}}}
  default_policy:
    models:
    - {{name: small, provider: openai, model: gpt-4o-mini}}
providers:
- {{name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {{env: OPENAI_KEY}}}}
- {{name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {{env: ANTHROPIC_KEY}}}}
- {{name: local, api: openai, base_url: http://vllm.models.svc.cluster.local:8000/serving/v1}}
---
service: order-service
ai_proxy:
  models:
  - {{name: fraud_detector, provider: claude, model: claude-3, timeout: 2000ms}}
  - {{name: summariser, provider: openai, model: gpt-4}}
  - {{name: local_llm, provider: local, model: llama-3-8b}}
---
service: product-service
ai_proxy:
  models:
  - name: recommendation_engine
    provider: openai
    model: gpt-4-turbo
    sticky_header: x-user-id
    variants:
    - {{name: control, weight: 80}}
    - {{name: candidate, weight: 20, model: gpt-4o}}
"""

ENV = {"OPENAI_KEY": "sk-openai", "ANTHROPIC_KEY": "sk-ant"}


def make_decider(tmp_path: Path, *, unknown_paths: str = "pass", unknown_service: str = "deny",
                 trust: str = "false", env: dict[str, str] | None = None) -> Decider:
    (tmp_path / "policy.yaml").write_text(
        POLICY.format(unknown_paths=unknown_paths, unknown_service=unknown_service, trust=trust))
    policy = load_policy([tmp_path])
    return Decider(Runtime(lambda: policy, CredentialStore(environ=ENV if env is None else env),
                           QuotaEngine(QuotaSettings()), ResponseCache(CacheSettings())))


def request(path: str = "/v1/chat/completions", *, service: str | None = "order-service", method: str = "POST",
            headers: dict[str, str] | None = None) -> HttpRequest:
    attributes: dict[str, object] = {ATTR_NAMESPACE: "shop", ATTR_WORKLOAD: "order-service-v1"}
    if service:
        attributes[ATTR_APP] = service
    return HttpRequest(method, path, "127.0.0.1:10000",
                       {"content-type": "application/json", **(headers or {})}, attributes)


def settle_json(decider: Decider, decision: Forward | LocalReply) -> dict[str, object]:
    """The settlement the decision sealed into the call's metadata, opened with the processor's key."""
    assert isinstance(decision, Forward)
    sealed = decider.runtime.signer.verify(decision.metadata["settle"])
    assert sealed is not None, "the settlement is not sealed with the processor's key"
    return dict(orjson.loads(str(sealed["si"])))


def decide(decider: Decider, body: object, **kwargs: object) -> Forward | LocalReply:
    result = decider.on_headers(request(**kwargs), end_of_stream=False)  # type: ignore[arg-type]
    if not isinstance(result, Exchange):
        return result
    return asyncio.run(result.on_body(body if isinstance(body, bytes) else orjson.dumps(body)))


def error_of(decision: Forward | LocalReply) -> tuple[int, dict[str, object]]:
    assert isinstance(decision, LocalReply), decision
    return decision.status, orjson.loads(decision.body)


def headers_of(decision: Forward | LocalReply) -> dict[str, str]:
    assert isinstance(decision, Forward), decision
    return dict(decision.set_headers)


def test_logical_name_routes_to_provider_with_rewrites(tmp_path: Path) -> None:
    decision = decide(make_decider(tmp_path), {"model": "fraud_detector", "max_tokens": 5, "messages": []},
                      path="/v1/messages?beta=true", headers={"authorization": "Bearer app-key"})
    headers = headers_of(decision)
    assert headers[":authority"] == "api.anthropic.com"
    assert headers[":path"] == "/v1/messages?beta=true"
    assert headers["x-api-key"] == "sk-ant"
    assert headers["anthropic-version"] == "2023-06-01"
    # The model's timeout is the whole call's budget: what is left of it when the forward is built.
    assert 1900 <= int(headers["x-envoy-upstream-rq-timeout-ms"]) <= 2000
    assert isinstance(decision, Forward)
    assert "authorization" in decision.remove_headers  # the app's own key never reaches the provider
    assert decision.body is not None and orjson.loads(decision.body)["model"] == "claude-3"
    assert headers["content-length"] == str(len(decision.body))
    assert decision.metadata["provider"] == "claude" and decision.metadata["requested_model"] == "fraud_detector"


def test_upstream_model_name_is_allowed_and_body_untouched(tmp_path: Path) -> None:
    decision = decide(make_decider(tmp_path), {"model": "gpt-4", "messages": []})
    headers = headers_of(decision)
    assert headers["authorization"] == "Bearer sk-openai"
    assert "content-length" not in headers
    assert isinstance(decision, Forward) and decision.body is None
    assert decision.metadata["route"] == "summariser"


def test_in_mesh_provider_base_path_and_port_without_credential(tmp_path: Path) -> None:
    decision = decide(make_decider(tmp_path), {"model": "local_llm", "messages": []})
    headers = headers_of(decision)
    assert headers[":authority"] == "vllm.models.svc.cluster.local:8000"
    assert headers[":path"] == "/serving/v1/chat/completions"
    assert "authorization" not in headers


def test_anthropic_version_from_caller_is_kept(tmp_path: Path) -> None:
    decision = decide(make_decider(tmp_path), {"model": "claude-3", "max_tokens": 5, "messages": []},
                      path="/v1/messages", headers={"anthropic-version": "2024-01-01"})
    assert "anthropic-version" not in headers_of(decision)


def test_client_timeout_header_is_removed_without_policy_timeout(tmp_path: Path) -> None:
    decision = decide(make_decider(tmp_path), {"model": "gpt-4", "messages": []},
                      headers={"x-envoy-upstream-rq-timeout-ms": "999999"})
    assert isinstance(decision, Forward) and "x-envoy-upstream-rq-timeout-ms" in decision.remove_headers


def test_model_outside_policy_lists_allowed_models(tmp_path: Path) -> None:
    status, body = error_of(decide(make_decider(tmp_path), {"model": "gpt-4o", "messages": []}))
    assert status == 403
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"] == "model_not_allowed"
    assert "fraud_detector, summariser, local_llm" in str(error["message"])


def test_errors_use_the_callers_api_format(tmp_path: Path) -> None:
    status, body = error_of(decide(make_decider(tmp_path), {"model": "nope"}, path="/v1/messages"))
    assert status == 403
    assert body["type"] == "error"
    assert body["error"] == {"type": "permission_error", "message": body["error"]["message"]}  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"model": ', 400, "invalid_json"),
        (b'["model"]', 400, "invalid_json"),
        (b'{"messages": []}', 400, "missing_model"),
        (b'{"model": 7}', 400, "missing_model"),
        (b'{"model": "gpt-4", "x": "\xff\xfe"}', 400, "invalid_utf8"),
        (b'{"model": "gpt-4", "pad": "' + b"x" * 4000 + b'"}', 413, "request_too_large"),
    ],
)
def test_bad_bodies(tmp_path: Path, body: bytes, status: int, code: str) -> None:
    got_status, error = error_of(decide(make_decider(tmp_path), body))
    assert got_status == status
    assert error["error"]["code"] == code  # type: ignore[index]


def test_other_api_is_translated(tmp_path: Path) -> None:
    """An OpenAI-format call to a model an Anthropic provider serves goes out as an Anthropic request."""
    body = {"model": "fraud_detector", "max_tokens": 50, "stream": True,
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    decider = make_decider(tmp_path)
    forward = decide(decider, body)
    assert isinstance(forward, Forward) and forward.body is not None
    headers = dict(forward.set_headers)
    assert headers[":path"] == "/v1/messages" and headers["x-ai-usage"] == "translate"
    assert headers["x-api-key"] == ENV["ANTHROPIC_KEY"] and "authorization" in forward.remove_headers
    sent = orjson.loads(forward.body)
    assert sent == {"model": "claude-3", "system": "be brief", "max_tokens": 50, "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]}
    assert headers["content-length"] == str(len(forward.body))
    settle = settle_json(decider, forward)
    assert (settle["api"], settle["ca"]) == ("anthropic", "openai")


def test_untranslatable_call_is_explained(tmp_path: Path) -> None:
    status, body = error_of(decide(make_decider(tmp_path), {"model": "fraud_detector", "messages": []}))
    assert status == 400
    error = body["error"]  # type: ignore[index]
    assert error["code"] == "untranslatable_request"  # type: ignore[index]
    assert "served through the anthropic API" in error["message"]  # type: ignore[index]


def test_missing_credential_is_a_clear_503(tmp_path: Path) -> None:
    status, body = error_of(decide(make_decider(tmp_path, env={}), {"model": "gpt-4", "messages": []}))
    assert status == 503
    assert body["error"]["code"] == "credential_unavailable"  # type: ignore[index]
    assert "openai" in body["error"]["message"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"method": "GET"}, 405, "method"),
        ({"headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"service": None}, 403, "no_policy"),
        ({"service": "billing-service"}, 403, "no_policy"),
    ],
)
def test_header_time_refusals(tmp_path: Path, kwargs: dict[str, object], status: int, code: str) -> None:
    result = make_decider(tmp_path).on_headers(request(**kwargs), end_of_stream=False)  # type: ignore[arg-type]
    got_status, body = error_of(result)  # type: ignore[arg-type]
    assert (got_status, body["error"]["code"]) == (status, code)  # type: ignore[index]


def test_no_policy_names_the_caller(tmp_path: Path) -> None:
    result = make_decider(tmp_path).on_headers(request(service="billing-service"), end_of_stream=False)
    _, body = error_of(result)  # type: ignore[arg-type]
    assert "shop/billing-service has no AI policy" in body["error"]["message"]  # type: ignore[index]


def test_empty_body(tmp_path: Path) -> None:
    result = make_decider(tmp_path).on_headers(request(), end_of_stream=True)
    assert error_of(result)[0] == 400  # type: ignore[arg-type]


def test_default_policy_for_unknown_callers(tmp_path: Path) -> None:
    decider = make_decider(tmp_path, unknown_service="default")
    assert headers_of(decide(decider, {"model": "small"}, service="billing-service"))[":authority"] == "api.openai.com"
    # A caller with its own policy does not get the default one.
    assert error_of(decide(decider, {"model": "small"}))[0] == 403


def provider_call(decider: Decider, path: str, method: str = "GET", **kwargs: object) -> Forward | LocalReply:
    result = decider.on_headers(request(path, method=method, **kwargs), end_of_stream=method != "POST")  # type: ignore[arg-type]
    if isinstance(result, ProviderCall):
        return asyncio.run(result.decide())
    assert isinstance(result, Forward | LocalReply), result
    return result


def test_unknown_paths_are_denied_by_default_or_passed_when_the_mesh_says_so(tmp_path: Path) -> None:
    denied = make_decider(tmp_path, unknown_paths="deny")
    status, body = error_of(provider_call(denied, "/v1/files"))
    assert status == 403 and body["error"]["code"] == "path_not_allowed"  # type: ignore[index]
    assert "GET /v1/files is not an AI endpoint" in body["error"]["message"]  # type: ignore[index]
    assert "ai_proxy.allow_paths" in body["error"]["message"]  # type: ignore[index]
    status, body = error_of(provider_call(denied, "/v1/complete", "POST", headers={"anthropic-version": "1"}))
    assert status == 403 and body["type"] == "error"  # in the caller's (Anthropic) format
    passed = provider_call(make_decider(tmp_path), "/v1/files")  # unknown_paths: pass
    assert isinstance(passed, Forward) and passed.set_headers == () and not passed.clear_route_cache


@pytest.mark.parametrize(("path", "method", "authority", "sent"), [
    ("/v1/models", "GET", "api.anthropic.com", "/v1/models"),  # order-service's first provider is claude...
    ("/v1/responses/resp_123", "GET", "api.openai.com", "/v1/responses/resp_123"),  # ...its OpenAI one: openai
    ("/v1/responses/resp_123", "DELETE", "api.openai.com", "/v1/responses/resp_123"),
    ("/v1/responses/resp_1/input_items?limit=5", "GET", "api.openai.com", "/v1/responses/resp_1/input_items?limit=5"),
])
def test_provider_resources_go_to_the_services_provider_with_its_credential(
        tmp_path: Path, path: str, method: str, authority: str, sent: str) -> None:
    decider = make_decider(tmp_path, unknown_paths="deny")
    headers = {"anthropic-version": "2023-06-01"} if authority == "api.anthropic.com" else {}
    forward = provider_call(decider, path, method, headers=headers)
    assert isinstance(forward, Forward), forward
    got = dict(forward.set_headers)
    assert got[":authority"] == authority and got[":path"] == sent
    assert got.get("authorization") == "Bearer sk-openai" or got.get("x-api-key") == "sk-ant"
    # The app's own key never goes on: the header we set overwrites it, the other is removed.
    assert {"authorization", "x-api-key"} - set(got) <= set(forward.remove_headers)


def test_an_allowed_path_is_served_with_the_named_providers_credential(tmp_path: Path) -> None:
    decider = make_decider(tmp_path, unknown_paths="deny")
    policy = decider.runtime.policy()
    service = policy.for_caller("order-service", "shop")
    assert service is not None
    from extproc.policy.model import AllowedPath

    proxy = service.proxy.model_copy(update={"allow_paths": (
        AllowedPath(path="/v1/files/**", methods=("GET", "POST"), provider="openai"),)})
    object.__setattr__(service, "proxy", proxy)
    forward = provider_call(decider, "/v1/files/file-1/content")
    assert isinstance(forward, Forward)
    got = dict(forward.set_headers)
    assert (got[":authority"], got[":path"], got["authorization"]) == (
        "api.openai.com", "/v1/files/file-1/content", "Bearer sk-openai")
    status, body = error_of(provider_call(decider, "/v1/files/file-1", "DELETE"))  # not an allowed method
    assert status == 403 and body["error"]["code"] == "path_not_allowed"  # type: ignore[index]
    status, _ = error_of(provider_call(decider, "/v1/batches"))
    assert status == 403


def test_identity_header_is_stripped_and_ignored_unless_trusted(tmp_path: Path) -> None:
    spoof = {"x-ai-service": "product-service"}
    decision = decide(make_decider(tmp_path), {"model": "gpt-4", "messages": []}, headers=spoof)
    assert isinstance(decision, Forward) and "x-ai-service" in decision.remove_headers
    assert decision.metadata["service"] == "order-service"
    # product-service may not use gpt-4, so the spoof cannot borrow its policy either way.
    trusting = make_decider(tmp_path, trust="true")
    decision = decide(trusting, {"model": "recommendation_engine", "messages": []},
                      headers={"x-ai-service": "retail/product-service"})
    assert isinstance(decision, Forward)
    assert (decision.metadata["service"], decision.metadata["namespace"]) == ("product-service", "retail")


def test_sticky_split_is_stable_and_weighted(tmp_path: Path) -> None:
    decider = make_decider(tmp_path)
    body = {"model": "recommendation_engine", "messages": []}
    variants = {}
    for user in range(2000):
        decision = decide(decider, body, service="product-service", headers={"x-user-id": f"u{user}"})
        assert isinstance(decision, Forward)
        variants[user] = decision.metadata["variant"]
        if decision.metadata["variant"] == "candidate":
            assert decision.body is not None and orjson.loads(decision.body)["model"] == "gpt-4o"
    again = decide(decider, body, service="product-service", headers={"x-user-id": "u7"})
    assert isinstance(again, Forward) and again.metadata["variant"] == variants[7]
    share = Counter(variants.values())["candidate"] / len(variants)
    # 20% nominal; with n=2000 the standard deviation is 0.9%, so ±4% is a > 4-sigma bound.
    assert 0.16 < share < 0.24, share


def test_unsticky_split_draws_each_call(tmp_path: Path) -> None:
    make_decider(tmp_path)  # writes the policy file
    policy = load_policy([tmp_path])
    route = policy.for_caller("product-service", None).resolve("recommendation_engine")  # type: ignore[union-attr]
    assert route is not None
    rng = random.Random(1)
    picks = Counter(choose_target(route, policy.providers, {}, rng).variant for _ in range(5000))
    assert 0.77 < picks["control"] / 5000 < 0.83


QUOTA_POLICY = """\
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_KEY}}
---
service: order-service
ai_proxy:
  limits: {tokens: 1000/min}
  models:
  - {name: fraud_detector, provider: claude, model: claude-3, rate_limit: 2/min}
  - {name: chat, provider: openai, model: gpt-4}
"""


def quota_decider(tmp_path: Path) -> Decider:
    (tmp_path / "policy.yaml").write_text(QUOTA_POLICY)
    policy = load_policy([tmp_path])
    return Decider(Runtime(lambda: policy, CredentialStore(environ=ENV), QuotaEngine(QuotaSettings()),
                           ResponseCache(CacheSettings())))


def test_rate_limit_refusal_in_the_callers_format(tmp_path: Path) -> None:
    decider = quota_decider(tmp_path)
    body = {"model": "fraud_detector", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    for _ in range(2):
        admitted = decide(decider, body, path="/v1/messages")
        assert isinstance(admitted, Forward)
    assert admitted.metadata["limit_requests"] == "2" and admitted.metadata["remaining_requests"] == "0"
    refused = decide(decider, body, path="/v1/messages")
    assert isinstance(refused, LocalReply) and refused.status == 429
    assert dict(refused.headers)["retry-after"].isdigit()
    error = orjson.loads(refused.body)
    assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
    assert "requests per minute (2) for order-service model fraud_detector" in error["error"]["message"]


def test_token_reservation_and_openai_429_type(tmp_path: Path) -> None:
    decider = quota_decider(tmp_path)
    big = {"model": "chat", "max_tokens": 900, "messages": [{"role": "user", "content": "x"}]}
    first = decide(decider, big)
    assert isinstance(first, Forward) and first.metadata["limit_tokens"] == "1000"
    # The reservation (prompt estimate + max_tokens) is held: a second such call would exceed 1000.
    refused = decide(decider, big)
    assert isinstance(refused, LocalReply) and refused.status == 429
    error = orjson.loads(refused.body)["error"]
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")


def test_stream_usage_is_injected_only_when_needed(tmp_path: Path) -> None:
    decider = quota_decider(tmp_path)
    plain = decide(decider, {"model": "chat", "max_tokens": 5, "stream": True, "messages": []})
    assert isinstance(plain, Forward) and plain.body is not None
    assert orjson.loads(plain.body)["stream_options"] == {"include_usage": True}
    assert dict(plain.set_headers)["x-ai-usage"] == "strip"
    asked = decide(decider, {"model": "gpt-4", "max_tokens": 5, "stream": True, "messages": [],
                             "stream_options": {"include_usage": True}})
    assert isinstance(asked, Forward) and asked.body is None  # untouched: the caller asked for usage itself
    assert dict(asked.set_headers)["x-ai-usage"] == "observe"
    # No token or cost limit, no fallback, no telemetry sink: nothing reads the response, so no
    # response-side stream at all (it would cost processor CPU for nothing).
    (tmp_path / "plain").mkdir()
    unlimited = decide(make_decider(tmp_path / "plain"), {"model": "gpt-4", "stream": True, "messages": []})
    assert isinstance(unlimited, Forward) and unlimited.body is None
    assert "x-ai-usage" not in dict(unlimited.set_headers)
    # With a telemetry sink every call is read to its end, for its usage event.
    observed = make_decider(tmp_path / "plain")
    observed.runtime.observe_all = True
    seen = decide(observed, {"model": "gpt-4", "stream": True, "messages": []})
    assert isinstance(seen, Forward) and dict(seen.set_headers)["x-ai-usage"] == "observe"


CACHE_POLICY = """\
mesh:
  cache: {charge_hits: CHARGE}
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_KEY}}
---
service: order-service
ai_proxy:
  models:
  - {name: chat, provider: openai, model: gpt-4, cache_ttl: 60, rate_limit: 2/min}
"""


@pytest.mark.parametrize("charge", [False, True])
def test_cache_hits_and_quota(tmp_path: Path, charge: bool) -> None:
    (tmp_path / "policy.yaml").write_text(CACHE_POLICY.replace("CHARGE", str(charge).lower()))
    policy = load_policy([tmp_path])
    decider = Decider(Runtime(lambda: policy, CredentialStore(environ=ENV), QuotaEngine(QuotaSettings()),
                              ResponseCache(CacheSettings())))
    body = {"model": "chat", "temperature": 0, "messages": [{"role": "user", "content": "x"}]}
    miss = decide(decider, body)
    assert isinstance(miss, Forward) and miss.metadata["cache"] == "miss"
    key = settle_json(decider, miss)["ck"]
    entry = CacheEntry(200, "application/json", b'{"cached":true}', 7, 3, 0.0)
    asyncio.run(decider.runtime.cache.put(key, entry, 60))
    hits = [decide(decider, body) for _ in range(3)]
    assert all(isinstance(h, LocalReply) for h in hits)
    statuses = [h.status for h in hits]  # type: ignore[union-attr]
    # 2/min: the miss used one request. Charged hits use the other, then are refused like any call.
    assert statuses == ([200, 429, 429] if charge else [200, 200, 200])
    assert hits[0].body == b'{"cached":true}' and dict(hits[0].headers)["x-ai-cache"] == "hit"  # type: ignore[union-attr]


# --- crafted bodies -----------------------------------------------------------------------------------------


def test_a_duplicated_model_key_is_forwarded_once_with_the_value_we_decided_on(tmp_path: Path) -> None:
    """A first-key-wins provider must not serve another model than the policy allowed: one copy goes on."""
    decider = make_decider(tmp_path)
    raw = b'{"model": "gpt-5-ultra", "model": "summariser", "messages": [{"role": "user", "content": "x"}]}'
    forward = decide(decider, raw)
    assert isinstance(forward, Forward) and forward.body is not None
    assert forward.body.count(b'"model"') == 1
    assert orjson.loads(forward.body)["model"] == "gpt-4"
    same = decide(decider, b'{"model": "gpt-4o-mini", "model": "summariser", "stream": false, "stream": true, '
                           b'"messages": []}')
    assert isinstance(same, Forward) and same.body is not None and same.body.count(b'"stream"') == 1


def test_integers_beyond_64_bits_keep_every_digit_when_the_body_is_rewritten(tmp_path: Path) -> None:
    decider = make_decider(tmp_path)
    raw = b'{"model": "summariser", "seed": 123456789012345678901234567890, "messages": []}'
    forward = decide(decider, raw)
    assert isinstance(forward, Forward) and forward.body is not None  # rewritten: the model becomes gpt-4
    assert b'"seed":123456789012345678901234567890' in forward.body
    assert orjson.loads(forward.body.replace(b"123456789012345678901234567890", b"1"))["model"] == "gpt-4"


@pytest.mark.parametrize("depth", [65, 255, 900])  # the policy caps bodies at 2 KiB
def test_nesting_deeper_than_the_cap_is_refused_at_parse_time(tmp_path: Path, depth: int) -> None:
    decider = make_decider(tmp_path)
    body = b'{"model": "summariser", "messages": [], "metadata": ' + b"[" * depth + b"]" * depth + b"}"
    status, error = error_of(decide(decider, body))
    assert status == 400
    assert error["error"]["code"] == "invalid_json" and "deeper than 64" in error["error"]["message"]  # type: ignore[index]


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path: Path) -> None:
    decider = make_decider(tmp_path)
    text = "[" * 500 + '\\"{' * 100
    forward = decide(decider, orjson.dumps({"model": "summariser", "messages": [{"role": "user", "content": text}]}))
    assert isinstance(forward, Forward)


def test_a_model_without_a_timeout_gets_the_mesh_default(tmp_path: Path) -> None:
    """A hung provider never holds a caller (or what the call holds) longer than the mesh's ceiling."""
    decider = make_decider(tmp_path)
    forward = decide(decider, {"model": "summariser", "messages": []})  # no timeout in its policy entry
    timeout = int(headers_of(forward)["x-envoy-upstream-rq-timeout-ms"])
    assert 119_000 < timeout <= 120_000
    own = decide(decider, {"model": "fraud_detector", "max_tokens": 5,  # timeout: 2000ms
                           "messages": [{"role": "user", "content": "x"}]})
    assert 1_900 < int(headers_of(own)["x-envoy-upstream-rq-timeout-ms"]) <= 2_000


def test_a_grant_for_a_provider_without_a_key_is_redeemed_with_nothing_added(tmp_path: Path) -> None:
    """The gateway still requires the grant (the policy decided the call); there is just no key to add."""
    from extproc.core.grants import Grant, body_digest, redeem
    from extproc.core.inflight import MemoryInFlight

    decider = make_decider(tmp_path)
    policy = decider.runtime.policy()
    local = policy.providers["local"]
    token = Grant("local", local.authority, "shop", "order-service", "", "n1", body_digest(b"{}"), "POST",
                  "/serving/v1/chat/completions").encode(decider.runtime.signer, 60)

    async def scenario() -> None:
        store = MemoryInFlight()
        args = {"authority": local.authority, "body": b"{}", "peer": None, "signer": decider.runtime.signer,
                "inflight": store, "credentials": decider.runtime.credentials, "policy": policy, "method": "POST",
                "path": "/serving/v1/chat/completions", "cloud": decider.runtime.cloud}
        other = await redeem(token, **{**args, "path": "/serving/v1/embeddings"})  # type: ignore[arg-type]
        assert not isinstance(other, list) and other.code == "grant_wrong_request"  # for this request only
        assert await redeem(token, **args) == []  # type: ignore[arg-type]
        again = await redeem(token, **args)  # type: ignore[arg-type]
        assert not isinstance(again, list) and again.code == "grant_replayed"

    asyncio.run(scenario())


def test_an_allowed_path_to_a_cloud_provider_takes_its_own_credential_or_is_refused(tmp_path: Path) -> None:
    """An allowed path (no model, the body streams on unread) to Gemini gets Gemini's key header; to Bedrock,
    whose SigV4 signature covers the body, it is refused in the caller's format (it used to trip an
    assertion in the key store, an aws credential having no key to read)."""
    from extproc.policy.model import AllowedPath, CredentialSource, Provider

    decider = make_decider(tmp_path, unknown_paths="deny", env={**ENV, "GEMINI_KEY": "g-key"})
    policy = decider.runtime.policy()
    gemini = Provider(name="gemini", api="gemini", credential=CredentialSource(env="GEMINI_KEY"))
    bedrock = Provider(name="bedrock", api="bedrock", region="us-east-1", credential=CredentialSource(type="aws"))
    object.__setattr__(policy, "providers", {**policy.providers, "gemini": gemini, "bedrock": bedrock})
    service = policy.for_caller("order-service", "shop")
    assert service is not None
    proxy = service.proxy.model_copy(update={"allow_paths": (
        AllowedPath(path="/v1beta/files/**", methods=("GET",), provider="gemini"),
        AllowedPath(path="/model/**", methods=("GET",), provider="bedrock"))})
    object.__setattr__(service, "proxy", proxy)
    forward = provider_call(decider, "/v1beta/files/f-1")
    assert isinstance(forward, Forward), forward
    got = dict(forward.set_headers)
    assert got["x-goog-api-key"] == "g-key" and "authorization" not in got
    status, body = error_of(provider_call(decider, "/model/x/invocations"))
    assert status == 400 and body["error"]["code"] == "path_not_signable"  # type: ignore[index]
