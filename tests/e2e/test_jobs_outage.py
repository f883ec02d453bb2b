"""Asynchronous calls while NATS is down or frozen: a quick 503, never Envoy's 504 after its 5 s
ext_proc message timeout.

Each test runs its own nats-server (stopped, restarted or frozen with SIGSTOP: the machine's shared one
on :4222 is never touched) and checks the job store, the decision (submission and poll) and, through
the real Envoy, what the caller gets, with the time it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import orjson
import pytest

from devtools.launch import free_port
from devtools.stack import Stack
from extproc.cache.store import ResponseCache
from extproc.core.credentials import CredentialStore
from extproc.core.decision import Decider, Exchange, HttpRequest, LocalReply
from extproc.core.identity import ATTR_APP, ATTR_NAMESPACE
from extproc.core.runtime import Runtime
from extproc.jobs import Job, JobNames, JobStore, StoreUnavailable
from extproc.policy.loader import load_policy
from extproc.policy.model import CacheSettings, QuotaSettings
from extproc.quota.engine import QuotaEngine
from tests.conftest import jetstream_answers, missing

T = TypeVar("T")
MESSAGE_TIMEOUT_S = 5.0  # Envoy's ext_proc message_timeout (extproc/envoy_config/filter.py)
REQUEST_TIMEOUT_S = 1.0  # JobStore's default bound on what a caller waits for
FAST_S = 0.1  # "at once": no round trip to NATS at all (generous for a busy CI machine)
QUICK_S = 0.4  # a whole call through Envoy that does not wait on NATS
POLICY = """\
providers:
- {name: openai, api: openai, base_url: http://api.openai.com/v1, credential: {env: OPENAI_API_KEY}}
- {name: claude, api: anthropic, base_url: http://api.anthropic.com/v1, credential: {env: ANTHROPIC_API_KEY}}
---
service: order-service
ai_proxy:
  models:
  - {name: fraud_detector, provider: claude, model: claude-3}
  - {name: summariser, provider: openai, model: gpt-4}
"""


class PrivateNats:
    """A nats-server with JetStream on a free port, that a test may stop, restart, freeze and thaw."""

    def __init__(self, store_dir: Path) -> None:
        binary = shutil.which("nats-server") or next(
            (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if os.path.exists(p)), None)
        if binary is None:
            missing("no nats-server binary to start a private NATS")
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._command = [str(binary), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(store_dir)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateNats:
        self.process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not jetstream_answers(self.port):
            if time.monotonic() > deadline:
                missing("a private nats-server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def freeze(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    server = PrivateNats(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


async def timed(call: Awaitable[T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = await call
    return result, time.perf_counter() - started


async def refused(call: Awaitable[object]) -> tuple[StoreUnavailable, float]:
    started = time.perf_counter()
    with pytest.raises(StoreUnavailable) as caught:
        await call
    return caught.value, time.perf_counter() - started


def a_job() -> Job:
    return Job.new(service="order-service", namespace="shop", api="anthropic", path="/v1/messages",
                   headers=[("content-type", "application/json")], body=b'{"model":"fraud_detector"}')


def make_decider(tmp_path: Path, store: JobStore) -> Decider:
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "policy.yaml").write_text(POLICY)
    policy = load_policy([tmp_path / "policy"])
    env = {"OPENAI_API_KEY": "sk-openai", "ANTHROPIC_API_KEY": "sk-ant"}
    return Decider(Runtime(lambda: policy, CredentialStore(environ=env), QuotaEngine(QuotaSettings()),
                           ResponseCache(CacheSettings()), jobs=store))


def http_request(path: str, method: str = "POST", headers: dict[str, str] | None = None) -> HttpRequest:
    return HttpRequest(method, path, "api.anthropic.com", {"content-type": "application/json", **(headers or {})},
                       {ATTR_NAMESPACE: "shop", ATTR_APP: "order-service"})


async def submit_call(decider: Decider) -> LocalReply:
    """An Anthropic call with ``Prefer: respond-async``, decided as the processor would."""
    exchange = decider.on_headers(http_request("/v1/messages", headers={"prefer": "respond-async"}), False)
    assert isinstance(exchange, Exchange), exchange
    body = orjson.dumps({"model": "fraud_detector", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    reply = await exchange.on_body(body)
    assert isinstance(reply, LocalReply), reply
    return reply


async def poll_call(decider: Decider, job_id: str) -> LocalReply:
    lookup = decider.on_headers(http_request(f"/v1/ai-jobs/{job_id}", "GET"), True)
    reply = await lookup.reply()  # type: ignore[union-attr]
    assert isinstance(reply, LocalReply), reply
    return reply


def code_of(reply: LocalReply) -> str:
    error = orjson.loads(reply.body)["error"]
    return str(error.get("code") or error.get("type"))


async def connected(url: str) -> JobStore:
    return await JobStore(JobNames.prefixed(f"o{uuid.uuid4().hex[:8]}")).connect(url)


async def until_connected(store: JobStore, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await store.get("0" * 32)
            return
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


# --- the job store and the decision ----------------------------------------------------------------------

def test_nats_down_refuses_submissions_and_polls_at_once(private_nats: PrivateNats, tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await connected(private_nats.url)
        decider = make_decider(tmp_path, store)
        try:
            accepted = await submit_call(decider)
            assert accepted.status == 202, accepted.body
            job_id = orjson.loads(accepted.body)["id"]
            assert (await poll_call(decider, job_id)).status == 202  # pending: no worker here

            private_nats.stop()
            await asyncio.sleep(0.2)  # the client sees the connection close and starts reconnecting
            error, took = await refused(store.submit(a_job()))
            assert took < FAST_S and "reconnecting" in str(error)
            error, took = await refused(store.get(job_id))
            assert took < FAST_S
            # What the caller gets: the documented 503s, in its own format, well inside Envoy's timeout.
            reply, took = await timed(submit_call(decider))
            assert (reply.status, code_of(reply)) == (503, "overloaded_error") and took < 0.2, (reply, took)
            assert b"job store cannot be reached: NATS reconnecting" in reply.body
            reply, took = await timed(poll_call(decider, job_id))
            assert (reply.status, code_of(reply)) == (503, "job_store_unavailable") and took < 0.2

            # NATS back (same storage): submissions and polls work again without restarting anything.
            private_nats.start()
            await until_connected(store)
            assert (await poll_call(decider, job_id)).status == 202
            assert (await submit_call(decider)).status == 202
        finally:
            private_nats.thaw()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(store.close(), 5)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_frozen_nats_costs_one_request_timeout_then_fails_at_once(private_nats: PrivateNats,
                                                                    tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await connected(private_nats.url)
        decider = make_decider(tmp_path, store)
        try:
            job_id = (await store.submit(a_job())).job_id
            private_nats.freeze()  # the connection stays up, nothing answers: only a timeout can tell
            # The first caller waits the store's request timeout (not the 5 s of the NATS client, which is
            # the ext_proc message timeout too: Envoy would have answered 504 first).
            reply, took = await timed(submit_call(decider))
            assert reply.status == 503 and b"no answer within 1s" in reply.body
            assert REQUEST_TIMEOUT_S * 0.9 <= took < REQUEST_TIMEOUT_S + 0.5 < MESSAGE_TIMEOUT_S, took
            # Then, for the back-off, submissions and polls are refused without waiting on NATS.
            for _ in range(10):
                reply, took = await timed(submit_call(decider))
                assert reply.status == 503 and took < FAST_S * 2, took  # a decision, no NATS round trip
                assert code_of(reply) == "overloaded_error"  # the Anthropic face of job_queue_unavailable
                reply, took = await timed(poll_call(decider, job_id))
                assert (reply.status, code_of(reply)) == (503, "job_store_unavailable") and took < FAST_S
            # A poll that is the next probe also waits at most the request timeout.
            await asyncio.sleep(store.outage.retry_after_s)
            error, took = await refused(store.get(job_id))
            assert took < REQUEST_TIMEOUT_S + 0.5 and "no answer" in str(error)

            private_nats.thaw()
            await asyncio.sleep(store.outage.retry_after_s + 0.1)
            view = await store.get(job_id)
            assert view is not None and not store.outage.ongoing
            assert (await submit_call(decider)).status == 202
        finally:
            private_nats.thaw()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(store.close(), 5)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_closing_the_store_does_not_wait_on_a_frozen_nats(private_nats: PrivateNats) -> None:
    """The processor's shutdown closes the store: nats-py's drain would wait tens of seconds here (20 s measured)."""
    async def scenario() -> None:
        store = await connected(private_nats.url)
        await store.submit(a_job())
        private_nats.freeze()
        try:
            _, took = await timed(store.close())
            assert took < REQUEST_TIMEOUT_S + 1.0, took
        finally:
            private_nats.thaw()

    asyncio.run(asyncio.wait_for(scenario(), 60))


# --- through Envoy ----------------------------------------------------------------------------------------

def test_through_envoy_an_outage_is_a_quick_503_not_a_504(envoy_binary: str, private_nats: PrivateNats,
                                                          tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(POLICY)
    (tmp_path / "logs").mkdir()
    stack = Stack(policies, tmp_path / "logs", services=["order-service"],
                  jobs=(private_nats.url, f"o{uuid.uuid4().hex[:8]}"))
    base = stack.base_url("order-service")
    call = {"model": "summariser", "messages": [{"role": "user", "content": "x"}]}

    def submit() -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        reply = httpx.post(f"{base}/v1/chat/completions", json=call, headers={"prefer": "respond-async"},
                           timeout=15)
        return reply, time.perf_counter() - started

    def poll(location: str) -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        reply = httpx.get(base + location, timeout=15)
        return reply, time.perf_counter() - started

    try:
        deadline = time.monotonic() + 15
        while (accepted := submit()[0]).status_code != 202:  # the processor connects in the background
            assert time.monotonic() < deadline, accepted.text
            time.sleep(0.2)
        location = accepted.headers["location"]

        private_nats.freeze()
        for attempt in range(3):  # the first waits the request timeout, the others are refused at once
            reply, took = submit()
            assert reply.status_code == 503, (reply.status_code, reply.text, took)
            assert reply.json()["error"]["code"] == "job_queue_unavailable"
            assert took < (REQUEST_TIMEOUT_S + 0.7 if attempt == 0 else QUICK_S), (attempt, took)
        reply, took = poll(location)
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "job_store_unavailable"
        assert took < REQUEST_TIMEOUT_S + 0.7

        private_nats.stop()  # now really down: the client knows, nothing waits at all
        time.sleep(0.3)
        reply, took = submit()
        assert (reply.status_code, reply.json()["error"]["code"], took < QUICK_S) == (503, "job_queue_unavailable",
                                                                                       True), took
        reply, took = poll(location)
        assert (reply.status_code, reply.json()["error"]["code"], took < QUICK_S) == (503, "job_store_unavailable",
                                                                                       True), took
    finally:
        private_nats.stop()
        stack.close()
