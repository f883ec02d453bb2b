"""A sample service: calls AI providers with the official SDKs, as any application would.

It knows nothing about the mesh: OPENAI_BASE_URL / ANTHROPIC_BASE_URL point at the providers' plain
HTTP hosts and the keys it holds are dummies. Every call prints one JSON line with what the mesh did
(status and the x-ai-* response headers); `kubectl logs deploy/user-service -n ai-demo` shows them.
"""

import json
import os
import time

import anthropic
import openai

SERVICE = os.environ["SERVICE"]
CALLS = {
    "user-service": [("openai", "auth_assistant"), ("openai", "gpt-4o")],  # the second is not in its policy
    "product-service": [("openai", "recommendation_engine"), ("openai-embeddings", "product_embeddings")],
    "order-service": [("anthropic", "fraud_detector")],
}


def call(kind: str, model: str, user: str) -> dict:
    try:
        if kind == "anthropic":
            raw = anthropic.Anthropic(max_retries=0).messages.with_raw_response.create(
                model=model, max_tokens=16, messages=[{"role": "user", "content": f"hello from {SERVICE}"}])
        elif kind == "openai-embeddings":
            raw = openai.OpenAI(max_retries=0).embeddings.with_raw_response.create(model=model, input="a red bike")
        else:
            raw = openai.OpenAI(max_retries=0).chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": f"hello from {SERVICE}"}],
                extra_headers={"x-user-id": user})
        status, headers, error = raw.status_code, raw.headers, ""
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        status, headers, error = exc.status_code, exc.response.headers, exc.message
    except (openai.APIConnectionError, anthropic.APIConnectionError) as exc:
        status, headers, error = 0, {}, str(exc)
    shown = {k: headers.get(k) for k in ("x-ai-provider", "x-ai-model", "x-ai-variant", "x-ai-policy-version")}
    return {"service": SERVICE, "asked": model, "status": status, **shown, "error": error[:200]}


if __name__ == "__main__":
    n = 0
    while True:
        for kind, model in CALLS[SERVICE]:
            print(json.dumps(call(kind, model, f"user-{n % 5}")), flush=True)
        n += 1
        time.sleep(float(os.environ.get("INTERVAL", "10")))
