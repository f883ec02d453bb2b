"""Cloud credentials (extproc.core.cloud_auth) with the real botocore and google-auth, against local stubs
only: SigV4 compared with botocore's own signer and with an independent verifier fed a botocore client's
request; the AWS chain from environment variables and from a web identity token file (an STS stub on
127.0.0.1); Google tokens from a service-account key whose token_uri is a local stub; caching, single
flight, back-off, timeouts and an event loop that keeps running while credentials resolve.

Every test isolates the process environment (no AWS_*, empty AWS config files, a temporary HOME, the EC2
metadata service disabled, no Google metadata server), so neither the machine's own credentials nor a
metadata endpoint is ever reached.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

import botocore.auth
import botocore.session
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from extproc.core.cloud_auth import (
    NO_AWS_CREDENTIALS,
    AwsChain,
    AwsKeys,
    CloudAuth,
    CredentialUnavailable,
    GoogleToken,
    sigv4_headers,
)

T = TypeVar("T")

MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
URL = "http://127.0.0.1:8123/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
BODY = b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}'
KEYS = AwsKeys("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
SESSION_KEYS = AwsKeys("ASIAEXAMPLE", "session-secret", "session-token-value")
NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


def run(awaitable: Awaitable[T]) -> T:
    async def main() -> T:
        return await awaitable

    return asyncio.run(main())


class Clock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- isolation and stubs -------------------------------------------------------------------------------


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AWS or Google credentials or metadata service reachable from the environment; returns a temp dir."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "GOOGLE_", "GCE_", "CLOUDSDK_")):
            monkeypatch.delenv(name)
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("BOTO_CONFIG", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    return tmp_path


@dataclass
class Stub:
    """An HTTP endpoint on 127.0.0.1 that records what it is sent and answers as configured."""

    url: str = ""
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    delay: float = 0.0
    hits: list[tuple[str, bytes]] = field(default_factory=list)

    def answer(self, status: int, body: bytes | str, content_type: str = "application/json") -> None:
        self.status, self.content_type = status, content_type
        self.body = body.encode() if isinstance(body, str) else body


@pytest.fixture
def stub() -> Iterator[Stub]:
    state = Stub()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            state.hits.append((self.path, body))
            time.sleep(state.delay)
            self.send_response(state.status)
            self.send_header("content-type", state.content_type)
            self.send_header("content-length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False
    server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]  # a caller gave up
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


# --- SigV4 ---------------------------------------------------------------------------------------------


def botocore_add_auth(keys: AwsKeys, url: str, body: bytes, monkeypatch: pytest.MonkeyPatch) -> AWSRequest:
    """botocore's own SigV4Auth.add_auth on the same request, its clock fixed at NOW."""
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: NOW.replace(tzinfo=None))
    request = AWSRequest(method="POST", url=url, data=body)
    SigV4Auth(Credentials(keys.access_key, keys.secret_key, keys.token), "bedrock", "us-east-1").add_auth(request)
    return request


