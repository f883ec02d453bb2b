"""Envoy direct vs Envoy + our processor, side by side, in one run.

Both paths use the same sidecar-shaped Envoy (rendered by the same code), the same client (wrk)
and the same fast fixed upstream (a second Envoy answering with a canned chat completion), so the
difference is our filter and processor: one ext_proc stream per call, decision on the full body,
routing by :authority rewrite, credential injection, body rewrite (logical → upstream model name).

Usage: python -m bench.run [--duration 10] [--concurrency 1 16]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from extproc.envoy_config.bootstrap import SidecarSpec, to_yaml, upstream_for
from extproc.launch import (
    Managed,
    find_envoy,
    free_port,
    start_envoy,
    start_mock_provider,
    start_processor,
)
from extproc.policy.loader import load_policy
from extproc.stack import ANTHROPIC_KEY, OPENAI_KEY

BODY = json.dumps({"model": "auth_assistant", "messages": [{"role": "user", "content": "How do I reset my password?"}]})
REPLY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "gpt-4",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Use the reset link."},
                 "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
})
LUA = """wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["Host"] = "api.openai.com"
wrk.body = [[%s]]
"""


def fixed_upstream_config(port: int, admin: int) -> dict[str, object]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [{
            "name": "fixed", "enable_reuse_port": False,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                         "HttpConnectionManager",
                "stat_prefix": "fixed",
                "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
                    "match": {"prefix": "/"},
                    "direct_response": {"status": 200, "body": {"inline_string": REPLY}},
                    "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
                }]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }}]}],
        }]},
    }


@dataclass(frozen=True)
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    assert match, text
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, script: Path, concurrency: int, duration: int) -> Result:
    threads = min(concurrency, 2)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{duration}s", "--latency", "-s", str(script),
                          url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    errors += sum(int(g) for g in socket_errors.groups()) if socket_errors else 0
    return Result(rps, p50, p99, errors)


def ext_proc_stats(admin_port: int) -> dict[str, int]:
    """The decision filter's counters (stat prefix ai_extproc), not the usage filter's."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?filter=ai_extproc").read().decode()
    stats = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            stats[name.rsplit(".", 1)[-1]] = int(value)
    return stats


BENCH_SERVICE = "bench-service"
MESH = """\
mesh:
  quota: {{backend: {backend}, redis_url: '{redis_url}', key_prefix: bench-{run}}}
providers:
- {{name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {{env: OPENAI_API_KEY}}}}
"""
ROUTING_ONLY = f"""\
service: {BENCH_SERVICE}
ai_proxy:
  models: [{{name: auth_assistant, provider: openai, model: gpt-4}}]
"""
# Limits high enough never to trip: the point is what checking and settling them costs.
WITH_QUOTA = f"""\
service: {BENCH_SERVICE}
ai_proxy:
  limits: {{requests: 100000000/min, tokens: 10000000000/min}}
  models: [{{name: auth_assistant, provider: openai, model: gpt-4}}]
"""
WITH_CACHE = f"""\
service: {BENCH_SERVICE}
ai_proxy:
  models: [{{name: auth_assistant, provider: openai, model: gpt-4, cache_ttl: 600}}]
"""
# label, policy, quota backend
VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("processor", ROUTING_ONLY, "memory"),
    ("quota-memory", WITH_QUOTA, "memory"),
    ("quota-redis", WITH_QUOTA, "redis"),
    ("cache", WITH_CACHE, "memory"),
)
LABELS = {
    "direct": "Envoy direct",
    "null": "Envoy + null Python ext_proc",
    "processor": "Envoy + processor (routing)",
    "quota-memory": "  + quota, memory store",
    "quota-redis": "  + quota, Redis store",
}


