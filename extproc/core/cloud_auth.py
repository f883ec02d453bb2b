"""Cloud credentials for Bedrock (AWS SigV4) and Vertex AI (Google OAuth), never resolved on the event loop.

botocore and google-auth find credentials with blocking I/O (config files, STS, the instance metadata
service, a token endpoint), so every resolution runs in a worker thread, bounded by a timeout. Its result
is cached; from 5 minutes before it expires it is renewed in the background while callers keep using it
(until a minute before expiry, when they wait for the renewal instead). One resolution runs at a time
(concurrent callers await the same one); a failure is remembered for a short back-off, so a dead source
is not asked again on every request.

``CloudAuth`` is the registry the runtime holds: one ``AwsChain`` per AWS profile and one ``GoogleToken``
per key file, so every provider that uses a source shares its cache.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import botocore.session
import google.auth
import google.auth.credentials
import google.auth.exceptions
import google.auth.transport
import google.auth.transport.requests
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import BotoCoreError, ClientError
from google.oauth2 import service_account

log = logging.getLogger(__name__)

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
RENEW_BEFORE = 300.0  # cached credentials are renewed this many seconds before they expire
SERVE_UNTIL = 60.0  # cached credentials are served until this many seconds before they expire
NO_AWS_CREDENTIALS = ("no AWS credentials found in the environment, the shared config and credentials files, "
                      "a web identity token file or the container or instance role")

T = TypeVar("T")


class CredentialUnavailable(Exception):
    """A cloud credential could not be had; ``reason`` says why, for a person (never a secret)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class AwsKeys:
    access_key: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


# --- SigV4 ---------------------------------------------------------------------------------------------


def sigv4_headers(keys: AwsKeys, *, region: str, service: str, method: str, url: str, body: bytes,
                  now: datetime | None = None) -> list[tuple[str, str]]:
    """The headers that sign a request with SigV4: authorization, x-amz-date and (with a session token)
    x-amz-security-token.

    Only ``host`` (the URL's netloc, as botocore derives it) and the x-amz-* headers are signed, never a
    caller's header that Envoy may rewrite; the body's SHA-256 is part of the canonical request. ``url``
    carries the path exactly as it will be sent (already percent-encoded). ``now`` (naive means UTC) fixes
    the signing time. The steps are botocore's ``SigV4Auth.add_auth`` with the time passed in.
    """
    moment = datetime.now(UTC) if now is None else now.replace(tzinfo=now.tzinfo or UTC).astimezone(UTC)
    stamp = moment.strftime(SIGV4_TIMESTAMP)
    request = AWSRequest(method=method.upper(), url=url, data=body)
    request.context["timestamp"] = stamp
    request.headers["X-Amz-Date"] = stamp
    if keys.token:
        request.headers["X-Amz-Security-Token"] = keys.token
    signer = SigV4Auth(Credentials(keys.access_key, keys.secret_key, keys.token), service, region)
    signature = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    signed = signer.signed_headers(signer.headers_to_sign(request))
    authorization = (f"AWS4-HMAC-SHA256 Credential={signer.scope(request)}, SignedHeaders={signed}, "
                     f"Signature={signature}")
    headers = [("authorization", authorization), ("x-amz-date", stamp)]
    if keys.token:
        headers.append(("x-amz-security-token", keys.token))
    return headers


# --- the cache every source shares ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Held(Generic[T]):
    value: T
    renew_at: float | None  # on the injected clock; None: never expires
    serve_until: float | None


@dataclass(frozen=True, slots=True)
class _Failure:
    reason: str
    retry_at: float