@pytest.mark.parametrize("keys", [KEYS, SESSION_KEYS], ids=["long-term", "session"])
def test_sigv4_matches_botocores_own_signer(keys: AwsKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = dict(sigv4_headers(keys, region="us-east-1", service="bedrock", method="POST", url=URL, body=BODY, now=NOW))
    theirs = botocore_add_auth(keys, URL, BODY, monkeypatch)
    assert ours["authorization"] == theirs.headers["Authorization"]
    assert ours["x-amz-date"] == theirs.headers["X-Amz-Date"] == "20260304T050607Z"
    expected = {"authorization", "x-amz-date"} | ({"x-amz-security-token"} if keys.token else set())
    assert set(ours) == expected  # nothing else, and the token header only with a token
    signed = "host;x-amz-date;x-amz-security-token" if keys.token else "host;x-amz-date"
    assert f"SignedHeaders={signed}," in ours["authorization"]
    if keys.token:
        assert ours["x-amz-security-token"] == theirs.headers["X-Amz-Security-Token"] == keys.token


def test_sigv4_now_may_be_naive_utc_or_another_zone() -> None:
    def sign(now: datetime) -> list[tuple[str, str]]:
        return sigv4_headers(KEYS, region="us-east-1", service="bedrock", method="post", url=URL, body=BODY, now=now)

    assert sign(NOW) == sign(NOW.replace(tzinfo=None)) == sign(NOW.astimezone(timezone(timedelta(hours=2))))


def test_one_body_byte_or_the_path_changes_the_signature() -> None:
    def signature(url: str, body: bytes) -> str:
        headers = dict(sigv4_headers(KEYS, region="us-east-1", service="bedrock", method="POST", url=url, body=body,
                                     now=NOW))
        return headers["authorization"].rsplit("Signature=", 1)[1]

    base = signature(URL, BODY)
    assert signature(URL, BODY.replace(b"hi", b"hj")) != base
    assert signature(URL.replace("converse", "converse-stream"), BODY) != base
    assert signature(URL, BODY) == base


def verified_signature(method: str, url: str, headers: Mapping[str, str | bytes], body: bytes,
                       secret: str) -> tuple[str, str]:
    """(the signature in the Authorization header, the one AWS would compute from what is on the wire):
    the SigV4 specification written out, without botocore."""
    lower = {name.lower(): value.decode() if isinstance(value, bytes) else value for name, value in headers.items()}
    parts = urlsplit(url)
    lower.setdefault("host", parts.netloc)  # the HTTP client adds it; :8123 is not a default port
    match = re.fullmatch(r"AWS4-HMAC-SHA256 Credential=[^/]+/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                         r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})", lower["authorization"])
    assert match is not None, lower["authorization"]
    date, region, service, signed, claimed = match.groups()
    canonical = "\n".join([
        method,
        quote(parts.path, safe="/~"),  # every service but S3 encodes the path as sent once more
        "&".join(sorted(parts.query.split("&"))) if parts.query else "",
        "".join(f"{name}:{' '.join(lower[name].split())}\n" for name in signed.split(";")),
        signed,
        hashlib.sha256(body).hexdigest(),
    ])
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", lower["x-amz-date"], scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return claimed, hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class Captured(Exception):
    pass


def test_a_botocore_client_sends_the_same_url_and_both_signatures_verify(isolated: Path) -> None:
    """A bedrock-runtime client's Converse request (captured before it is sent) has the URL we sign, and the
    verifier accepts both its signature and ours for that URL and body."""
    client = botocore.session.Session().create_client(
        "bedrock-runtime", region_name="us-east-1", endpoint_url="http://127.0.0.1:8123",
        aws_access_key_id=SESSION_KEYS.access_key, aws_secret_access_key=SESSION_KEYS.secret_key,
        aws_session_token=SESSION_KEYS.token,
    )
    sent: list[Any] = []

    def capture(request: Any, **_: Any) -> None:
        sent.append(request)
        raise Captured

    client.meta.events.register("before-send.bedrock-runtime.Converse", capture)
    with pytest.raises(Captured):
        client.converse(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}])
    request = sent[-1]
    assert request.url == URL
    claimed, computed = verified_signature("POST", request.url, request.headers, request.body, SESSION_KEYS.secret_key)
    assert claimed == computed  # the verifier agrees with botocore's client

    ours = dict(sigv4_headers(SESSION_KEYS, region="us-east-1", service="bedrock", method="POST", url=request.url,
                              body=request.body))
    claimed, computed = verified_signature("POST", request.url, ours, request.body, SESSION_KEYS.secret_key)
    assert claimed == computed
    tampered = request.body.replace(b"hi", b"ho")
    claimed, computed = verified_signature("POST", request.url, ours, tampered, SESSION_KEYS.secret_key)
    assert claimed != computed


def test_aws_keys_repr_hides_the_secret_and_the_token() -> None:
    text = repr(SESSION_KEYS)
    assert "ASIAEXAMPLE" in text
    assert "session-secret" not in text and "session-token-value" not in text


# --- the AWS chain -------------------------------------------------------------------------------------

STS_ANSWER = """<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>system:serviceaccount:ai:extproc</SubjectFromWebIdentityToken>
    <Audience>sts.amazonaws.com</Audience>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/bedrock-caller/extproc</Arn>
      <AssumedRoleId>AROAEXAMPLE:extproc</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>ASIASTSSTUB</AccessKeyId>
      <SecretAccessKey>sts-stub-secret</SecretAccessKey>
      <SessionToken>sts-stub-session-token</SessionToken>
      <Expiration>2030-01-01T00:00:00Z</Expiration>
    </Credentials>
    <Provider>arn:aws:iam::123456789012:oidc-provider/oidc.eks.example</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"""

