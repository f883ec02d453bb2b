"""Forwarding a Responses API call (extproc/core/forwarding.py): the fallback hops that can serve it, and its
translation for a route whose provider is Anthropic's."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from extproc.core import fallback
from extproc.core.decision import Forward
from tests.unit.resilience_support import make_decider
from tests.unit.test_decision import decide, error_of, headers_of, settle_json

RESPONSES_POLICY = """\
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_KEY}}
---
service: order-service
ai_proxy:
  models:
  - {name: assistant, provider: openai, model: gpt-4o, fallback: [claude/claude-3, openai/gpt-4o-mini]}
  - {name: claude_first, provider: claude, model: claude-3, fallback: [openai/gpt-4o]}
"""


@pytest.mark.parametrize(("extra", "hops"), [
    # openai, then claude (translated), then openai's chat API: the body is Anthropic's by then and reaches
    # chat through the canonical form (the answer goes chat → canonical → Responses).
    ({}, 3),
    ({"previous_response_id": "resp_1"}, 1),  # state only its provider keeps: no fallback at all
    ({"tools": [{"type": "web_search"}]}, 1),  # a built-in tool: OpenAI providers only (the next is claude)
])
def test_a_responses_call_falls_back_only_where_it_can_be_served(tmp_path: Path, extra: dict[str, object],
                                                                 hops: int) -> None:
    decider = make_decider(tmp_path, RESPONSES_POLICY)
    forward = decide(decider, {"model": "assistant", "input": "hi", **extra}, path="/v1/responses")
    assert isinstance(forward, Forward), forward
    headers = headers_of(forward)
    assert headers[":path"] == "/v1/responses" and headers[":authority"] == "api.openai.com"
    if hops == 1:
        assert "x-ai-fallback" not in headers and "fallback_state" not in forward.metadata
    else:
        state = fallback.HopState.decode(forward.metadata["fallback_state"], decider.runtime.signer)
        assert state is not None and state.limit == hops and state.caller_api == "openai_responses"


def test_a_responses_call_to_an_anthropic_model_is_translated(tmp_path: Path) -> None:
    decider = make_decider(tmp_path, RESPONSES_POLICY)
    forward = decide(decider, {"model": "claude_first", "input": "hi", "instructions": "be brief",
                               "max_output_tokens": 20}, path="/v1/responses")
    assert isinstance(forward, Forward) and forward.body is not None
    headers = headers_of(forward)
    assert headers[":path"] == "/v1/messages" and headers["x-ai-usage"] == "translate"
    sent = orjson.loads(forward.body)
    assert sent["model"] == "claude-3" and sent["system"] == "be brief" and sent["max_tokens"] == 20
    settle = settle_json(decider, forward)
    assert (settle["api"], settle["ca"]) == ("anthropic", "openai_responses")
    refused = decide(decider, {"model": "claude_first", "input": "hi", "previous_response_id": "resp_1"},
                     path="/v1/responses")
    status, body = error_of(refused)
    assert status == 400 and body["error"]["code"] == "untranslatable_request"  # type: ignore[index]
    assert "previous_response_id" in body["error"]["message"]  # type: ignore[index]
