"""``make demo`` (``python -m devtools.demo``): a real Envoy per sample service, our processor and mock
providers, on local ports.

Each sample service gets its own Envoy whose node metadata names it, exactly as an Istio sidecar's
does. Traffic is sent with the official ``openai`` and ``anthropic`` SDKs through those Envoys, and
the table shows what each service's policy did with it.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devtools.launch import LaunchError
from devtools.stack import SERVICES, Stack
from extproc.cli import sample_policy_dir

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam


@dataclass(frozen=True)
class Row:
    service: str
    call: str
    asked: str
    provider: str
    served: str
    variant: str
    status: str
    latency_ms: float


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = call()
    return result, (time.perf_counter() - start) * 1000


def _row(service: str, call: str, asked: str, headers: Any, status: int | str, ms: float) -> Row:
    return Row(service, call, asked, headers.get("x-ai-provider", "-"), headers.get("x-ai-model", "-"),
               headers.get("x-ai-variant") or "-", str(status), ms)


def drive_traffic(stack: Stack) -> tuple[list[Row], Counter[str], str]:
    import anthropic
    import httpx
    import openai

    rows: list[Row] = []

    def openai_client(service: str) -> openai.OpenAI:
        # The application's own key is irrelevant: the mesh injects the provider credential.
        return openai.OpenAI(base_url=stack.base_url(service) + "/v1", api_key="unused", max_retries=0)

    def chat(service: str, label: str, model: str, stream: bool = False, **extra: Any) -> None:
        client = openai_client(service)
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": f"{label} request from {service}"}]
        try:
            raw, ms = _timed(lambda: client.chat.completions.with_raw_response.create(
                model=model, messages=messages, stream=stream, **extra))
            if stream:
                text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
                assert text, "empty stream"
            else:
                raw.parse()
            rows.append(_row(service, label, model, raw.headers, raw.status_code, ms))
        except openai.APIStatusError as exc:
            rows.append(_row(service, label, model, exc.response.headers,
                             f"{exc.status_code} {exc.body.get('code') if isinstance(exc.body, dict) else ''}",
                             0.0))

    chat("user-service", "chat", "auth_assistant")
    chat("user-service", "chat (stream)", "auth_assistant", stream=True)
    chat("user-service", "not in policy", "gpt-4o")
    chat("user-service", "spoofed identity", "fraud_detector", extra_headers={"x-ai-service": "order-service"})
    burst = _burst(openai_client("user-service"), 105)
    chat("user-service", "after the burst", "auth_assistant")

    variants: Counter[str] = Counter()
    first_user: dict[str, str] = {}
    client = openai_client("product-service")
    for user in range(200):
        raw = client.chat.completions.with_raw_response.create(
            model="recommendation_engine", messages=[{"role": "user", "content": "recommend"}],
            extra_headers={"x-user-id": f"user-{user}"})
        variant = raw.headers.get("x-ai-variant", "?")
        variants[variant] += 1
        first_user.setdefault(variant, f"user-{user}")
    for _variant, user_id in sorted(first_user.items()):
        chat("product-service", f"A/B ({user_id})", "recommendation_engine", extra_headers={"x-user-id": user_id})
    for attempt in range(40):  # the first answer is stored just after the caller has it
        label = "repeat, temperature 0" if attempt else "first, temperature 0"
        raw, ms = _timed(lambda: client.chat.completions.with_raw_response.create(
            model="recommendation_engine", temperature=0, messages=[{"role": "user", "content": "bestsellers?"}],
            extra_headers={"x-user-id": "user-1"}))
        if attempt == 0 or raw.headers.get("x-ai-cache") == "hit":
            rows.append(_row("product-service", f"{label} (cache {raw.headers.get('x-ai-cache', '-')})",
                             "recommendation_engine", raw.headers, raw.status_code, ms))
        if raw.headers.get("x-ai-cache") == "hit":
            break
        time.sleep(0.05)
    emb, ms = _timed(lambda: client.embeddings.with_raw_response.create(model="product_embeddings",
                                                                        input=["red shoes", "blue hat"]))
    rows.append(_row("product-service", "embeddings", "product_embeddings", emb.headers, emb.status_code, ms))
    # The Responses API is governed like chat; a path no AI endpoint covers is refused in the caller's format.
    response, ms = _timed(lambda: client.responses.with_raw_response.create(
        model="recommendation_engine", input="a gift for a hiker", extra_headers={"x-user-id": "user-7"}))
    text = response.parse().output_text
    rows.append(_row("product-service", f"responses ({len(text.split())} words)", "recommendation_engine",
                     response.headers, response.status_code, ms))
    files, ms = _timed(lambda: httpx.get(stack.base_url("product-service") + "/v1/files",
                                         headers={"host": "api.openai.com"}))
    rows.append(_row("product-service", f"GET /v1/files → {files.json()['error']['code']}", "-", files.headers,
                     files.status_code, ms))

    claude = anthropic.Anthropic(base_url=stack.base_url("order-service"), api_key="unused", max_retries=0)
    msg, ms = _timed(lambda: claude.messages.with_raw_response.create(
        model="fraud_detector", max_tokens=64, messages=[{"role": "user", "content": "order 42 looks odd"}]))
    msg.parse()
    rows.append(_row("order-service", "messages", "fraud_detector", msg.headers, msg.status_code, ms))
    start = time.perf_counter()
    with claude.messages.stream(model="fraud_detector", max_tokens=64,
                                messages=[{"role": "user", "content": "score order 43"}]) as stream:
        final = stream.get_final_message()
        headers = stream.response.headers
    rows.append(_row("order-service", f"messages (stream, {final.usage.output_tokens} tok)", "fraud_detector",
                     headers, 200, (time.perf_counter() - start) * 1000))
    # Claude fails (the mock answers 503, then resets): each call is completed by the fallback,
    # OpenAI, and the Anthropic SDK still reads an Anthropic answer.
    for label, fault in (("claude 503 → fallback", {"x-mock-status": "503"}),
                         ("claude reset → fallback", {"x-mock-reset": "1"})):
        msg, ms = _timed(functools.partial(
            claude.messages.with_raw_response.create,
            model="fraud_detector", max_tokens=64, messages=[{"role": "user", "content": "order 44 looks odd"}],
            extra_headers={"x-mock-only": "anthropic", **fault}))
        answer = msg.parse()
        rows.append(_row("order-service", f"{label} ({answer.type}, {answer.content[0].type})", "fraud_detector",
                         msg.headers, msg.status_code, ms))
        hops = msg.headers.get("x-ai-fallback-hops", "-")
    start = time.perf_counter()
    with claude.messages.stream(model="fraud_detector", max_tokens=64,
                                messages=[{"role": "user", "content": "score order 45"}],
                                extra_headers={"x-mock-only": "anthropic", "x-mock-status": "529"}) as stream:
        final = stream.get_final_message()
        headers = stream.response.headers
    rows.append(_row("order-service", "claude 529 → fallback (stream)", "fraud_detector", headers, 200,
                     (time.perf_counter() - start) * 1000))
    fallback = (f"order-service fallback: the Anthropic SDK got {final.type!r} events translated from OpenAI's "
                f"stream; x-ai-fallback-hops: {hops}")
    rows.extend(_cloud_providers(stack))
    return rows, variants, burst + "\n\n" + fallback


def _cloud_providers(stack: Stack) -> list[Row]:
    """product-service's summarizer is an Azure OpenAI deployment, order-service's risk_scorer Claude on
    Bedrock (Converse, SigV4-signed by the processor, its binary event stream answered as SSE); both mocks."""
    import anthropic
    import openai

    rows: list[Row] = []
    azure = openai.OpenAI(base_url=stack.base_url("product-service") + "/v1", api_key="unused", max_retries=0)
    bedrock = anthropic.Anthropic(base_url=stack.base_url("order-service"), api_key="unused", max_retries=0)
    order = openai.OpenAI(base_url=stack.base_url("order-service") + "/v1", api_key="unused", max_retries=0)
    prompt: Any = [{"role": "user", "content": "summarise the red shoes"}]
    for label, extra in (("azure deployment", {}), ("azure 503 → fallback", {"x-mock-status": "503",
                                                                                "x-mock-only": "cloud"})):
        raw, ms = _timed(functools.partial(azure.chat.completions.with_raw_response.create,
                                           model="summarizer", messages=prompt, extra_headers=extra))
        raw.parse()
        rows.append(_row("product-service", label, "summarizer", raw.headers, raw.status_code, ms))
    start = time.perf_counter()
    with bedrock.messages.stream(model="risk_scorer", max_tokens=64,
                                 messages=[{"role": "user", "content": "score order 46"}]) as stream:
        final = stream.get_final_message()
        headers = stream.response.headers
    rows.append(_row("order-service", f"bedrock (stream, {final.usage.output_tokens} tok)", "risk_scorer",
                     headers, 200, (time.perf_counter() - start) * 1000))
    raw, ms = _timed(lambda: order.chat.completions.with_raw_response.create(
        model="risk_scorer", messages=[{"role": "user", "content": "score order 47"}]))
    raw.parse()
    rows.append(_row("order-service", "bedrock (OpenAI SDK)", "risk_scorer", raw.headers, raw.status_code, ms))
    msg, ms = _timed(lambda: bedrock.messages.with_raw_response.create(
        model="risk_scorer", max_tokens=64, messages=[{"role": "user", "content": "score order 48"}],
        extra_headers={"x-mock-status": "503", "x-mock-only": "cloud"}))
    msg.parse()
    rows.append(_row("order-service", "bedrock 503 → fallback", "risk_scorer", msg.headers, msg.status_code, ms))
    return rows


def _burst(client: Any, calls: int) -> str:
    """user-service's auth_assistant allows 100/min: send more than that and report what the quota did."""
    import openai

    admitted, refused, message, retry, remaining = 0, 0, "", "", ""
    for _ in range(calls):
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="auth_assistant", messages=[{"role": "user", "content": "burst"}])
            admitted += 1
            remaining = raw.headers.get("x-ratelimit-remaining-requests", "?")
        except openai.RateLimitError as exc:
            refused += 1
            message = exc.body.get("message", "") if isinstance(exc.body, dict) else str(exc.body)
            retry = exc.response.headers.get("retry-after", "?")
    return (f"user-service burst of {calls} calls to auth_assistant (rate_limit: 100/min): {admitted} admitted "
            f"(x-ratelimit-remaining-requests fell to {remaining}), {refused} refused with 429 "
            f"retry-after {retry}s: \"{message}\"")


