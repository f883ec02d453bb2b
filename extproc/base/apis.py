"""The AI wire formats we understand: which paths they use and how they spell errors."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from enum import Enum, StrEnum
from urllib.parse import unquote

import orjson


class Api(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


@dataclass(frozen=True, slots=True)
class Endpoint:
    api: Api
    operation: str
    suffix: str  # appended to a provider's base path, e.g. "/chat/completions"
    # The body's format when it is not the API's own: a provider's path, seen only on a fallback attempt
    # (Envoy re-sends the body the failed hop was sent, to the path that hop was sent to).
    wire: str | None = None

    @property
    def body_format(self) -> str:
        """How its bodies, streams and usage read: the API's own, except the Responses API's."""
        if self.wire is not None:
            return self.wire
        return RESPONSES_FORMAT if self.operation == "responses" else str(self.api)

    @property
    def relayed_only(self) -> bool:
        """A provider's own path: governed only as a fallback attempt that carries a genuine state."""
        return self.wire is not None


RESPONSES_FORMAT = "openai_responses"
BEDROCK_FORMAT = "bedrock"  # Bedrock Converse
GEMINI_FORMAT = "gemini"  # Gemini API and Vertex AI generateContent


class ProviderApi(StrEnum):
    """The provider APIs a ``providers:`` entry may name."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    AZURE_OPENAI = "azure_openai"
    BEDROCK = "bedrock"
    GEMINI = "gemini"
    VERTEX = "vertex"
    OPENAI_COMPATIBLE = "openai_compatible"


# The body format each provider API reads and answers in: the OpenAI-shaped ones share OpenAI's.
_WIRE_FORMAT = {"openai": "openai", "azure_openai": "openai", "openai_compatible": "openai", "anthropic": "anthropic",
                "bedrock": BEDROCK_FORMAT, "gemini": GEMINI_FORMAT, "vertex": GEMINI_FORMAT}
# OpenTelemetry GenAI semantic conventions' gen_ai.provider.name for each provider API. An in-mesh
# OpenAI-compatible server has no registered value; it is named by its API shape.
GENAI_PROVIDER = {"openai": "openai", "azure_openai": "azure.ai.openai", "openai_compatible": "openai",
                  "anthropic": "anthropic", "bedrock": "aws.bedrock", "gemini": "gcp.gemini", "vertex": "gcp.vertex_ai"}


def wire_format(provider_api: str) -> str:
    """The body format a provider API speaks: ``openai``, ``anthropic``, ``bedrock`` or ``gemini``."""
    return _WIRE_FORMAT[provider_api]


def native_api(provider_api: str) -> Api | None:
    """The caller API whose endpoints a provider serves as they are; None for Bedrock and Google, which are
    always reached through translation."""
    wire = _WIRE_FORMAT[provider_api]
    return Api(wire) if wire in ("openai", "anthropic") else None


def relayed_endpoint(path: str) -> Endpoint | None:
    """The endpoint a provider's own path stands for, on a fallback attempt Envoy sends back to it.

    An OpenAI-shaped or Anthropic path under any base (``/openai/deployments/d/chat/completions``,
    ``/openai/v1/responses``), Bedrock's ``/model/{id}/converse[-stream]``, and Google's
    ``…/models/{model}:generateContent`` / ``:streamGenerateContent``.
    """
    canonical = canonical_path(path).rstrip("/")
    last = canonical.rsplit("/", 1)[-1]
    # The path says whether the call streams (these bodies do not).
    if last in ("converse", "converse-stream") and canonical.count("/") >= 3 and "/model/" in canonical:
        return Endpoint(Api.ANTHROPIC, "converse_stream" if last == "converse-stream" else "converse", "",
                        BEDROCK_FORMAT)
    if last.endswith((":generateContent", ":streamGenerateContent")) and "/models/" in canonical:
        stream = last.endswith(":streamGenerateContent")
        return Endpoint(Api.ANTHROPIC, "stream_generate_content" if stream else "generate_content", "", GEMINI_FORMAT)
    for known, endpoint in ENDPOINTS.items():
        if canonical.endswith(known.removeprefix("/v1")):
            return endpoint
    return None

# The AI endpoints governed natively (POST, a model in the body): routing, quotas, cache, fallback.
ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint(Api.OPENAI, "chat_completions", "/chat/completions"),
    "/v1/responses": Endpoint(Api.OPENAI, "responses", "/responses"),
    "/v1/completions": Endpoint(Api.OPENAI, "completions", "/completions"),
    "/v1/embeddings": Endpoint(Api.OPENAI, "embeddings", "/embeddings"),
    "/v1/messages": Endpoint(Api.ANTHROPIC, "messages", "/messages"),
    "/v1/messages/count_tokens": Endpoint(Api.ANTHROPIC, "count_tokens", "/messages/count_tokens"),
}


@dataclass(frozen=True, slots=True)
class Resource:
    """A provider call without a model in its body: state the provider keeps (a stored response) or lists."""

    api: Api
    operation: str
    suffix: str  # appended to the provider's base path


# (method, path pattern, API or None for the caller's) → operation; '{}' is one path segment.
_RESOURCES: tuple[tuple[frozenset[str], tuple[str, ...], Api | None, str], ...] = (
    (frozenset({"GET"}), ("v1", "models"), None, "models"),
    (frozenset({"GET"}), ("v1", "models", "{}"), None, "model"),
    (frozenset({"GET", "DELETE"}), ("v1", "responses", "{}"), Api.OPENAI, "response"),
    (frozenset({"GET"}), ("v1", "responses", "{}", "input_items"), Api.OPENAI, "response_input_items"),
    (frozenset({"POST"}), ("v1", "responses", "{}", "cancel"), Api.OPENAI, "response_cancel"),
)


def resource(method: str, path: str, headers: dict[str, str]) -> Resource | None:
    """The provider resource a body-less call names (GET /v1/models, GET /v1/responses/{id}, ...), if any."""
    parts = tuple(canonical_path(path).strip("/").split("/"))
    for methods, pattern, api, operation in _RESOURCES:
        if method in methods and len(parts) == len(pattern) and all(
                p == q or (q == "{}" and p) for p, q in zip(parts, pattern, strict=True)):
            return Resource(api or api_of_caller(path, headers), operation, "/" + "/".join(parts[1:]))
    return None


def split_path(path: str) -> tuple[str, str]:
    """``/v1/x?y=1`` → (``/v1/x``, ``?y=1``)."""
    cut = path.find("?")
    return (path, "") if cut < 0 else (path[:cut], path[cut:])


def canonical_path(path: str) -> str:
    """The path part as a server that decodes it would read it: ``/v1//chat%2Fcompletions/`` → ``/v1/chat/completions``.

    Percent-escapes (``%2F`` included) are decoded, repeated slashes merged and dot segments resolved, so
    that an encoded or padded spelling of an AI endpoint is governed like the endpoint itself: an
    upstream that decodes the path (most do) would otherwise serve a call the policy never saw.
    Decoding repeats until stable, so a double-encoded ``%252F`` cannot pass either.
    """
    raw = split_path(path)[0]
    for _ in range(3):
        decoded = unquote(raw)
        if decoded == raw:
            break
        raw = decoded
    normal = posixpath.normpath("/" + raw.replace("\\", "/"))
    return "/" + normal.lstrip("/")


def classify(path: str) -> Endpoint | None:
    return ENDPOINTS.get(canonical_path(path).rstrip("/"))


def api_of_caller(path: str, headers: dict[str, str]) -> Api:
    """Which error format a caller understands, even on a path we do not handle."""
    endpoint = classify(path)
    if endpoint is not None:
        return endpoint.api
    if "anthropic-version" in headers or "x-api-key" in headers or "/messages" in path:
        return Api.ANTHROPIC
    return Api.OPENAI


class ErrorKind(Enum):
    # status, OpenAI error type, Anthropic error type
    INVALID_REQUEST = (400, "invalid_request_error", "invalid_request_error")
    PERMISSION = (403, "permission_error", "permission_error")
    NOT_FOUND = (404, "invalid_request_error", "not_found_error")
    METHOD = (405, "invalid_request_error", "invalid_request_error")
    TOO_LARGE = (413, "invalid_request_error", "request_too_large")
    MEDIA_TYPE = (415, "invalid_request_error", "invalid_request_error")
    RATE_LIMIT = (429, "rate_limit_exceeded", "rate_limit_error")
    # No 500 or 504 here: Envoy's local-reply mappers read those as "the processor failed".
    UNAVAILABLE = (503, "server_error", "overloaded_error")

    @property
    def status(self) -> int:
        return self.value[0]


@dataclass(frozen=True, slots=True)
class ApiError:
    """An error answered by the processor itself, rendered in the caller's API format."""

    kind: ErrorKind
    message: str
    code: str
    param: str | None = None
    openai_type: str | None = None  # e.g. "requests" or "tokens" on a 429, as OpenAI says

    def render(self, api: Api) -> bytes:
        _, openai_type, anthropic_type = self.kind.value
        openai_type = self.openai_type or openai_type
        if api == Api.ANTHROPIC:
            return orjson.dumps({"type": "error", "error": {"type": anthropic_type, "message": self.message}})
        return orjson.dumps(
            {"error": {"message": self.message, "type": openai_type, "param": self.param, "code": self.code}}
        )