def policy_dir(work: Path, label: str, service_policy: str, backend: str, redis_url: str) -> Path:
    directory = work / f"policy-{label}"
    directory.mkdir()
    (directory / "mesh.yaml").write_text(MESH.format(backend=backend, redis_url=redis_url, run=uuid.uuid4().hex[:8]))
    (directory / "service.yaml").write_text(service_policy)
    return directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--stream-calls", type=int, default=200, help="sequential streamed calls per variant")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("bench: wrk not found (Debian package `wrk`; `make bench` installs it)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    script = work / "post.lua"
    script.write_text(LUA % BODY)
    parts: list[Managed] = []
    env = {"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY}
    try:
        upstream_port = free_port()
        config = work / "fixed-upstream.yaml"
        config.write_text(to_yaml(fixed_upstream_config(upstream_port, free_port())))
        parts.append(Managed("fixed-upstream", [find_envoy(), "-c", str(config), "--log-level", "warn",
                                                "--concurrency", "1", "--base-id", str(upstream_port)],
                             log_dir=work).start_listening(upstream_port, 20))
        mock_port = free_port()
        parts.append(start_mock_provider(mock_port, ["--openai-key", OPENAI_KEY], "openai", work))
        null_port = free_port()
        parts.append(Managed("null-processor", [sys.executable, "-m", "bench.null_processor",
                                                f"127.0.0.1:{null_port}"], log_dir=work).start_listening(null_port))
        processors: dict[str, int] = {"direct": 0, "null": null_port}
        for label, service_policy, backend in VARIANTS:
            port = free_port()
            parts.append(start_processor([policy_dir(work, label, service_policy, backend, args.redis_url)], port,
                                         log_dir=work, env=env, extra_args=["--watch", "0"], name=label))
            processors[label] = port
        openai_provider = load_policy([work / "policy-processor"]).providers["openai"]
        sidecars: dict[str, SidecarSpec] = {}
        streaming: dict[str, SidecarSpec] = {}
        for label, port in processors.items():
            for table, upstream in ((sidecars, upstream_port), (streaming, mock_port)):
                spec = SidecarSpec(service=BENCH_SERVICE, namespace="bench", listen_port=free_port(),
                                   admin_port=free_port(), processor=("127.0.0.1", port or null_port),
                                   upstreams=(upstream_for(openai_provider, ("127.0.0.1", upstream)),),
                                   access_log=False, with_processor=label != "direct")
                parts.append(start_envoy(spec, work))
                table[label] = spec
        results: dict[tuple[str, int], Result] = {}
        for concurrency in args.concurrency:
            for label in LABELS:
                spec = sidecars[label]
                url = f"http://127.0.0.1:{spec.listen_port}/v1/chat/completions"
                run_wrk(url, script, concurrency, 2)  # warm-up: connections, caches, JIT-free but still
                before = ext_proc_stats(spec.admin_port)
                results[(label, concurrency)] = run_wrk(url, script, concurrency, args.duration)
                after = ext_proc_stats(spec.admin_port)
                if label == "processor":
                    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                    calls = max(delta.get("streams_started", 0), 1)
                    print(f"  c={concurrency}: {calls} ext_proc streams; per call "
                          f"{delta.get('stream_msgs_sent', 0) / calls:.2f} messages to the processor, "
                          f"{delta.get('stream_msgs_received', 0) / calls:.2f} back, pipelined as one round trip; "
                          f"failed streams {delta.get('streams_failed', 0)}", flush=True)
        print_table(results, args.concurrency, args.duration)
        print_streaming(streaming, args.stream_calls)
        print_cache(streaming["cache"], args.stream_calls)
    finally:
        for part in reversed(parts):
            part.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def measure_stream(url: str, calls: int, include_usage: bool) -> tuple[float, float]:
    """p50 time to the first SSE event and to the end of the stream, over sequential calls."""
    body = {"model": "auth_assistant", "stream": True, "max_tokens": 64,
            "messages": [{"role": "user", "content": "one two three four five six seven eight"}]}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    first: list[float] = []
    total: list[float] = []
    with httpx.Client(timeout=10) as client:
        for i in range(calls + 10):
            start = time.perf_counter()
            with client.stream("POST", url, json=body, headers={"host": "api.openai.com"}) as response:
                chunks = response.iter_raw()
                next(chunks)
                ttfb = time.perf_counter() - start
                for _ in chunks:
                    pass
            if i >= 10:  # warm-up
                first.append(ttfb)
                total.append(time.perf_counter() - start)
    return statistics.median(first) * 1000, statistics.median(total) * 1000


def print_streaming(sidecars: dict[str, SidecarSpec], calls: int) -> None:
    """Streamed replies: does reading usage on the response side cost the caller anything?"""
    cases = (
        ("direct", False, "Envoy direct"),
        ("processor", False, "processor, routing only (no response filter)"),
        ("quota-memory", True, "quota, client asked include_usage (observed)"),
        ("quota-memory", False, "quota, usage injected and stripped (full duplex)"),
    )
    print(f"\nStreamed chat completion from the mock provider (~12 SSE events), {calls} sequential calls each")
    header = f"{'path':<52}{'first event p50 ms':>20}{'complete p50 ms':>18}"
    print(header)
    print("-" * len(header))
    for label, include_usage, text in cases:
        url = f"http://127.0.0.1:{sidecars[label].listen_port}/v1/chat/completions"
        ttfb, whole = measure_stream(url, calls, include_usage)
        print(f"{text:<52}{ttfb:>20.3f}{whole:>18.3f}")


def print_table(results: dict[tuple[str, int], Result], concurrencies: list[int], duration: int) -> None:
    print(f"\nPOST /v1/chat/completions, {len(BODY)} B body, {duration}s per cell, wrk on the same machine")
    header = f"{'conc':>4}  {'path':<30}{'RPS':>9}{'vs direct':>11}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
    print(header)
    print("-" * len(header))
    for concurrency in concurrencies:
        direct = results[("direct", concurrency)]
        for key, label in LABELS.items():
            r = results[(key, concurrency)]
            print(f"{concurrency:>4}  {label:<30}{r.rps:>9.0f}{r.rps / direct.rps:>11.1%}{r.p50_ms:>9.3f}"
                  f"{r.p99_ms:>9.3f}{r.errors:>8}")
        proc, null = results[("processor", concurrency)], results[("null", concurrency)]
        print(f"{'':>4}  added p50 over direct: {proc.p50_ms - direct.p50_ms:+.3f} ms "
              f"(gRPC hop {null.p50_ms - direct.p50_ms:+.3f}, policy work {proc.p50_ms - null.p50_ms:+.3f}); "
              f"quota adds {results[('quota-memory', concurrency)].p50_ms - proc.p50_ms:+.3f} (memory), "
              f"{results[('quota-redis', concurrency)].p50_ms - proc.p50_ms:+.3f} (Redis)")
    print("\nvs direct = RPS as a share of Envoy direct. The null row answers CONTINUE with the same message")
    print("pattern: it isolates the cost of the Python gRPC hop from the cost of our policy decisions.")


def print_cache(sidecar: SidecarSpec, calls: int) -> None:
    """A cache hit against the same call answered by the provider (the mock, through Envoy)."""
    url = f"http://127.0.0.1:{sidecar.listen_port}/v1/chat/completions"
    body = {"model": "auth_assistant", "temperature": 0, "messages": [{"role": "user", "content": "cached?"}]}
    cases = (("provider path (x-ai-cache: bypass)", {"x-ai-cache": "bypass"}), ("cache hit", {}))
    print(f"\nCacheable JSON chat completion, {calls} sequential calls each")
    header = f"{'path':<52}{'p50 ms':>10}{'p99 ms':>10}"
    print(header)
    print("-" * len(header))
    with httpx.Client(timeout=10) as client:
        client.post(url, json=body, headers={"host": "api.openai.com"})  # the miss that stores the entry
        time.sleep(0.5)
        for text, extra in cases:
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                response = client.post(url, json=body, headers={"host": "api.openai.com", **extra})
                times.append((time.perf_counter() - start) * 1000)
                expected = "hit" if not extra else None
                assert response.headers.get("x-ai-cache") == expected, response.headers
            times.sort()
            print(f"{text:<52}{statistics.median(times):>10.3f}{times[int(len(times) * 0.99) - 1]:>10.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