def print_report(rows: list[Row], variants: Counter[str], burst: str, quota: str) -> None:
    columns = ("service", "call", "model asked", "provider", "model served", "variant", "status", "ms")
    table = [(r.service, r.call, r.asked, r.provider, r.served, r.variant, r.status,
              f"{r.latency_ms:.1f}" if r.latency_ms else "-") for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    print(line)
    print("-" * len(line))
    previous = None
    for row in table:
        if previous is not None and row[0] != previous:
            print()
        previous = row[0]
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    total = sum(variants.values())
    split = ", ".join(f"{name} {count} ({100 * count / total:.0f}%)" for name, count in sorted(variants.items()))
    print(f"\nproduct-service A/B split over {total} users (policy 80/20, sticky on x-user-id): {split}")
    print(f"\n{burst}")
    print(f"\n$ extproc quota show --admin ...   (live counters, as the processor sees them)\n{quota}")


def _quota_table(admin_port: int) -> str:
    import json
    import urllib.request

    from extproc.quota.report import Line, format_lines

    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/quota", timeout=5) as reply:
        return format_lines([Line(**line) for line in json.load(reply)["limits"]])


NATS_URL = "nats://127.0.0.1:4222"
DEMO_JOBS_PREFIX = "demo"  # the demo's job streams and subjects, apart from an install's


def _nats_reachable(url: str = NATS_URL) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=0.5) as sock:
            return sock.recv(4096).startswith(b"INFO ")
    except OSError:
        return False