class _Cached(Generic[T]):
    """One credential: cached, fetched by a blocking ``fetch`` in a worker thread (one fetch at a time,
    bounded by ``timeout``), its failures remembered for ``backoff`` seconds.

    ``fetch`` returns the value and how many seconds it stays valid (None: for good), or raises
    CredentialUnavailable. A value is renewed from ``RENEW_BEFORE`` seconds before it expires, in the
    background while it is still good to serve. A fetch that outlives the timeout is not started again
    while it runs: later callers await it (and its result is kept when it lands).
    """

    def __init__(self, fetch: Callable[[], tuple[T, float | None]], what: str, *, timeout: float,
                 backoff: float, clock: Callable[[], float]) -> None:
        self._fetch = fetch
        self._what = what
        self._timeout = timeout
        self._backoff = backoff
        self._clock = clock
        self._held: _Held[T] | None = None
        self._failure: _Failure | None = None
        self._task: asyncio.Task[T] | None = None

    def cached(self) -> T | None:
        """The value held, while it is valid; never resolves."""
        held = self._held
        return held.value if held is not None and _before(self._clock(), held.serve_until) else None

    async def get(self) -> T:
        now = self._clock()
        held, failure = self._held, self._failure
        if held is not None and _before(now, held.renew_at):
            return held.value
        backing_off = failure is not None and now < failure.retry_at
        if held is not None and _before(now, held.serve_until):
            if not backing_off:
                self._flight()  # renewed in the background: the value in hand is still valid
            return held.value
        if failure is not None and backing_off:
            raise CredentialUnavailable(failure.reason)
        return await self._wait()

    async def _wait(self) -> T:
        try:
            return await asyncio.wait_for(asyncio.shield(self._flight()), self._timeout)
        except TimeoutError:
            reason = f"resolving {self._what} took over {self._timeout:g} s"
            if self._failure is None or self._clock() >= self._failure.retry_at:  # once for all the waiters
                self._failed(reason)
            raise CredentialUnavailable(reason) from None

    def _flight(self) -> asyncio.Task[T]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
            self._task.add_done_callback(_consume)
        return self._task

    async def _run(self) -> T:
        try:
            value, lifetime = await asyncio.to_thread(self._fetch)
        except CredentialUnavailable as error:
            self._failed(error.reason)
            raise
        except Exception as error:  # the fetches turn every error into CredentialUnavailable; in case one does not
            reason = f"resolving {self._what} failed: {type(error).__name__}: {error}"
            self._failed(reason)
            raise CredentialUnavailable(reason) from error
        finally:
            self._task = None
        now = self._clock()
        if lifetime is None:
            self._held = _Held(value, None, None)
        else:  # short-lived credentials are renewed halfway through their life, not continually
            expires = now + lifetime
            self._held = _Held(value, expires - min(RENEW_BEFORE, lifetime / 2),
                               expires - min(SERVE_UNTIL, lifetime / 4))
        self._failure = None
        return value

    def _failed(self, reason: str) -> None:
        self._failure = _Failure(reason, self._clock() + self._backoff)
        log.warning("could not resolve %s (next attempt in %g s): %s", self._what, self._backoff, reason)


def _before(now: float, deadline: float | None) -> bool:
    return deadline is None or now < deadline


def _consume(task: asyncio.Task[Any]) -> None:
    """Retrieves a fetch's exception, so one that every waiter gave up on is not reported as never retrieved."""
    if not task.cancelled():
        task.exception()


def _seconds_left(expiry: object) -> float | None:
    """Seconds until ``expiry`` (a datetime; naive means UTC), or None when there is none."""
    if not isinstance(expiry, datetime):
        return None
    return (expiry.replace(tzinfo=expiry.tzinfo or UTC) - datetime.now(UTC)).total_seconds()


# --- AWS -----------------------------------------------------------------------------------------------


