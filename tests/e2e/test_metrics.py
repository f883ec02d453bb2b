"""/metrics after real traffic through Envoy: exact counts, bounded labels."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.stack import Stack

POLICY = """\
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_API_KEY}}
---
service: shop
ai_proxy:
  limits: {tokens: 1000000/min}
  models:
  - {name: chat, provider: openai, model: gpt-4, rate_limit: 4/min}
"""


def scrape(stack: Stack) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    matching = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert matching, f"no sample {name} {labels}"
    return sum(matching)


def test_metrics_count_every_decision_and_settlement(envoy_binary: str, tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "policy.yaml").write_text(POLICY)
    if time.time() % 60 > 50:  # four calls must fit in one per-minute window
        time.sleep(61 - time.time() % 60)
    stack = Stack(tmp_path / "policies", tmp_path, services=["shop", "stranger"])
    try:
        client = openai.OpenAI(base_url=stack.base_url("shop") + "/v1", api_key="x", max_retries=0)
        prompt_tokens = 0
        for i in range(3):
            usage = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": f"q{i}"}]).usage
            assert usage is not None
            prompt_tokens += usage.prompt_tokens
        stream = client.chat.completions.create(model="chat", stream=True, stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "streamed"}])
        prompt_tokens += next(c.usage for c in stream if c.usage is not None).prompt_tokens
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "fifth"}])
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="gpt-5-secret", messages=[{"role": "user", "content": "x"}])
        stranger = openai.OpenAI(base_url=stack.base_url("stranger") + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.PermissionDeniedError):
            stranger.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])

        deadline = time.monotonic() + 6  # settlement lands just after each response
        while True:
            samples = scrape(stack)
            settled = [v for (n, ls), v in samples.items() if n == "gen_ai_client_token_usage_count"
                       and ("gen_ai_token_type", "input") in ls]
            if sum(settled) >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.1)

        shop = {"service": "shop", "namespace": "demo"}
        calls = "ai_extproc_calls_total"
        assert value(samples, calls, **shop, gen_ai_request_model="chat", outcome="forwarded") == 4
        assert value(samples, calls, **shop, outcome="rate_limit_exceeded") == 1
        assert value(samples, calls, **shop, outcome="model_not_allowed") == 1
        # A caller without a policy, and a model no policy names, are folded into "other".
        assert value(samples, calls, service="other", outcome="no_policy") == 1
        assert not any(("gen_ai_request_model", "gpt-5-secret") in ls for _, ls in samples)
        assert value(samples, "ai_extproc_quota_rejections_total", **shop, limit="requests") == 1
        tokens = {**shop, "gen_ai_operation_name": "chat_completions", "gen_ai_response_model": "gpt-4"}
        assert value(samples, "gen_ai_client_token_usage_count", **tokens, gen_ai_token_type="input") == 4
        assert value(samples, "gen_ai_client_token_usage_sum", **tokens, gen_ai_token_type="input") == prompt_tokens
        assert value(samples, "gen_ai_server_time_to_first_token_seconds_count", **shop) == 1
        assert value(samples, "gen_ai_server_request_duration_seconds_count", **shop, status="200") == 4
        assert value(samples, "ai_extproc_cost_usd_total", **shop) > 0
        assert value(samples, "ai_extproc_processing_seconds_count", phase="decision") == 7
        assert value(samples, "ai_extproc_streams_in_flight", kind="decision") == 0
    finally:
        stack.close()