def _telemetry_report(stack: Stack, events_file: Path, nats: bool) -> str:
    """What the calls left behind: a few Prometheus series and the usage events."""
    import urllib.request

    from extproc.events.schema import event_from_json
    from extproc.events.tail import format_line

    with urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_port}/metrics", timeout=5) as reply:
        metrics = reply.read().decode()
    wanted = ("ai_extproc_fallbacks_total{", "ai_extproc_breaker_state{", "ai_extproc_cost_usd_total{",
              "ai_extproc_quota_rejections_total{")
    series = [line for prefix in wanted for line in metrics.splitlines()
              if line.startswith(prefix) and not line.endswith(" 0.0")]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not events_file.exists():
        time.sleep(0.1)
    time.sleep(0.5)  # the last responses settle just after their callers have them
    events = [event_from_json(line) for line in events_file.read_text().splitlines()] if events_file.exists() else []
    where = ("also on NATS JetStream (stream AI_USAGE): `extproc events tail --all` shows them" if nats
             else "NATS is not running on 127.0.0.1:4222, so events went to the JSONL file only")
    lines = [f"$ curl http://127.0.0.1:{stack.admin_port}/metrics   ({len(metrics.splitlines())} lines; a few of "
             "them)", *(f"  {line}" for line in series[:12]),
             f"\nusage events: {len(events)}, one per AI call ({where}); the last five:",
             *(f"  {format_line(event)}" for event in events[-5:])]
    return "\n".join(lines)