class AwsChain:
    """AWS keys from botocore's standard credential chain: environment variables, the shared config and
    credentials files (``profile``), a web identity token file (IRSA: AWS_WEB_IDENTITY_TOKEN_FILE and
    AWS_ROLE_ARN, through STS AssumeRoleWithWebIdentity; AWS_ENDPOINT_URL_STS moves STS), the container
    and the instance role.

    botocore reads os.environ directly (its environment, container and web identity providers and its
    config variables), so there is no injectable environment.
    """

    def __init__(self, profile: str | None = None, *, timeout: float = 5.0, backoff: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.profile = profile
        self._timeout = timeout
        self._credentials: Credentials | None = None  # botocore's; touched only by _fetch, in its worker thread
        self._cache: _Cached[AwsKeys] = _Cached(self._fetch, "AWS credentials", timeout=timeout, backoff=backoff,
                                                clock=clock)

    async def keys(self) -> AwsKeys:
        """The cached keys; resolved (off the loop) when there are none, renewed when they expire within 5
        minutes (in the background while they are still good for more than a minute). Raises
        CredentialUnavailable."""
        return await self._cache.get()

    def cached(self) -> AwsKeys | None:
        """The keys held, while valid, without resolving (for metrics and health)."""
        return self._cache.cached()

    def _fetch(self) -> tuple[AwsKeys, float | None]:
        """Blocking: runs in a worker thread. Renewing botocore's refreshable credentials may call STS or the
        metadata service; a failure starts the next attempt from a fresh chain."""
        try:
            credentials = self._credentials or self._find()
            frozen = credentials.get_frozen_credentials()
        except CredentialUnavailable:
            self._credentials = None
            raise
        except Exception as error:
            self._credentials = None
            raise CredentialUnavailable(_aws_reason(error)) from error
        if not frozen.access_key or not frozen.secret_key:
            self._credentials = None
            raise CredentialUnavailable("the AWS credential chain returned incomplete keys")
        self._credentials = credentials
        keys = AwsKeys(frozen.access_key, frozen.secret_key, frozen.token or None)
        # botocore keeps the expiry of RefreshableCredentials in a private attribute; there is no public one.
        return keys, _seconds_left(getattr(credentials, "_expiry_time", None))

    def _find(self) -> Credentials:
        session = botocore.session.Session(profile=self.profile)
        # STS and the other clients the chain creates would otherwise wait 60 s per attempt, keeping a thread
        # busy long after the caller's timeout.
        session.set_default_client_config(Config(
            connect_timeout=self._timeout, read_timeout=self._timeout,
            retries={"mode": "standard", "total_max_attempts": 2},
        ))
        credentials = session.get_credentials()
        if credentials is None:
            raise CredentialUnavailable(NO_AWS_CREDENTIALS if self.profile is None else
                                        f"no AWS credentials found for the profile {self.profile!r}")
        return credentials


def _aws_reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        if error.filename and error.filename == os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
            return f"the web identity token file {error.filename} does not exist"
        return f"the file {error.filename} does not exist"
    if isinstance(error, OSError) and error.filename:
        return f"the file {error.filename} cannot be read: {error.strerror}"
    if isinstance(error, ClientError):
        detail: Mapping[str, Any] = error.response.get("Error", {})
        return f"AWS refused {error.operation_name}: {detail.get('Code', '?')}: {detail.get('Message', '')}"
    if isinstance(error, BotoCoreError):
        return f"resolving AWS credentials failed: {error}"
    return f"resolving AWS credentials failed: {type(error).__name__}: {error}"


# --- Google --------------------------------------------------------------------------------------------


class GoogleToken:
    """An OAuth access token for Vertex AI: from a service-account JSON key file when ``key_file`` is given
    (read again at each renewal, so a rotated Secret is picked up), else from Application Default
    Credentials (GOOGLE_APPLICATION_CREDENTIALS, GKE workload identity's metadata server, ...)."""

    def __init__(self, key_file: str | None = None, *, scopes: Sequence[str] = (CLOUD_PLATFORM_SCOPE,),
                 timeout: float = 5.0, backoff: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.key_file = key_file
        self._scopes = list(scopes)
        self._timeout = timeout
        self._default: google.auth.credentials.Credentials | None = None  # ADC; touched only by _fetch
        self._cache: _Cached[str] = _Cached(self._fetch, "the Google access token", timeout=timeout,
                                            backoff=backoff, clock=clock)

    async def token(self) -> str:
        """The cached token; fetched (off the loop) when there is none, renewed when it expires within 5
        minutes (in the background while it is still good for more than a minute). Raises
        CredentialUnavailable."""
        return await self._cache.get()

    def cached(self) -> str | None:
        """The token held, while valid, without renewing it (for metrics and health)."""
        return self._cache.cached()

    def _fetch(self) -> tuple[str, float | None]:
        """Blocking: runs in a worker thread."""
        try:
            credentials = self._credentials()
            request = _BoundedRequest(self._timeout)
            try:
                credentials.refresh(request)
            finally:
                request.session.close()
        except CredentialUnavailable:
            self._default = None
            raise
        except Exception as error:
            self._default = None
            raise CredentialUnavailable(_google_reason(error)) from error
        token = credentials.token
        if not isinstance(token, str) or not token:
            raise CredentialUnavailable("the Google token endpoint answered without an access token")
        return token, _seconds_left(credentials.expiry)

    def _credentials(self) -> google.auth.credentials.Credentials:
        if self.key_file is not None:
            return _service_account(self.key_file, self._scopes)
        if self._default is None:
            try:
                self._default, _project = google.auth.default(scopes=self._scopes)
            except google.auth.exceptions.DefaultCredentialsError as error:
                raise CredentialUnavailable(f"no Google Application Default Credentials: {error}") from None
        return self._default


def _service_account(path: str, scopes: list[str]) -> service_account.Credentials:
    """The key file's credentials; its errors name the file and never quote its content."""
    try:
        credentials: service_account.Credentials = service_account.Credentials.from_service_account_file(
            path, scopes=scopes)
        return credentials
    except FileNotFoundError:
        raise CredentialUnavailable(f"the Google service-account key file {path} does not exist") from None
    except OSError as error:
        raise CredentialUnavailable(f"the Google service-account key file {path} cannot be read: "
                                    f"{error.strerror}") from None
    except Exception as error:  # bad JSON, missing fields, an unreadable private key
        raise CredentialUnavailable(f"{path} is not a Google service-account key file: {error}") from None


def _google_reason(error: Exception) -> str:
    if isinstance(error, google.auth.exceptions.RefreshError):
        detail = error.args[0] if error.args else error
        return f"the Google token endpoint refused to issue a token: {detail}"
    if isinstance(error, google.auth.exceptions.TransportError):
        return f"the Google token endpoint could not be reached: {error}"
    return f"renewing the Google access token failed: {type(error).__name__}: {error}"


class _BoundedRequest(google.auth.transport.requests.Request):
    """google-auth's requests transport with every HTTP call capped at ``limit`` seconds: google-auth's own
    default is 120 s, which would keep a thread the caller gave up on busy that long."""

    def __init__(self, limit: float) -> None:
        super().__init__()
        self._limit = limit

    def __call__(self, url: str, method: str = "GET", body: bytes | None = None,
                 headers: Mapping[str, str] | None = None, timeout: float | None = None,
                 **kwargs: Any) -> google.auth.transport.Response:
        capped = self._limit if timeout is None else min(timeout, self._limit)
        # Named, not super(): mypy's untyped_calls_exclude does not apply to super() calls.
        response: google.auth.transport.Response = google.auth.transport.requests.Request.__call__(
            self, url, method=method, body=body, headers=headers, timeout=capped, **kwargs)
        return response


# --- the registry --------------------------------------------------------------------------------------


class CloudAuth:
    """The runtime's cloud credential sources: one AwsChain per profile and one GoogleToken per key file
    (None: the default chain, Application Default Credentials), created on first use."""

    def __init__(self, *, timeout: float = 5.0, backoff: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._timeout = timeout
        self._backoff = backoff
        self._clock = clock
        self._aws: dict[str | None, AwsChain] = {}
        self._google: dict[str | None, GoogleToken] = {}

    def aws(self, profile: str | None = None) -> AwsChain:
        chain = self._aws.get(profile)
        if chain is None:
            chain = self._aws[profile] = AwsChain(profile, timeout=self._timeout, backoff=self._backoff,
                                                  clock=self._clock)
        return chain

    def google(self, key_file: str | None = None) -> GoogleToken:
        token = self._google.get(key_file)
        if token is None:
            token = self._google[key_file] = GoogleToken(key_file, timeout=self._timeout, backoff=self._backoff,
                                                         clock=self._clock)
        return token