STS_REFUSAL = """<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>Couldn't retrieve verification key from your
  identity provider</Message></Error>
  <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c8</RequestId>
</ErrorResponse>"""

ROLE = "arn:aws:iam::123456789012:role/bedrock-caller"


@pytest.fixture
def web_identity(isolated: Path, stub: Stub, monkeypatch: pytest.MonkeyPatch) -> Stub:
    """IRSA's environment, STS being the stub (answering with credentials)."""
    token_file = isolated / "token"
    token_file.write_text("eyJ.projected-service-account-token.sig")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("AWS_ROLE_ARN", ROLE)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", stub.url)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    stub.answer(200, STS_ANSWER, "text/xml")
    return stub


def test_keys_from_environment_variables(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    chain = AwsChain()
    assert chain.cached() is None
    keys = run(chain.keys())
    assert (keys.access_key, keys.secret_key, keys.token) == ("AKIDENV", "env-secret", None)
    assert chain.cached() == keys
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token")
    assert run(chain.keys()) is keys  # static keys never expire: served from the cache


def test_keys_from_a_web_identity_token_file_through_sts(web_identity: Stub) -> None:
    chain = AwsChain()
    keys = run(chain.keys())
    assert keys == AwsKeys("ASIASTSSTUB", "sts-stub-secret", "sts-stub-session-token")
    assert run(chain.keys()) is keys
    assert len(web_identity.hits) == 1  # the second call was served from the cache
    sent = parse_qs(web_identity.hits[0][1].decode())
    assert sent["Action"] == ["AssumeRoleWithWebIdentity"]
    assert sent["WebIdentityToken"] == ["eyJ.projected-service-account-token.sig"]
    assert sent["RoleArn"] == [ROLE]


def test_a_missing_web_identity_token_file_is_named(web_identity: Stub, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    missing = tmp_path / "no-such-token"
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(missing))
    with pytest.raises(CredentialUnavailable) as caught:
        run(AwsChain().keys())
    assert caught.value.reason == f"the web identity token file {missing} does not exist"
    assert web_identity.hits == []


def test_sts_refusing_the_token_is_reported_with_its_error(web_identity: Stub) -> None:
    web_identity.answer(400, STS_REFUSAL, "text/xml")
    with pytest.raises(CredentialUnavailable) as caught:
        run(AwsChain().keys())
    assert caught.value.reason.startswith("AWS refused AssumeRoleWithWebIdentity: InvalidIdentityToken: ")
    assert "verification key" in caught.value.reason


def test_no_credentials_fails_fast_and_backs_off(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resolutions = []
    original = botocore.session.Session.get_credentials

    def counted(self: botocore.session.Session) -> Any:
        resolutions.append(1)
        return original(self)

    monkeypatch.setattr(botocore.session.Session, "get_credentials", counted)
    clock = Clock()
    chain = AwsChain(clock=clock, backoff=5.0)

    async def attempt() -> str:
        with pytest.raises(CredentialUnavailable) as caught:
            await chain.keys()
        return caught.value.reason

    started = time.monotonic()
    assert run(attempt()) == NO_AWS_CREDENTIALS
    assert time.monotonic() - started < 2.0  # the timeout is 5 s; nothing was waited for
    clock.now += 4.9
    assert run(attempt()) == NO_AWS_CREDENTIALS
    assert len(resolutions) == 1  # within the back-off: the failure is remembered, not retried
    clock.now += 0.2
    assert run(attempt()) == NO_AWS_CREDENTIALS
    assert len(resolutions) == 2
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLATE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "late-secret")
    clock.now += 5.1
    assert run(chain.keys()).access_key == "AKIDLATE"  # the next try after the back-off succeeds


def test_an_unknown_profile_is_named(isolated: Path) -> None:
    with pytest.raises(CredentialUnavailable) as caught:
        run(AwsChain("no-such-profile").keys())
    assert "no-such-profile" in caught.value.reason


def test_twenty_concurrent_callers_share_one_resolution(web_identity: Stub) -> None:
    web_identity.delay = 0.3
    chain = AwsChain()

    async def many() -> list[AwsKeys]:
        return await asyncio.gather(*(chain.keys() for _ in range(20)))

    keys = run(many())
    assert len(web_identity.hits) == 1
    assert all(k is keys[0] for k in keys)


def test_the_event_loop_runs_while_credentials_resolve(web_identity: Stub) -> None:
    web_identity.delay = 0.5
    chain = AwsChain()

    async def resolve_while_ticking() -> tuple[AwsKeys, int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        keys = await chain.keys()
        done.set()
        await task
        return keys, ticks

    keys, ticks = run(resolve_while_ticking())
    assert keys.access_key == "ASIASTSSTUB"
    assert ticks >= 20  # ~50 in 0.5 s; a blocked loop would give 1


def test_a_resolution_that_hangs_times_out(web_identity: Stub) -> None:
    web_identity.delay = 3.0
    chain = AwsChain(timeout=0.3)

    async def attempt() -> tuple[str, float]:
        started = time.monotonic()
        with pytest.raises(CredentialUnavailable) as caught:
            await chain.keys()
        return caught.value.reason, time.monotonic() - started

    reason, elapsed = run(attempt())
    assert reason == "resolving AWS credentials took over 0.3 s"
    assert elapsed < 1.0


# --- Google --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_file(directory: Path, key: rsa.RSAPrivateKey, token_uri: str) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = directory / "service-account.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "vertex-test", "private_key_id": "k1", "private_key": pem,
        "client_email": "extproc@vertex-test.iam.gserviceaccount.com", "client_id": "1234567890",
        "token_uri": token_uri,
    }))
    return path