def _async_call(stack: Stack) -> str:
    """order-service's fraud check as an asynchronous call: 202 at once, the result as an event."""
    import asyncio

    import anthropic
    import httpx
    import nats
    import orjson

    async def run() -> list[str]:
        connection = await nats.connect(NATS_URL)
        try:
            # Subscribed before submitting: the result is published once, possibly within milliseconds.
            subscription = await connection.subscribe(f"{DEMO_JOBS_PREFIX}.ai.jobs.result.>")
            claude = anthropic.Anthropic(base_url=stack.base_url("order-service"), api_key="unused", max_retries=0)
            started = time.perf_counter()
            raw = await asyncio.to_thread(lambda: claude.messages.with_raw_response.create(
                model="fraud_detector", max_tokens=64, messages=[{"role": "user", "content": "fraud check order 46"}],
                extra_headers={"prefer": "respond-async"}))
            accepted_ms = (time.perf_counter() - started) * 1000
            job = orjson.loads(raw.http_response.content)
            event = None
            deadline = time.monotonic() + 15
            while event is None and time.monotonic() < deadline:
                message = await subscription.next_msg(timeout=15)
                candidate = orjson.loads(message.data)
                event = candidate if candidate.get("job_id") == job["id"] else None
            polled = await asyncio.to_thread(httpx.get, stack.base_url("order-service") + job["location"])
        finally:
            await connection.close()
        if event is None:
            return [f"order-service async fraud check: job {job['id']} gave no result event in 15 s"]
        answer = orjson.loads(event["body"])["content"][0]["text"]
        return [f"order-service async fraud check (Prefer: respond-async): {raw.http_response.status_code} in "
                f"{accepted_ms:.1f} ms, job {job['id']}, Location {job['location']}",
                f"  result event on {job['result_subject']}: status {event['status']} after "
                f"{event['attempts']} attempt(s): {answer!r}",
                f"  GET {job['location']} → {polled.status_code} ({polled.headers.get('content-type')})"]

    return "\n".join(asyncio.run(run()))


