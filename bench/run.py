"""Envoy direct vs Envoy + our processor, side by side, in one run.

Both paths use the same sidecar-shaped Envoy (rendered by the same code), the same client (wrk)
and the same fast fixed upstream (a second Envoy answering with a canned chat completion), so the
difference is our filter and processor: one ext_proc stream per call, decision on the full body,
routing by :authority rewrite, credential injection, body rewrite (logical → upstream model name).

Two more sections price what the closing note quotes: the latency a caller pays when its provider
fails and the call falls back to another (Anthropic 503 or reset, answered by OpenAI, translated back),
and the per-call cost of telemetry (access log, usage events on NATS JetStream and a file, OTLP traces).
The isolation section fails every call of one service at its provider while another service, sharing
the processor and the provider, is measured: alone, beside that failing load, and beside the same load succeeding.

Every overhead row reports the processor's and the sidecar Envoy's CPU per call (from /proc), and the
soak section (``--only soak``, not run by default) the processor's RSS every 100k calls up to 1M.

Usage: python -m bench.run [--duration 10] [--concurrency 1 16] [--only overhead,fallback,isolation,telemetry,soak]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import yaml

from devtools.launch import (
    Managed,
    find_envoy,
    free_port,
    start_envoy,
    start_mock_provider,
    start_processor,
)
from devtools.stack import ANTHROPIC_KEY, OPENAI_KEY, Stack
from extproc.envoy_config.bootstrap import SidecarSpec, to_yaml, upstream_for
from extproc.policy.loader import load_policy

BODY = json.dumps({"model": "auth_assistant", "messages": [{"role": "user", "content": "How do I reset my password?"}]})
REPLY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "gpt-4",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Use the reset link."},
                 "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
})
# wrk's own "Non-2xx or 3xx responses" counts only statuses >= 400: a 3xx (a fallback redirect that
# leaked to the caller) would pass as a success. Every script counts every status outside 2xx itself.
COUNT_NON_2XX = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) non2xx = 0 end
function response(status, headers, body) if status < 200 or status > 299 then non2xx = non2xx + 1 end end
function done(summary, latency, requests)
  local n = 0
  for _, t in ipairs(threads) do n = n + t:get("non2xx") end
  io.write(string.format("Responses outside 2xx: %d\\n", n))
end
"""
LUA = """wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["Host"] = "api.openai.com"
wrk.body = [[%s]]
""" + COUNT_NON_2XX.replace("%", "%%")


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
    errors: int  # non-2xx responses plus socket errors
    non2xx: int = 0
    requests: int = 0
    processor_us: float | None = None  # processor CPU (user + system, every thread) per call, from /proc
    envoy_us: float | None = None  # the sidecar Envoy's CPU per call


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def pid_of(part: Managed | None) -> int | None:
    return part.process.pid if part is not None and part.process is not None else None


def measured(url: str, script: Path, concurrency: int, duration: int, processor: Managed | None,
             envoy: Managed) -> Result:
    """One wrk cell, with the processor's and the Envoy's CPU per call over exactly that cell."""
    pids = (pid_of(processor), pid_of(envoy))
    before = [cpu_seconds(p) if p else 0.0 for p in pids]
    result = run_wrk(url, script, concurrency, duration)
    after = [cpu_seconds(p) if p else 0.0 for p in pids]
    calls = max(result.requests, 1)
    per_call = [(a - b) / calls * 1e6 for a, b in zip(after, before, strict=True)]
    return replace(result, processor_us=per_call[0] if pids[0] else None, envoy_us=per_call[1])


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    assert match, text
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk_command(url: str, script: Path, concurrency: int, duration: int) -> list[str]:
    threads = min(concurrency, 2)
    return ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{duration}s", "--latency", "-s", str(script), url]


def run_wrk(url: str, script: Path, concurrency: int, duration: int) -> Result:
    return parse_wrk(subprocess.run(wrk_command(url, script, concurrency, duration), capture_output=True, text=True,
                                    check=True).stdout)