def b64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


@pytest.fixture
def token_endpoint(stub: Stub) -> Stub:
    stub.answer(200, json.dumps({"access_token": "ya29.test", "expires_in": 3600, "token_type": "Bearer"}))
    return stub


def test_a_token_from_a_service_account_key_file(isolated: Path, token_endpoint: Stub,
                                                 rsa_key: rsa.RSAPrivateKey) -> None:
    path = key_file(isolated, rsa_key, f"{token_endpoint.url}/token")
    google = GoogleToken(str(path))
    assert run(google.token()) == "ya29.test"
    assert run(google.token()) == "ya29.test"
    assert google.cached() == "ya29.test"
    assert len(token_endpoint.hits) == 1
    route, body = token_endpoint.hits[0]
    form = parse_qs(body.decode())
    assert route == "/token"
    assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    header, claims, signature = form["assertion"][0].split(".")
    rsa_key.public_key().verify(b64(signature), f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
    payload = json.loads(b64(claims))
    assert payload["scope"] == "https://www.googleapis.com/auth/cloud-platform"
    assert payload["aud"] == "https://oauth2.googleapis.com/token"  # google-auth's fixed audience, not token_uri
    assert payload["iss"] == "extproc@vertex-test.iam.gserviceaccount.com"


def test_a_token_from_application_default_credentials(isolated: Path, token_endpoint: Stub,
                                                      rsa_key: rsa.RSAPrivateKey,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = key_file(isolated, rsa_key, f"{token_endpoint.url}/token")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    assert run(GoogleToken().token()) == "ya29.test"
    assert len(token_endpoint.hits) == 1


async def until(condition: Callable[[], bool], limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_the_token_is_renewed_in_the_background_from_five_minutes_before_expiry(
    isolated: Path, token_endpoint: Stub, rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = Clock()
    google = GoogleToken(str(key_file(isolated, rsa_key, f"{token_endpoint.url}/token")), clock=clock)

    async def scenario() -> None:
        assert await google.token() == "ya29.test"
        clock.now += 3600 - 300 - 5
        assert await google.token() == "ya29.test"
        assert len(token_endpoint.hits) == 1
        token_endpoint.answer(200, json.dumps({"access_token": "ya29.next", "expires_in": 3600}))
        token_endpoint.delay = 0.2
        clock.now += 10
        assert await asyncio.gather(*(google.token() for _ in range(5))) == ["ya29.test"] * 5  # nobody waits
        await until(lambda: google.cached() == "ya29.next")
        assert await google.token() == "ya29.next"
        assert len(token_endpoint.hits) == 2  # one renewal for the five callers

    run(scenario())


def test_a_token_about_to_expire_is_waited_for(isolated: Path, token_endpoint: Stub,
                                              rsa_key: rsa.RSAPrivateKey) -> None:
    clock = Clock()
    google = GoogleToken(str(key_file(isolated, rsa_key, f"{token_endpoint.url}/token")), clock=clock)
    assert run(google.token()) == "ya29.test"
    token_endpoint.answer(200, json.dumps({"access_token": "ya29.next", "expires_in": 3600}))
    clock.now += 3600 - 59
    assert google.cached() is None
    assert run(google.token()) == "ya29.next"


def test_a_failed_renewal_keeps_the_token_while_it_is_valid(isolated: Path, token_endpoint: Stub,
                                                            rsa_key: rsa.RSAPrivateKey) -> None:
    clock = Clock()
    google = GoogleToken(str(key_file(isolated, rsa_key, f"{token_endpoint.url}/token")), clock=clock)

    async def scenario() -> None:
        assert await google.token() == "ya29.test"
        # not a 5xx: google-auth retries those itself, for seconds
        token_endpoint.answer(400, json.dumps({"error": "invalid_grant", "error_description": "account disabled"}))
        clock.now += 3600 - 200
        assert await google.token() == "ya29.test"  # the renewal starts in the background...
        await until(lambda: len(token_endpoint.hits) == 2)
        await asyncio.sleep(0.05)
        assert await google.token() == "ya29.test"  # ...and fails; the token is valid for 200 s more
        clock.now += 1
        assert await google.token() == "ya29.test"
        assert len(token_endpoint.hits) == 2  # backing off
        clock.now += 200 - 30  # within a minute of expiry: no longer served
        with pytest.raises(CredentialUnavailable) as caught:
            await google.token()
        assert "account disabled" in caught.value.reason
        assert google.cached() is None

    run(scenario())


def test_a_missing_key_file_is_named(isolated: Path) -> None:
    missing = isolated / "nowhere.json"
    with pytest.raises(CredentialUnavailable) as caught:
        run(GoogleToken(str(missing)).token())
    assert caught.value.reason == f"the Google service-account key file {missing} does not exist"


def test_a_file_that_is_not_a_service_account_key(isolated: Path) -> None:
    path = isolated / "user.json"
    path.write_text(json.dumps({"type": "authorized_user", "client_id": "x", "client_secret": "user-secret",
                                "refresh_token": "1//refresh"}))
    with pytest.raises(CredentialUnavailable) as caught:
        run(GoogleToken(str(path)).token())
    assert caught.value.reason.startswith(f"{path} is not a Google service-account key file: ")
    assert "user-secret" not in caught.value.reason and "1//refresh" not in caught.value.reason


def test_a_refused_token_request_gives_the_endpoints_error_and_never_the_key(
    isolated: Path, stub: Stub, rsa_key: rsa.RSAPrivateKey
) -> None:
    stub.answer(400, json.dumps({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}))
    clock = Clock()
    google = GoogleToken(str(key_file(isolated, rsa_key, f"{stub.url}/token")), clock=clock)
    with pytest.raises(CredentialUnavailable) as caught:
        run(google.token())
    reason = caught.value.reason
    assert reason == "the Google token endpoint refused to issue a token: invalid_grant: Invalid JWT Signature."
    assert "PRIVATE KEY" not in reason and "assertion" not in reason
    with pytest.raises(CredentialUnavailable):
        run(google.token())
    assert len(stub.hits) == 1  # backed off
    clock.now += 5.1
    with pytest.raises(CredentialUnavailable):
        run(google.token())
    assert len(stub.hits) == 2


def test_an_unreachable_token_endpoint(isolated: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = key_file(isolated, rsa_key, "http://127.0.0.1:9/token")  # discard: nothing listens
    with pytest.raises(CredentialUnavailable) as caught:
        run(GoogleToken(str(path)).token())
    assert caught.value.reason.startswith("the Google token endpoint could not be reached: ")


def test_no_application_default_credentials(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(isolated / "absent.json"))
    with pytest.raises(CredentialUnavailable) as caught:
        run(GoogleToken().token())
    assert caught.value.reason.startswith("no Google Application Default Credentials: ")
    assert "absent.json" in caught.value.reason


# --- the registry --------------------------------------------------------------------------------------


def test_one_source_per_distinct_argument() -> None:
    auth = CloudAuth()
    assert auth.aws(None) is auth.aws(None) is auth.aws()
    assert auth.aws("bedrock") is auth.aws("bedrock") is not auth.aws(None)
    assert auth.google(None) is auth.google() is not auth.google("/keys/a.json")
    assert auth.google("/keys/a.json") is auth.google("/keys/a.json") is not auth.google("/keys/b.json")
    assert auth.aws("bedrock").profile == "bedrock" and auth.google("/keys/b.json").key_file == "/keys/b.json"