# The demo's cloud providers, on top of the samples (which the Istio install ships, so they name only the
# public OpenAI and Anthropic hosts): product-service's summarizer is an Azure OpenAI deployment,
# order-service's risk_scorer Claude on Bedrock. Both are served by the cloud mock.
_DEMO_PROVIDERS = """
- name: azure
  api: azure_openai
  base_url: http://contoso-ai.openai.azure.com
  api_version: 2024-10-21
  deployments: {gpt-4o-mini: gpt-4o-mini-prod}
  credential: {env: AZURE_OPENAI_API_KEY}
- name: bedrock
  api: bedrock
  region: us-east-1
  credential: {type: aws}
"""
_DEMO_MODELS = {
    "product-service.yaml": """
  - {name: summarizer, provider: azure, model: gpt-4o-mini, purpose: product_summaries, rate_limit: 300/min,
     timeout: 10s, fallback: [openai/gpt-4o-mini]}
""",
    "order-service.yaml": """
  - {name: risk_scorer, provider: bedrock, model: 'anthropic.claude-3-haiku-20240307-v1:0', purpose: order_risk,
     timeout: 5s, fallback: [claude/claude-3]}
""",
}


def demo_policy_dir(directory: Path) -> Path:
    """The sample policies with the demo's cloud providers added."""
    directory.mkdir(parents=True)
    for path in sample_policy_dir().iterdir():
        text = path.read_text()
        if path.name == "mesh.yaml":
            text = text.rstrip("\n") + "\n" + _DEMO_PROVIDERS.lstrip("\n")
        elif path.name in _DEMO_MODELS:
            text = text.rstrip("\n") + "\n" + _DEMO_MODELS[path.name].lstrip("\n")
        (directory / path.name).write_text(text)
    return directory


def run_demo(keep_logs: bool = False) -> int:
    logging.getLogger().setLevel(logging.WARNING)  # the SDKs log every request at INFO
    log_dir = Path(tempfile.mkdtemp(prefix="extproc-demo-"))
    print("Starting mock providers, the processor and one Envoy sidecar per service (127.0.0.1 only)...")
    events_file = log_dir / "events.jsonl"
    nats = _nats_reachable()
    telemetry = ["--events-file", str(events_file), "--access-log", str(log_dir / "access.jsonl"),
                 *(["--events-nats", NATS_URL] if nats else [])]
    policies = demo_policy_dir(log_dir / "policies")
    try:
        stack = Stack(policies, log_dir, processor_args=telemetry,
                      jobs=(NATS_URL, DEMO_JOBS_PREFIX) if nats else None)
    except LaunchError as exc:
        print(f"demo: could not start: {exc}")
        return 1
    try:
        print(f"  processor policies: {policies} (the samples, plus an Azure OpenAI and a Bedrock provider)")
        for service in SERVICES:
            print(f"  {service:16} → Envoy on {stack.base_url(service)}")
        print()
        rows, variants, burst = drive_traffic(stack)
        print_report(rows, variants, burst, _quota_table(stack.admin_port))
        if nats:
            print(f"\n{_async_call(stack)}")
        else:
            print("\nasynchronous calls need NATS JetStream on 127.0.0.1:4222: skipped")
        print(f"\n{_telemetry_report(stack, events_file, nats)}")
    finally:
        stack.close()
        if keep_logs:
            print(f"\nlogs (Envoy access logs show each decision): {log_dir}")
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m devtools.demo",
                                     description="run Envoy + processor + mock providers and show what policy does")
    parser.add_argument("--keep-logs", action="store_true", help="keep the component logs and print where")
    return run_demo(keep_logs=parser.parse_args(argv).keep_logs)


if __name__ == "__main__":
    raise SystemExit(main())