def run_wrk_parallel(*runs: tuple[str, Path, int, int]) -> list[Result]:
    """Several wrk processes started together and waited for together: (url, script, concurrency, duration) each."""
    procs = [subprocess.Popen(wrk_command(*run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for run in runs]
    outputs = [proc.communicate() for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, stderr=err)
    return [parse_wrk(out) for out, _ in outputs]


def parse_wrk(out: str) -> Result:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Responses outside 2xx:\s+(\d+)", out)
    if non2xx is None:
        raise ValueError(f"wrk printed no count of responses outside 2xx (script without COUNT_NON_2XX?):\n{out}")
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = int(non2xx.group(1)) if non2xx else 0
    errors = bad + (sum(int(g) for g in socket_errors.groups()) if socket_errors else 0)
    return Result(rps, p50, p99, errors, bad, requests)


def wrk_script(path: Path, body: str, headers: dict[str, str]) -> Path:
    """A wrk script POSTing ``body`` with ``headers``."""
    lines = ['wrk.method = "POST"', *(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()),
             f"wrk.body = [[{body}]]"]
    path.write_text("\n".join(lines) + "\n" + COUNT_NON_2XX)
    return path


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
# label, policy, quota backend, whether the processor also writes the access log and usage events
VARIANTS: tuple[tuple[str, str, str, bool], ...] = (
    ("processor", ROUTING_ONLY, "memory", False),
    ("quota-memory", WITH_QUOTA, "memory", False),
    ("quota-redis", WITH_QUOTA, "redis", False),
    ("full", WITH_QUOTA, "redis", True),
    ("cache", WITH_CACHE, "memory", False),
)
LABELS = {
    "direct": "Envoy direct",
    "null": "Envoy + null Python ext_proc",
    "null-aio-uvloop": "  null, grpc.aio on uvloop",
    "null-sync": "  null, sync thread-pool server",
    "processor": "Envoy + processor (routing)",
    "quota-memory": "  + quota, memory store",
    "quota-redis": "  + quota, Redis store",
    "full": "  + Redis quota, log, events",
}


def policy_dir(work: Path, label: str, service_policy: str, backend: str, redis_url: str) -> Path:
    directory = work / f"policy-{label}"
    directory.mkdir()
    (directory / "mesh.yaml").write_text(MESH.format(backend=backend, redis_url=redis_url, run=uuid.uuid4().hex[:8]))
    (directory / "service.yaml").write_text(service_policy)
    return directory


SECTIONS = ("overhead", "streaming", "cache", "fallback", "isolation", "telemetry")
# Not run by default: a million calls take ~20 minutes on 2 cores (`--only soak`).
OPTIONAL_SECTIONS = ("soak",)


def sections(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(set(chosen) - set(SECTIONS) - set(OPTIONAL_SECTIONS))
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(f"sections are {', '.join(SECTIONS + OPTIONAL_SECTIONS)} (comma-separated), "
                                         f"not {', '.join(unknown) or repr(text)}")
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=sections, default=SECTIONS, metavar="SECTION[,SECTION]",
                        help=f"run only these sections: {', '.join(SECTIONS + OPTIONAL_SECTIONS)} (default: all "
                        f"but {', '.join(OPTIONAL_SECTIONS)})")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--stream-calls", type=int, default=200, help="sequential streamed calls per variant")
    parser.add_argument("--fallback-duration", type=int, default=5, help="seconds per fallback measurement")
    parser.add_argument("--fallback-concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--isolation-duration", type=int, default=5, help="seconds per isolation measurement")
    parser.add_argument("--isolation-concurrency", type=int, default=4,
                        help="connections for service B's wrk, and for service A's running beside it")
    parser.add_argument("--isolation-rounds", type=int, default=1,
                        help="repeat the isolation cells this many times, each on a fresh stack (~20 s each)")
    parser.add_argument("--telemetry-duration", type=int, default=5, help="seconds per telemetry measurement")
    parser.add_argument("--telemetry-concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222",
                        help="usage events for the telemetry section (skipped if nothing listens there)")
    parser.add_argument("--no-traces", action="store_true", help="telemetry section: leave out the OTLP row")
    parser.add_argument("--soak-calls", type=int, default=1_000_000, help="soak section: calls in all")
    parser.add_argument("--soak-concurrency", type=int, default=16)
    parser.add_argument("--soak-null", action="store_true", help="soak section: load the null processor alike")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("bench: wrk not found (Debian package `wrk`; `make bench` installs it)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    try:
        if {"overhead", "streaming", "cache", "soak"} & set(args.only):
            run_overhead(args, work)
        if "fallback" in args.only:
            print_fallback(args, work)
        if "isolation" in args.only:
            print_isolation(args, work)
        if "telemetry" in args.only:
            print_telemetry(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def start_fixed_upstream(work: Path) -> tuple[Managed, int]:
    port = free_port()
    config = work / "fixed-upstream.yaml"
    config.write_text(to_yaml(fixed_upstream_config(port, free_port())))
    return Managed("fixed-upstream", [find_envoy(), "-c", str(config), "--log-level", "warn", "--concurrency", "1",
                                      "--base-id", str(port)], log_dir=work).start_listening(port, 20), port


def run_overhead(args: argparse.Namespace, work: Path) -> None:
    """Envoy direct vs null ext_proc vs our processor (and quota, cache), then streaming and cache hits."""
    script = work / "post.lua"
    script.write_text(LUA % BODY)
    parts: list[Managed] = []
    env = {"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY}
    try:
        upstream, upstream_port = start_fixed_upstream(work)
        parts.append(upstream)
        mock_port = free_port()
        parts.append(start_mock_provider(mock_port, ["--openai-key", OPENAI_KEY], "openai", work))
        null_port = free_port()
        parts.append(Managed("null-processor", [sys.executable, "-m", "bench.null_processor",
                                                f"127.0.0.1:{null_port}"], log_dir=work).start_listening(null_port))
        processors: dict[str, int] = {"direct": 0, "null": null_port}
        managed: dict[str, Managed] = {"null": parts[-1]}
        for flavour in ("aio-uvloop", "sync"):  # the same null servicer on other gRPC servers (#16's levers)
            port = free_port()
            managed[f"null-{flavour}"] = Managed(f"null-{flavour}", [
                sys.executable, "-m", "bench.null_processor", f"127.0.0.1:{port}", "--flavour", flavour],
                log_dir=work).start_listening(port)
            parts.append(managed[f"null-{flavour}"])
            processors[f"null-{flavour}"] = port
        for label, service_policy, backend, telemetry in VARIANTS:
            port = free_port()
            extra = ["--watch", "0", *(full_telemetry(args, work) if telemetry else [])]
            managed[label] = start_processor([policy_dir(work, label, service_policy, backend, args.redis_url)], port,
                                             log_dir=work, env=env, extra_args=extra, name=label)
            parts.append(managed[label])
            processors[label] = port
        openai_provider = load_policy([work / "policy-processor"]).providers["openai"]
        sidecars: dict[str, SidecarSpec] = {}
        streaming: dict[str, SidecarSpec] = {}
        envoys: dict[str, Managed] = {}
        for label, port in processors.items():
            for table, upstream in ((sidecars, upstream_port), (streaming, mock_port)):
                spec = SidecarSpec(service=BENCH_SERVICE, namespace="bench", listen_port=free_port(),
                                   admin_port=free_port(), processor=("127.0.0.1", port or null_port),
                                   upstreams=(upstream_for(openai_provider, ("127.0.0.1", upstream)),),
                                   access_log=False, with_processor=label != "direct")
                parts.append(start_envoy(spec, work))
                table[label] = spec
                if table is sidecars:
                    envoys[label] = parts[-1]
        if "overhead" in args.only:
            results: dict[tuple[str, int], Result] = {}
            for concurrency in args.concurrency:
                for label in LABELS:
                    spec = sidecars[label]
                    url = f"http://127.0.0.1:{spec.listen_port}/v1/chat/completions"
                    run_wrk(url, script, concurrency, 2)  # warm-up: connections, caches, JIT-free but still
                    before = ext_proc_stats(spec.admin_port)
                    results[(label, concurrency)] = measured(url, script, concurrency, args.duration,
                                                             managed.get(label), envoys[label])
                    after = ext_proc_stats(spec.admin_port)
                    if label == "processor":
                        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                        calls = max(delta.get("streams_started", 0), 1)
                        print(f"  c={concurrency}: {calls} ext_proc streams; per call "
                              f"{delta.get('stream_msgs_sent', 0) / calls:.2f} messages to the processor, "
                              f"{delta.get('stream_msgs_received', 0) / calls:.2f} back, pipelined as one round "
                              f"trip; failed streams {delta.get('streams_failed', 0)}", flush=True)
            print_table(results, args.concurrency, args.duration)
        if "soak" in args.only:
            soak(args, script, sidecars["processor"], managed["processor"], managed["null"], sidecars["null"])
        if "streaming" in args.only:
            print_streaming(streaming, args.stream_calls)
        if "cache" in args.only:
            print_cache(streaming["cache"], args.stream_calls)
    finally:
        for part in reversed(parts):
            part.stop()


FALLBACK_SERVICE = "bench-fallback"
FALLBACK_POLICY = f"""\
providers:
- {{name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {{env: OPENAI_API_KEY}}}}
- {{name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {{env: ANTHROPIC_API_KEY}}}}
---
service: {FALLBACK_SERVICE}
ai_proxy:
  models:
  - name: fraud_detector
    provider: claude
    model: claude-3
    fallback: [openai/gpt-4o]
    circuit_breaker: {{enabled: false}}  # every failing call really tries claude first, none skips it
"""
ANTHROPIC_BODY = json.dumps({"model": "fraud_detector", "max_tokens": 30,
                             "messages": [{"role": "user", "content": "Score order 42 for fraud risk."}]})
ANTHROPIC_HEADERS = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
FALLBACK_HOPS = "claude/claude-3=upstream_error, openai/gpt-4o"
# key, label, fault headers (aimed at the Anthropic mock only), expected x-ai-fallback-hops
FALLBACK_MODES: tuple[tuple[str, str, dict[str, str], str | None], ...] = (
    ("claude", "claude answers (no fallback)", {}, None),
    ("503", "claude 503 -> openai answers", {"x-mock-only": "anthropic", "x-mock-status": "503"}, FALLBACK_HOPS),
    ("reset", "claude reset -> openai answers", {"x-mock-only": "anthropic", "x-mock-reset": "1"}, FALLBACK_HOPS),
)


def check_fallback(url: str) -> str | None:
    """One call per mode through httpx; what is wrong, if anything, before wrk measures it."""
    with httpx.Client(timeout=10) as client:
        for _, label, faults, hops in FALLBACK_MODES:
            response = client.post(url, content=ANTHROPIC_BODY, headers={**ANTHROPIC_HEADERS, **faults})
            got = response.headers.get("x-ai-fallback-hops")
            if response.status_code != 200 or got != hops:
                return (f"{label}: expected 200 with x-ai-fallback-hops {hops!r}, got {response.status_code} "
                        f"with {got!r}: {response.text[:200]}")
            if response.json().get("type") != "message":
                return f"{label}: not an Anthropic-format message: {response.text[:200]}"
    return None


RETRY_STATS = ("upstream_rq_retry", "upstream_rq_retry_overflow", "upstream_rq_retry_backoff_exponential")


def retry_stats(admin_port: int) -> dict[str, int]:
    """Envoy's retry counters summed over clusters: a fallback is Envoy retrying to the processor's relay."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?filter=upstream_rq_retry").read().decode()
    stats = dict.fromkeys(RETRY_STATS, 0)
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        stat = name.rsplit(".", 1)[-1]
        if stat in stats and value.strip().isdigit():
            stats[stat] += int(value)
    return stats


def envoy_admin_port(config: Path) -> int:
    """The admin port of an Envoy started by devtools.launch.start_envoy, read back from its config."""
    return int(yaml.safe_load(config.read_text())["admin"]["address"]["socket_address"]["port_value"])


def print_fallback(args: argparse.Namespace, work: Path) -> None:
    """What a caller pays when its provider fails and the call is answered by the fallback instead."""
    policies = work / "policy-fallback"
    policies.mkdir()
    (policies / "policy.yaml").write_text(FALLBACK_POLICY)
    logs = work / "fallback"
    logs.mkdir()
    duration = args.fallback_duration
    print(f"\nFallback cost: POST /v1/messages (Anthropic format, not streamed, {len(ANTHROPIC_BODY)} B body), "
          f"fraud_detector = claude/claude-3 with fallback openai/gpt-4o, circuit breaker off; mock providers; "
          f"{duration}s per cell", flush=True)
    stack = Stack(policies, logs, services=[FALLBACK_SERVICE], processor_args=["--watch", "0"])
    try:
        url = f"{stack.base_url(FALLBACK_SERVICE)}/v1/messages"
        problem = check_fallback(url)
        if problem:
            print(f"fallback: SKIPPED, the call does not fall back as it should: {problem}", flush=True)
            return
        print(f"  checked: 503 and reset both answered 200 with x-ai-fallback-hops: {FALLBACK_HOPS}")
        admin = envoy_admin_port(logs / f"envoy-{FALLBACK_SERVICE}.yaml")
        results: dict[tuple[str, int], Result] = {}
        retries: dict[tuple[str, int], dict[str, int]] = {}
        for concurrency in args.fallback_concurrency:
            for key, _, faults, _ in FALLBACK_MODES:
                script = wrk_script(work / f"fallback-{key}.lua", ANTHROPIC_BODY, {**ANTHROPIC_HEADERS, **faults})
                run_wrk(url, script, concurrency, 1)  # warm-up
                before = retry_stats(admin)
                results[(key, concurrency)] = run_wrk(url, script, concurrency, duration)
                after = retry_stats(admin)
                retries[(key, concurrency)] = {k: after[k] - before[k] for k in RETRY_STATS}
    finally:
        stack.close()
    header = (f"{'conc':>4}  {'path':<32}{'RPS':>9}{'vs no fb':>10}{'p50 ms':>9}{'p99 ms':>9}{'p50 x':>7}"
              f"{'non-2xx':>9}{'errors':>8}")
    print(header)
    print("-" * len(header))
    for concurrency in args.fallback_concurrency:
        base = results[("claude", concurrency)]
        for key, label, _, _ in FALLBACK_MODES:
            r = results[(key, concurrency)]
            print(f"{concurrency:>4}  {label:<32}{r.rps:>9.0f}{r.rps / base.rps:>10.1%}{r.p50_ms:>9.3f}"
                  f"{r.p99_ms:>9.3f}{r.p50_ms / base.p50_ms:>7.2f}{r.non2xx:>9}{r.errors:>8}")
        added = "; ".join(f"{key}: p50 {results[(key, concurrency)].p50_ms - base.p50_ms:+.3f} ms, "
                          f"p99 {results[(key, concurrency)].p99_ms - base.p99_ms:+.3f} ms"
                          for key, _, _, _ in FALLBACK_MODES[1:])
        print(f"{'':>4}  added over no fallback: {added}")
        envoy = "; ".join(f"{key} {retries[(key, concurrency)]['upstream_rq_retry']}/"
                          f"{retries[(key, concurrency)]['upstream_rq_retry_overflow']} "
                          f"(wrk counted {results[(key, concurrency)].requests} calls)"
                          for key, _, _, _ in FALLBACK_MODES[1:])
        print(f"{'':>4}  Envoy retries to the relay / retry overflows (no fallback at all): {envoy}")
    failed = [(key, c) for (key, c), r in results.items() if r.errors]
    if failed:
        print(f"\nWARNING: errors in {', '.join(f'{key} at c={c}' for key, c in failed)}: those rows are not all "
              "fallback calls. Retry overflow means Envoy did not\nfall back at all and the caller got claude's error: "
              "the cluster circuit breaker's max_retries (Envoy's default is 3)\ncaps how many calls can be falling "
              "back at once.")
    print("\nvs no fb = RPS as a share of the no-fallback row, p50 x = its p50 as a multiple of that row's. A fallback")
    print("call makes both attempts (claude fails, then openai through the processor's relay) and translates the")
    print("OpenAI answer back to Anthropic format; Envoy waits a jittered retry back-off (25 ms base unless set)")
    print("before the second attempt. errors = non-2xx plus wrk socket errors (both should be 0).")


ISOLATION_A, ISOLATION_B = "service-a", "service-b"
ISOLATION_POLICIES = {
    "mesh.yaml": """\
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_API_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_API_KEY}}
""",
    # The mesh's default circuit breaker guards fraud_detector (it has a fallback); chat has none.
    f"{ISOLATION_A}.yaml": f"""\
service: {ISOLATION_A}
ai_proxy:
  models: [{{name: fraud_detector, provider: claude, model: claude-3, fallback: [openai/gpt-4o]}}]
""",
    f"{ISOLATION_B}.yaml": f"""\
service: {ISOLATION_B}
ai_proxy:
  models: [{{name: chat, provider: claude, model: claude-3}}]
""",
}
ISOLATION_B_BODY = json.dumps({"model": "chat", "max_tokens": 30,
                               "messages": [{"role": "user", "content": "Summarise ticket 7 in one line."}]})
CLAUDE_503 = {"x-mock-only": "anthropic", "x-mock-status": "503"}


def processor_samples(admin_port: int, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called ``name`` on the processor's admin /metrics."""
    from prometheus_client.parser import text_string_to_metric_families  # the processor's own dependency

    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics").read().decode()
    return [(sample.labels, sample.value) for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name]


def fallbacks(admin_port: int, service: str) -> dict[str, int]:
    """ai_extproc_fallbacks_total for one service, by reason (upstream_error: via the relay after the
    provider failed; breaker_open: the provider skipped, its breaker open)."""
    counts: dict[str, int] = {}
    for labels, value in processor_samples(admin_port, "ai_extproc_fallbacks_total"):
        if labels.get("service") == service:
            counts[labels["reason"]] = counts.get(labels["reason"], 0) + int(value)
    return counts


def breaker_states(admin_port: int) -> dict[str, str]:
    """ai_extproc_breaker_state per service, as 'provider/model=state' (0 closed, 1 half-open, 2 open)."""
    names = {0: "closed", 1: "half-open", 2: "open"}
    states: dict[str, list[str]] = {}
    for labels, value in processor_samples(admin_port, "ai_extproc_breaker_state"):
        states.setdefault(labels["service"], []).append(
            f"{labels['provider']}/{labels['gen_ai_request_model']}={int(value)} "
            f"({names.get(int(value), '?')})")
    return {service: ", ".join(sorted(found)) for service, found in states.items()}


def check_isolation(url_a: str, url_b: str) -> str | None:
    """One call each through httpx: B answered by claude, A by claude, A with claude failing by openai."""
    cases = (("service-b", url_b, ISOLATION_B_BODY, {}, None),
             ("service-a", url_a, ANTHROPIC_BODY, {}, None),
             ("service-a, claude 503", url_a, ANTHROPIC_BODY, CLAUDE_503, FALLBACK_HOPS))
    with httpx.Client(timeout=10) as client:
        for label, url, body, faults, hops in cases:
            response = client.post(url, content=body, headers={**ANTHROPIC_HEADERS, **faults})
            got = response.headers.get("x-ai-fallback-hops")
            if response.status_code != 200 or got != hops or response.json().get("type") != "message":
                return (f"{label}: expected an Anthropic-format 200 with x-ai-fallback-hops {hops!r}, got "
                        f"{response.status_code} with {got!r}: {response.text[:200]}")
    return None


@dataclass(frozen=True)
class IsolationCell:
    b: Result
    a: Result | None  # None: B alone
    fallbacks_a: dict[str, int]  # by reason, during the cell
    fallbacks_b: dict[str, int]


ISOLATION_CASES = ("alone", "failing", "control")  # printed in this order; measured as alone, control, failing
ISOLATION_LABELS = {"alone": f"(1) {ISOLATION_B} alone",
                    "failing": f"(2) + {ISOLATION_A}, claude 503 for all of A",
                    "control": f"(3) + {ISOLATION_A} succeeding (control)"}


def measure_isolation(args: argparse.Namespace, work: Path, policies: Path, logs: Path
                      ) -> tuple[dict[str, IsolationCell], dict[str, str], dict[str, str]] | None:
    """One round on a fresh Stack: the cells, and the breaker states before (1) and after (2)."""
    concurrency, duration = args.isolation_concurrency, args.isolation_duration
    stack = Stack(policies, logs, services=[ISOLATION_A, ISOLATION_B], processor_args=["--watch", "0"])
    admin = stack.admin_port
    script_b = wrk_script(work / "isolation-b.lua", ISOLATION_B_BODY, ANTHROPIC_HEADERS)
    script_a_ok = wrk_script(work / "isolation-a-ok.lua", ANTHROPIC_BODY, ANTHROPIC_HEADERS)
    script_a_503 = wrk_script(work / "isolation-a-503.lua", ANTHROPIC_BODY, {**ANTHROPIC_HEADERS, **CLAUDE_503})
    cells: dict[str, IsolationCell] = {}
    try:
        url_a = f"{stack.base_url(ISOLATION_A)}/v1/messages"
        url_b = f"{stack.base_url(ISOLATION_B)}/v1/messages"
        problem = check_isolation(url_a, url_b)
        if problem:
            print(f"isolation: SKIPPED, a call is not answered as it should be: {problem}", flush=True)
            return None
        run_wrk_parallel((url_b, script_b, concurrency, 1), (url_a, script_a_ok, concurrency, 1))  # warm-up
        breakers_before = breaker_states(admin)
        # Order 1, 3, 2: after (2) A's breaker stays open (30 s by default) and would change the control.
        for key, script_a in (("alone", None), ("control", script_a_ok), ("failing", script_a_503)):
            before_a, before_b = fallbacks(admin, ISOLATION_A), fallbacks(admin, ISOLATION_B)
            if script_a is None:
                b, a = run_wrk(url_b, script_b, concurrency, duration), None
            else:
                b, a = run_wrk_parallel((url_b, script_b, concurrency, duration),
                                        (url_a, script_a, concurrency, duration))
            after_a, after_b = fallbacks(admin, ISOLATION_A), fallbacks(admin, ISOLATION_B)
            cells[key] = IsolationCell(b, a, {k: v - before_a.get(k, 0) for k, v in after_a.items()},
                                       {k: v - before_b.get(k, 0) for k, v in after_b.items()})
        return cells, breakers_before, breaker_states(admin)
    finally:
        stack.close()


def print_isolation(args: argparse.Namespace, work: Path) -> None:
    """Service A's provider failing every one of A's calls while service B, on the same processor and the same
    provider, keeps succeeding: B's latency with A failing vs A succeeding (control) vs B alone."""
    policies = work / "policy-isolation"
    policies.mkdir()
    for name, text in ISOLATION_POLICIES.items():
        (policies / name).write_text(text)
    duration, concurrency, rounds = args.isolation_duration, args.isolation_concurrency, args.isolation_rounds
    print(f"\nIsolation: POST /v1/messages (Anthropic format, not streamed) through each service's own Envoy, one "
          f"processor, one mock per provider;\n{ISOLATION_B} chat = claude/claude-3 (no fallback), {ISOLATION_A} "
          f"fraud_detector = claude/claude-3 with fallback openai/gpt-4o (default breaker);\nc={concurrency} per "
          f"service, {duration}s per cell, both wrk processes started together; measured in the order 1, 3, 2"
          + (f"; {rounds} rounds, each on a fresh stack" if rounds > 1 else ""), flush=True)
    header = (f"{'':<42}{'B RPS':>8}{'B p50 ms':>10}{'B p99 ms':>10}{'B non-2xx':>11}{'B errors':>10}"
              f"{'A RPS':>8}{'A non-2xx':>11}{'A fallbacks':>13}")
    comparisons = (("(2) vs (3), A's failures", "failing", "control"), ("(2) vs (1)", "failing", "alone"),
                   ("(3) vs (1), sharing the CPU", "control", "alone"))
    p50_diffs: dict[str, list[float]] = {text: [] for text, _, _ in comparisons}
    p50_ratios: dict[str, list[float]] = {text: [] for text, _, _ in comparisons}
    problems: list[str] = []
    for number in range(1, rounds + 1):
        logs = work / f"isolation-{number}"
        logs.mkdir()
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        measured = measure_isolation(args, work, policies, logs)
        if measured is None:
            return
        cells, breakers_before, breakers_after = measured
        if number == 1:
            print(f"  checked: both services answered by claude; {ISOLATION_A} with claude 503 answered 200 with "
                  f"x-ai-fallback-hops: {FALLBACK_HOPS}")
        print(f"{f'round {number}, ' if rounds > 1 else ''}load average before: {load} ({os.cpu_count()} CPUs)")
        print(header)
        print("-" * len(header))
        for key in ISOLATION_CASES:
            cell = cells[key]
            b, a = cell.b, cell.a
            a_cols = (f"{a.rps:>8.0f}{a.non2xx:>11}{sum(cell.fallbacks_a.values()):>13}" if a
                      else f"{'-':>8}{'-':>11}{'-':>13}")
            print(f"{ISOLATION_LABELS[key]:<42}{b.rps:>8.0f}{b.p50_ms:>10.3f}{b.p99_ms:>10.3f}{b.non2xx:>11}"
                  f"{b.errors:>10}{a_cols}")
        for text, x_key, y_key in comparisons:
            x, y = cells[x_key].b, cells[y_key].b
            p50_diffs[text].append(x.p50_ms - y.p50_ms)
            p50_ratios[text].append(x.p50_ms / y.p50_ms)
            print(f"  B p50 {text:<28}{x.p50_ms - y.p50_ms:+8.3f} ms  x{x.p50_ms / y.p50_ms:.2f}   "
                  f"(p99 {x.p99_ms - y.p99_ms:+.3f} ms, x{x.p99_ms / y.p99_ms:.2f}; RPS x{x.rps / y.rps:.2f})")
        failing = cells["failing"]
        assert failing.a is not None
        print(f"  {ISOLATION_A} in (2): {failing.a.requests} calls counted by wrk (calls cut off at the end are not), "
              f"{failing.a.non2xx} non-2xx; fallbacks taken {sum(failing.fallbacks_a.values())}: "
              + (", ".join(f"{reason} {n}" for reason, n in sorted(failing.fallbacks_a.items())) or "none"))
        print("    (upstream_error = claude tried, answered 503, relayed to openai; breaker_open = claude skipped, "
              "straight to openai)")
        print(f"  {ISOLATION_A} fallbacks in (1)/(3): {sum(cells['alone'].fallbacks_a.values())}/"
              f"{sum(cells['control'].fallbacks_a.values())}; {ISOLATION_B} fallbacks in (1)/(2)/(3): "
              + "/".join(str(sum(cells[k].fallbacks_b.values())) for k in ISOLATION_CASES))
        for when, states in (("before (1)", breakers_before), ("after (2)", breakers_after)):
            print(f"  ai_extproc_breaker_state {when}: " + "; ".join(
                f"{service}: {states.get(service, 'no series')}" for service in (ISOLATION_A, ISOLATION_B)))
        tag = f"round {number}: " if rounds > 1 else ""
        problems += [f"{tag}{ISOLATION_LABELS[k].split(')')[0]}) {ISOLATION_B} had {cells[k].b.errors} errors"
                     for k in ISOLATION_CASES if cells[k].b.errors]
        problems += [f"{tag}{ISOLATION_LABELS[k].split(')')[0]}) {ISOLATION_A} had {a.errors} errors"
                     for k in ("failing", "control") if (a := cells[k].a) is not None and a.errors]
        b_open = [s for s in breakers_after.get(ISOLATION_B, "").split(", ") if s and "=0 " not in s]
        if b_open:
            problems.append(f"{tag}{ISOLATION_B}'s breaker is not closed: {', '.join(b_open)}")
        if not sum(failing.fallbacks_a.values()):
            problems.append(f"{tag}{ISOLATION_A}'s calls did not fall back in (2)")
    if rounds > 1:
        print(f"\nOver {rounds} rounds, median (min .. max):")
        for text, _, _ in comparisons:
            d, r = p50_diffs[text], p50_ratios[text]
            print(f"  B p50 {text:<28}{statistics.median(d):+8.3f} ms ({min(d):+.3f} .. {max(d):+.3f})  "
                  f"x{statistics.median(r):.2f} (x{min(r):.2f} .. x{max(r):.2f})")
    for problem in problems:
        print(f"WARNING: {problem}")
    print(f"\n(2) and (3) run the same closed-loop load of {ISOLATION_A} (c={concurrency}) beside {ISOLATION_B}; only "
          "whether claude fails A's calls\ndiffers, so B's p50 in (2) vs (3) is what A's provider at 100% errors "
          "costs B. A's breaker is A's own (per service,\nprovider and model): B's calls keep going to claude and "
          "succeed, B's breaker stays closed (or never exists: chat\nhas no fallback). A's failures change only what "
          "A's own calls cost and where they go: the first few take the relay\nhop and the OpenAI<->Anthropic "
          "translation, then A's breaker opens and they go straight to openai (translated),\nwhich also moves A's "
          "load off the claude mock B uses. (3) vs (1) is not isolation but CPU sharing: "
          f"{os.cpu_count()} cores\nrun both wrk processes, both Envoys, the mocks and the one processor, so any "
          "second service's load slows B,\nfailing or not. A's RPS differs between (2) and (3), and a single "
          f"{duration} s cell on a shared machine moves B's p50 by\nmilliseconds (see the load average), so judge "
          "(2) vs (3) against that spread (--isolation-rounds N repeats it).")


class OtlpSink:
    """A local OTLP/HTTP trace endpoint that accepts every export with a 200 and counts them."""

    def __init__(self) -> None:
        from aiohttp import web  # the processor's own dependency; only this section needs it here

        self.port = free_port()
        self.exports = 0
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def traces(request: web.Request) -> web.Response:
            await request.read()
            self.exports += 1
            return web.Response(status=200, content_type="application/x-protobuf")

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            app = web.Application()
            app.router.add_post("/v1/traces", traces)
            runner = web.AppRunner(app, access_log=None)
            self._loop.run_until_complete(runner.setup())
            self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


EVENTS_STREAM = "BENCH_USAGE"


def nats_reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=1):
            return True
    except OSError:
        return False


async def _jetstream(url: str, delete: bool) -> int | None:
    """Messages in the bench stream (None: no such stream), deleting it afterwards if asked."""
    import nats
    from nats.js.errors import NotFoundError

    connection = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = connection.jetstream()
        try:
            messages: int | None = (await js.stream_info(EVENTS_STREAM)).state.messages
        except NotFoundError:
            return None
        if delete:
            await js.delete_stream(EVENTS_STREAM)
        return messages
    finally:
        await connection.close()


def lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(1 for _ in handle)
    except OSError:
        return 0


def print_telemetry(args: argparse.Namespace, work: Path) -> None:
    """The processor row of the overhead table, plain vs with every telemetry sink on."""
    duration = args.telemetry_duration
    nats_on = nats_reachable(args.nats_url)
    print(f"\nTelemetry cost: POST /v1/chat/completions, {len(BODY)} B body (the processor row: routing only, fixed "
          f"upstream), {duration}s per cell", flush=True)
    if nats_on:
        try:
            asyncio.run(_jetstream(args.nats_url, delete=True))  # leftovers of an interrupted run
        except Exception as exc:  # e.g. a NATS server without JetStream
            nats_on = False
            print(f"  NATS at {args.nats_url} unusable ({exc!r}): NATS skipped, usage events go to the file only")
    else:
        print(f"  NATS not reachable at {args.nats_url}: NATS skipped, usage events go to the file only")
    events = ["--events-file"]
    if nats_on:
        events = ["--events-nats", args.nats_url, "--events-prefix", "bench.usage", "--events-stream", EVENTS_STREAM,
                  *events]
    sinks = "access log, events " + ("NATS + file" if nats_on else "file")
    modes: list[tuple[str, str, list[str]]] = [
        ("plain", "plain (no telemetry)", []),
        ("sinks", f"+ {sinks}", ["--access-log", str(work / "access-sinks.jsonl"),
                                 *events, str(work / "events-sinks.jsonl")]),
    ]
    receiver = None if args.no_traces else OtlpSink()
    if receiver:
        modes.append(("traces", "  + OTLP/HTTP traces", [
            "--access-log", str(work / "access-traces.jsonl"), *events, str(work / "events-traces.jsonl"),
            "--trace-exporter", "otlp-http", "--trace-endpoint", receiver.url]))
    script = work / "post.lua"
    script.write_text(LUA % BODY)
    env = {"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY}
    parts: list[Managed] = []
    results: dict[tuple[str, int], Result] = {}
    sent: dict[str, int] = {}
    notes: list[str] = []
    try:
        upstream, upstream_port = start_fixed_upstream(work)
        parts.append(upstream)
        urls: dict[str, str] = {}
        for key, _, extra in modes:
            port = free_port()
            directory = policy_dir(work, f"telemetry-{key}", ROUTING_ONLY, "memory", args.redis_url)
            parts.append(start_processor([directory], port, log_dir=work, env=env, name=f"processor-{key}",
                                         extra_args=["--watch", "0", *extra]))
            provider = load_policy([directory]).providers["openai"]
            spec = SidecarSpec(service=BENCH_SERVICE, namespace="bench", listen_port=free_port(),
                               admin_port=free_port(), processor=("127.0.0.1", port),
                               upstreams=(upstream_for(provider, ("127.0.0.1", upstream_port)),), access_log=False)
            parts.append(start_envoy(spec, work))
            urls[key] = f"http://127.0.0.1:{spec.listen_port}/v1/chat/completions"
        for concurrency in args.telemetry_concurrency:
            for key, _, _ in modes:
                warm = run_wrk(urls[key], script, concurrency, 1)
                results[(key, concurrency)] = result = run_wrk(urls[key], script, concurrency, duration)
                sent[key] = sent.get(key, 0) + warm.requests + result.requests
        time.sleep(2)  # events and span batches are sent after the answer: let the last ones land
        calls = sum(sent[key] for key, _, _ in modes[1:])
        counts = [(key, lines(work / f"access-{key}.jsonl"), lines(work / f"events-{key}.jsonl"))
                  for key, _, _ in modes[1:]]
        notes.append("telemetry written (calls including warm-ups / access log lines / events file lines): "
                     + "; ".join(f"{key} {sent[key]}/{log}/{events}" for key, log, events in counts))
        stored = asyncio.run(_jetstream(args.nats_url, delete=False)) if nats_on else calls
        if nats_on:
            notes.append(f"NATS stream {EVENTS_STREAM}: {stored} usage events for {calls} calls")
        if receiver:
            notes.append(f"OTLP receiver: {receiver.exports} trace export requests (spans are batched)")
        # wrk counts finished calls only, so a sink may hold a few more (the calls cut off at the end).
        if (stored or 0) < calls or any(log < sent[key] or events < sent[key] for key, log, events in counts):
            notes.append("WARNING: not every call was recorded by every sink")
    finally:
        for part in reversed(parts):
            part.stop()
        if receiver:
            receiver.close()
        if nats_on:
            try:
                asyncio.run(_jetstream(args.nats_url, delete=True))
            except Exception as exc:  # the bench's numbers are printed already; say why the stream stayed
                print(f"  could not delete NATS stream {EVENTS_STREAM}: {exc!r}", file=sys.stderr)
    header = f"{'conc':>4}  {'processor':<36}{'RPS':>9}{'vs plain':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
    print(header)
    print("-" * len(header))
    for concurrency in args.telemetry_concurrency:
        plain = results[("plain", concurrency)]
        for key, label, _ in modes:
            r = results[(key, concurrency)]
            print(f"{concurrency:>4}  {label:<36}{r.rps:>9.0f}{r.rps / plain.rps:>10.1%}{r.p50_ms:>9.3f}"
                  f"{r.p99_ms:>9.3f}{r.errors:>8}")
        added = "; ".join(f"{key} p50 {(results[(key, concurrency)].p50_ms - plain.p50_ms) * 1000:+.0f} µs, "
                          f"1/RPS {(1e6 / results[(key, concurrency)].rps - 1e6 / plain.rps):+.0f} µs"
                          for key, _, _ in modes[1:])
        print(f"{'':>4}  added per call over plain: {added}")
    for note in notes:
        print(f"  {note}")
    print("\nThe added p50 is what one caller waits; 1/RPS is the wall time per call at that concurrency (with")
    print("enough callers to keep both cores busy it is the throughput cost). All rows: same Envoy, same fixed")
    print("upstream, same routing-only policy; only the processor's telemetry flags differ.")


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
    header = (f"{'conc':>4}  {'path':<30}{'RPS':>9}{'vs direct':>11}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
              f"{'proc µs/call':>14}{'Envoy µs/call':>15}{'Envoy added':>13}")
    print(header)
    print("-" * len(header))
    for concurrency in concurrencies:
        direct = results[("direct", concurrency)]
        for key, label in LABELS.items():
            r = results[(key, concurrency)]
            proc_us = "-" if r.processor_us is None else f"{r.processor_us:.0f}"
            envoy_us = "-" if r.envoy_us is None else f"{r.envoy_us:.0f}"
            added = "-" if r.envoy_us is None or direct.envoy_us is None or key == "direct" else (
                f"{r.envoy_us - direct.envoy_us:+.0f}")
            print(f"{concurrency:>4}  {label:<30}{r.rps:>9.0f}{r.rps / direct.rps:>11.1%}{r.p50_ms:>9.3f}"
                  f"{r.p99_ms:>9.3f}{r.errors:>8}{proc_us:>14}{envoy_us:>15}{added:>13}")
        proc, null = results[("processor", concurrency)], results[("null", concurrency)]
        print(f"{'':>4}  added p50 over direct: {proc.p50_ms - direct.p50_ms:+.3f} ms "
              f"(gRPC hop {null.p50_ms - direct.p50_ms:+.3f}, policy work {proc.p50_ms - null.p50_ms:+.3f}); "
              f"quota adds {results[('quota-memory', concurrency)].p50_ms - proc.p50_ms:+.3f} (memory), "
              f"{results[('quota-redis', concurrency)].p50_ms - proc.p50_ms:+.3f} (Redis)")
    print("\nvs direct = RPS as a share of Envoy direct. The null row answers CONTINUE with the same message")
    print("pattern: it isolates the cost of the Python gRPC hop from the cost of our policy decisions.")
    print("µs/call = CPU (user + system, all threads, /proc/<pid>/stat) over the cell / calls served; Envoy added =")
    print("the sidecar's µs/call minus Envoy direct's (what our filters cost Envoy). 'full' = token and request")
    print("limits in Redis, usage settled from the response, access log and usage events (file and NATS) on.")


def full_telemetry(args: argparse.Namespace, work: Path) -> list[str]:
    """The processor flags of the 'full' row: access log, usage events to a file and (if reachable) NATS."""
    nats = ["--events-nats", args.nats_url] if nats_reachable(args.nats_url) else []
    return ["--access-log", str(work / "full-access.jsonl"), "--events-file", str(work / "full-events.jsonl"), *nats]


def soak(args: argparse.Namespace, script: Path, spec: SidecarSpec, processor: Managed, null: Managed,
         null_spec: SidecarSpec) -> None:
    """RSS of the routing processor every 100k calls (with --soak-null, the null processor's too, loaded alike:
    the gRPC floor's own growth)."""
    step, total = 100_000, args.soak_calls
    runs = [(f"http://127.0.0.1:{spec.listen_port}/v1/chat/completions", script, args.soak_concurrency, 5)]
    pids = [pid_of(processor)]
    if args.soak_null:
        runs.append((f"http://127.0.0.1:{null_spec.listen_port}/v1/chat/completions", script,
                     args.soak_concurrency, 5))
        pids.append(pid_of(null))
    print(f"\nSoak: {total:,} calls at concurrency {args.soak_concurrency} to the routing processor"
          f"{' (and as many to the null processor)' if args.soak_null else ''}, RSS every 100k")
    header = f"{'calls':>10}{'processor RSS MB':>18}{'null RSS MB':>13}{'errors':>8}{'proc µs/call':>14}"
    print(header)
    print("-" * len(header))
    done, errors, rows = 0, 0, []
    while done < total:
        chunk = 0
        before = cpu_seconds(pids[0] or 0)
        while chunk < step:  # wrk runs for a time, not a count: run until this 100k is complete
            results = run_wrk_parallel(*runs)
            chunk += results[0].requests
            errors += sum(r.errors for r in results)
        done += chunk
        per_call = (cpu_seconds(pids[0] or 0) - before) / chunk * 1e6
        rss = [rss_mb(pid) if pid else 0.0 for pid in pids] + [0.0]
        rows.append((done, rss[0], rss[1]))
        null_text = f"{rss[1]:>13.1f}" if args.soak_null else f"{'-':>13}"
        print(f"{done:>10,}{rss[0]:>18.1f}{null_text}{errors:>8}{per_call:>14.0f}", flush=True)
    first, last = rows[0], rows[-1]
    growth = f"{first[1]:.1f} → {last[1]:.1f} MB ({(last[1] - first[1]) / first[1]:+.1%})"
    null_growth = (f"; null processor {first[2]:.1f} → {last[2]:.1f} MB ({(last[2] - first[2]) / first[2]:+.1%})"
                   if args.soak_null else "")
    print(f"processor RSS from {first[0]:,} to {last[0]:,} calls: {growth}{null_growth}")


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
