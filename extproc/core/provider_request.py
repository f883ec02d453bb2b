"""How each provider API is addressed and authenticated: the path a call takes there and the
credential headers it carries.

OpenAI-shaped and Anthropic providers take the caller's endpoint under their base path. Azure OpenAI
takes a deployment path (``/openai/deployments/{deployment}/…?api-version=…``) or its v1 path; Bedrock
names the model in ``/model/{id}/converse[-stream]``; Gemini and Vertex AI in ``…/models/{model}:
generateContent`` (``:streamGenerateContent?alt=sse`` to stream).

Credentials are the provider's own, never the caller's: an API key from a file or variable, an Entra ID
token kept fresh in a file, a SigV4 signature over the exact body sent (the AWS chain's keys), or a
Google OAuth token. Getting one may wait on a token endpoint (in a thread, bounded): it never blocks the
event loop, and a credential that cannot be had is a 503 naming the provider, with the reason logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from urllib.parse import quote, urlsplit

from extproc.base.apis import ApiError, ErrorKind
from extproc.core.cloud_auth import CloudAuth, CredentialUnavailable, sigv4_headers
from extproc.core.credentials import CredentialStore, api_headers
from extproc.policy.model import AZURE_V1, Provider

log = logging.getLogger(__name__)

# Every header a caller might carry a credential in: what we do not set ourselves is removed.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key", "x-amz-date",
                      "x-amz-security-token", "x-amz-content-sha256")
# Azure's deployment paths for the operations they serve (the Responses API has no deployment path).
_AZURE_DEPLOYMENT_OPERATIONS = {"chat_completions": "/chat/completions", "completions": "/completions",
                                "embeddings": "/embeddings"}


def provider_path(provider: Provider, operation: str, suffix: str, *, model: str, stream: bool, query: str) -> str:
    """The path (and query) the call is sent to. ``suffix`` is the caller endpoint's own (``/chat/completions``)
    for OpenAI-shaped and Anthropic providers; ``query`` the caller's, kept where the API has no query of ours."""
    base = provider.base_path
    api = provider.api
    if api == "bedrock":
        return f"{base}/model/{quote(model, safe='')}/{'converse-stream' if stream else 'converse'}"
    if api in ("gemini", "vertex"):
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        if api == "gemini":
            return f"{base}/v1beta/models/{quote(model, safe='')}:{method}"
        return (f"{base}/v1/projects/{provider.project}/locations/{provider.location}/publishers/google/models/"
                f"{quote(model, safe='')}:{method}")
    if api == "azure_openai":
        return _azure_path(provider, operation, suffix, model)
    return base + suffix + query


def _azure_path(provider: Provider, operation: str, suffix: str, model: str) -> str:
    version = provider.api_version
    if version == AZURE_V1:
        return f"{provider.base_path}/openai/v1{suffix}"
    deployment_suffix = _AZURE_DEPLOYMENT_OPERATIONS.get(operation)
    if deployment_suffix is None:  # the Responses API: the deployment is the body's model
        return f"{provider.base_path}/openai{suffix}?api-version={version}"
    deployment = deployment_of(provider, model)
    deployment_path = f"/openai/deployments/{quote(deployment, safe='')}{deployment_suffix}"
    return f"{provider.base_path}{deployment_path}?api-version={version}"


def deployment_of(provider: Provider, model: str) -> str:
    """The Azure deployment serving ``model`` (the policy check makes sure every routed model has one)."""
    return (provider.deployments or {}).get(model, model)


def body_model(provider: Provider, model: str) -> str:
    """The ``model`` a body sent to this provider names: Azure's Responses API takes the deployment."""
    if provider.api == "azure_openai" and provider.api_version != AZURE_V1:
        return deployment_of(provider, model)
    return model


async def provider_auth(provider: Provider, keys: CredentialStore, cloud: CloudAuth, *, path: str, body: bytes,
                        request_headers: Mapping[str, str]) -> list[tuple[str, str]] | ApiError:
    """The credential headers for one call to ``provider`` (none for a provider without a credential),
    plus what its API requires besides (Anthropic's version); or the 503 when it cannot be had."""
    return await credential_headers(provider, keys, cloud, path=path, body=body,
                                    extra=api_headers(provider, request_headers))


async def credential_headers(provider: Provider, keys: CredentialStore, cloud: CloudAuth, *, path: str, body: bytes,
                             extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]] | ApiError:
    """The provider's credential for one call to ``path`` with ``body`` (a signature covers both), then ``extra``."""
    extra = extra or []
    source = provider.credential
    if source is None:
        return extra
    try:
        if source.type == "aws":
            aws = await cloud.aws(source.profile).keys()
            url = f"{urlsplit(provider.base_url).scheme}://{provider.authority}{path}"
            return [*sigv4_headers(aws, region=provider.region or "", service="bedrock", method="POST", url=url,
                                   body=body), *extra]
        if source.type == "google":
            token = await cloud.google(source.file).token()
            return [("authorization", f"Bearer {token}"), *extra]
    except CredentialUnavailable as exc:
        return _unavailable(provider, exc.reason)
    key = keys.get(source)
    if key is None:
        where = f"variable {source.env}" if source.env else f"file {source.file}"
        return _unavailable(provider, f"the {where} is missing or empty")
    return [_key_header(provider, source.type, key), *extra]


def _key_header(provider: Provider, kind: str, key: str) -> tuple[str, str]:
    api = provider.api
    if api == "anthropic":
        return "x-api-key", key
    if api == "azure_openai":
        return ("authorization", f"Bearer {key}") if kind == "entra_id" else ("api-key", key)
    if api == "gemini":
        return "x-goog-api-key", key
    return "authorization", f"Bearer {key}"


def _unavailable(provider: Provider, reason: str) -> ApiError:
    log.warning("the credential of provider %r cannot be had: %s", provider.name, reason)
    return ApiError(ErrorKind.UNAVAILABLE, f"the credential for provider {provider.name!r} is not available; the "
                    "platform team must provide it", "credential_unavailable")
