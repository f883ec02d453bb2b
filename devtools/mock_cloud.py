"""The cloud-hosted wire formats of the mock provider: Azure OpenAI, AWS Bedrock (Converse), Google's
Gemini API and Vertex AI, and the OAuth token endpoint Vertex callers get their access tokens from.

devtools.mock_provider hooks this module in twice: ``setup`` from build_app (app state) and ``route`` from
its dispatcher, before its own suffix routing (an Azure deployment path ends like an OpenAI one). The
replies, tool calls and token counts come from mock_provider's generator (_reply_for, _word_deltas,
_pick_tool/_arguments_for, _prompt_tokens), so one conversation gets the same answer from every API, and the
x-mock-* faults work as mock_provider's docstring says, each API's errors in its own envelope:

  Azure OpenAI  the OpenAI handlers themselves, behind Azure's auth (`api-key` or an Entra ID Bearer
                token), `api-version` and deployment checks; the deployment's model goes into the body
  Bedrock       Converse JSON and the binary AWS event stream (own encoder, below), SigV4 verified by
                recomputing the signature with botocore over exactly the signed headers as received
  Gemini        generateContent and streamGenerateContent (SSE with CRLF line ends, or a JSON array)
  Vertex AI     the same bodies under projects/{p}/locations/{l}/publishers/google/models/{m}, with
                a Bearer token issued by POST /token (google-auth's service-account JWT-bearer grant)
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import json
import math
import random
import re
import struct
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from devtools import mock_provider as mp

__all__ = ["AZURE_OPENAI", "BEDROCK", "GEMINI", "GOOGLE_OAUTH", "TOKENS_KEY", "VERTEX", "route", "setup"]

AZURE_OPENAI: Final = "azure_openai"
BEDROCK: Final = "bedrock"
GEMINI: Final = "gemini"
VERTEX: Final = "vertex"
GOOGLE_OAUTH: Final = "google_oauth"

# Access tokens POST /token issued: token -> expiry (epoch seconds). Tests may expire one by hand.
TOKENS_KEY: Final = web.AppKey("mock_google_tokens", dict[str, float])
_TOKEN_TTL_S: Final = 3600

_Reply = Coroutine[Any, Any, web.StreamResponse]


def setup(app: web.Application) -> None:
    app[TOKENS_KEY] = {}


def route(request: web.Request) -> _Reply | None:
    """The handler call for a cloud API request, or None to leave it to mock_provider's routing."""
    if request.method != "POST":
        return None
    parts = request.path.rstrip("/").split("/")
    if parts[-1] == "token":
        return _oauth_token(request)
    azure = _azure_path(request, parts)
    if azure is not None:
        return _azure(request, azure)
    raw_parts = request.rel_url.raw_path.rstrip("/").split("/")
    if len(raw_parts) >= 3 and raw_parts[-3] == "model" and raw_parts[-1] in ("converse", "converse-stream"):
        return _bedrock(request, unquote(raw_parts[-2]), stream=raw_parts[-1] == "converse-stream")
    google = _google_target(parts)
    return None if google is None else _google(request, google)


# ---------------------------------------------------------------------------------------------------
# the API-neutral turn: what the mock answers, whichever API asked


@dataclass(frozen=True)
class _Ask:
    model: str
    messages: list[dict[str, Any]]  # [{"role": "user" | "assistant", "content": text}]
    prompt_chars: int
    tools: list[tuple[Any, Any]]  # (name, JSON schema of the arguments)
    forced: object  # the function the tool choice names, else None
    required: bool  # the tool choice requires a call
    may_call: bool  # tools allowed and the conversation ends in a user prompt (not a tool's result)
    max_tokens: int | None


@dataclass(frozen=True)
class _Answer:
    text: str
    call: tuple[str, dict[str, Any]] | None  # (function name, arguments) instead of text
    input_tokens: int
    output_tokens: int
    stop: str  # "end", "tool" or "length"


def _answer(ask: _Ask) -> _Answer:
    """The mock's one reply rule (see "tool calls" in mock_provider), with a max-tokens cut."""
    input_tokens = mp._prompt_tokens(ask.prompt_chars)
    prompt = ask.messages[-1]["content"] if ask.messages else ""
    picked = mp._pick_tool(ask.tools, ask.forced, ask.required, prompt) if ask.may_call else None
    if picked is not None and isinstance(picked[0], str):
        arguments = mp._arguments_for(picked[1])
        tokens = mp._call_tokens(picked[0], mp._dumps(arguments).decode())
        return _Answer("", (picked[0], arguments), input_tokens, tokens, "tool")
    words = mp._reply_for(ask.model, ask.messages).split(" ")
    if ask.max_tokens is not None and 0 < ask.max_tokens < len(words):
        return _Answer(" ".join(words[: ask.max_tokens]), None, input_tokens, ask.max_tokens, "length")
    text = " ".join(words)
    return _Answer(text, None, input_tokens, len(text.split()), "end")


def _int_field(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _reject(response: web.Response) -> mp._Reject:
    return mp._Reject(response)


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _obj(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one (for reading optional fields)."""
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------------------------------------
# Azure OpenAI


_AZURE_KINDS: Final = {
    ("chat", "completions"): mp._CHAT,
    ("completions",): mp._COMPLETIONS,
    ("embeddings",): mp._EMBEDDINGS,
    ("responses",): mp._RESPONSES,
}
_AZURE_401: Final = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an "
    "active subscription and use a correct regional API endpoint for your resource."
)
_DEPLOYMENT_NOT_FOUND: Final = (
    "The API deployment for this resource does not exist. If you created the deployment within the last 5 "
    "minutes, please wait a moment and try again."
)


@dataclass(frozen=True)
class _AzurePath:
    kind: str
    deployment: str | None  # None: the deployment is the body's `model` (v1 and /openai/responses)
    versioned: bool  # the path needs ?api-version


def _azure_path(request: web.Request, parts: list[str]) -> _AzurePath | None:
    if "openai" not in parts:
        return None
    rest = parts[parts.index("openai") + 1 :]
    if len(rest) >= 3 and rest[0] == "deployments" and rest[1]:
        kind = _AZURE_KINDS.get(tuple(rest[2:]))
        return None if kind in (None, mp._RESPONSES) else _AzurePath(str(kind), rest[1], versioned=True)
    if rest[:1] == ["v1"]:
        kind = _AZURE_KINDS.get(tuple(rest[1:]))
        return None if kind is None or not _speaks_azure(request) else _AzurePath(kind, None, versioned=False)
    if rest == ["responses"] and "api-version" in request.query:
        return _AzurePath(mp._RESPONSES, None, versioned=True)
    return None


def _speaks_azure(request: web.Request) -> bool:
    """Whether an /openai/v1/ request is Azure's rather than OpenAI's behind a base path."""
    if "api-key" in request.headers or "api-version" in request.query:
        return True
    config = request.app[mp._CONFIG_KEY]
    if config.azure_key is None and config.azure_token is None and not config.azure_deployments:
        return False
    return config.openai_key is None or _bearer(request) != config.openai_key


def _azure_error(status: int, code: str, message: str, headers: dict[str, str]) -> web.Response:
    return mp._json_response(status, {"error": {"code": code, "message": message}}, headers)


def _check_azure_auth(request: web.Request, path: _AzurePath, headers: dict[str, str]) -> None:
    config = request.app[mp._CONFIG_KEY]
    if config.azure_key is None and config.azure_token is None:
        return
    key = request.headers.get("api-key")
    if key is not None:
        accepted = key == config.azure_key
    else:
        # Entra ID tokens everywhere; the v1 API also takes the key itself as a Bearer token.
        tokens = {config.azure_token, None if path.versioned else config.azure_key} - {None}
        accepted = _bearer(request) in tokens
    if not accepted:
        raise _reject(_azure_error(401, "401", _AZURE_401, headers))


def _azure_model(request: web.Request, deployment: str, headers: dict[str, str]) -> str:
    deployments = request.app[mp._CONFIG_KEY].azure_deployments
    if not deployments:
        return deployment
    model = deployments.get(deployment)
    if model is None:
        raise _reject(_azure_error(404, "DeploymentNotFound", _DEPLOYMENT_NOT_FOUND, headers))
    return model


_AZURE_FAULTS: Final = {
    400: ("BadRequest", "Injected error status 400 from mock provider."),
    401: ("401", _AZURE_401),
    404: ("404", "Resource not found"),
    500: ("InternalServerError", "Backend returned unexpected response. Please contact Microsoft for help."),
    503: ("ServiceUnavailable", "The service is temporarily unable to process your request. Please try again later."),
}


def _azure_fault(status: int, headers: dict[str, str], api_version: str) -> web.Response:
    if status == 429:
        headers["retry-after"] = "1"
        message = (
            f"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version {api_version} have "
            "exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after 1 second. Please go "
            "here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."
        )
        return _azure_error(429, "429", message, headers)
    code, message = _AZURE_FAULTS.get(status, (str(status), f"Injected error status {status} from mock provider."))
    return _azure_error(status, code, message, headers)


def _azure_names(request: web.Request, path: _AzurePath) -> tuple[str, ...] | None:
    """The names x-mock-only may target: the deployment's model and the deployment (None: the body's)."""
    if path.deployment is None:
        return None
    model = request.app[mp._CONFIG_KEY].azure_deployments.get(path.deployment, path.deployment)
    return model, path.deployment


async def _azure(request: web.Request, path: _AzurePath) -> web.StreamResponse:
    call = await mp._begin(request, AZURE_OPENAI, _azure_names(request, path))
    if call is None:
        return mp._reset_response()
    headers = call.headers
    headers["apim-request-id"] = str(uuid.uuid4())
    headers["x-ms-region"] = "East US"
    try:
        if path.versioned and "api-version" not in request.query:
            return _azure_error(404, "404", "Resource not found", headers)
        _check_azure_auth(request, path, headers)
        body = call.body
        deployment = path.deployment or (body.get("model") if isinstance(body, dict) else None)
        if isinstance(deployment, str) and deployment:
            model = _azure_model(request, deployment, headers)
            headers["x-mock-received-model"] = model
            if isinstance(body, dict):
                call.body = {**body, "model": model}
        if call.fault is not None:
            return _azure_fault(call.fault, headers, request.query.get("api-version", "v1"))
        return await mp._openai_api(request, path.kind, None, call)
    except mp._Reject as reject:
        reject.response.headers["openai-processing-ms"] = mp._elapsed_ms(call.started)
        return reject.response


# ---------------------------------------------------------------------------------------------------
# AWS: error envelopes and SigV4 verification


_CORAL_NS: Final = "http://internal.amazon.com/coral/com.amazon.coral.service/"
_BEDROCK_NS: Final = "http://internal.amazon.com/coral/com.amazon.bedrock/"
_SIGNATURE_MISMATCH: Final = (
    "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access "
    "Key and signing method. Consult the service documentation for details."
)
_INVALID_TOKEN: Final = "The security token included in the request is invalid."
_AMZ_DATE: Final = "%Y%m%dT%H%M%SZ"
_MAX_SKEW: Final = dt.timedelta(minutes=5)
_SIGV4_RE: Final = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=([^,\s]+),\s*SignedHeaders=([^,\s]+),\s*Signature=([0-9a-f]+)\s*"
)


def _aws_error(
    status: int, err_type: str, message: str, headers: dict[str, str], namespace: str = _BEDROCK_NS
) -> web.Response:
    headers["x-amzn-ErrorType"] = f"{err_type}:{namespace}"
    return mp._json_response(status, {"message": message}, headers)


def _auth_error(err_type: str, message: str, headers: dict[str, str]) -> mp._Reject:
    return _reject(_aws_error(403, err_type, message, headers, _CORAL_NS))


@dataclass(frozen=True)
class _SigV4:
    access_key: str
    date: str
    region: str
    service: str
    signed: tuple[str, ...]
    signature: str
    amz_date: str


def _sigv4_header(request: web.Request, headers: dict[str, str]) -> _SigV4:
    auth = request.headers.get("authorization")
    if auth is None:
        raise _auth_error("MissingAuthenticationTokenException", "Missing Authentication Token", headers)
    match = _SIGV4_RE.fullmatch(auth.strip())
    scope = match.group(1).split("/") if match else []
    if match is None or len(scope) != 5 or scope[4] != "aws4_request":
        raise _auth_error(
            "IncompleteSignatureException",
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters "
            f"(Credential=<key>/<date>/<region>/<service>/aws4_request). Authorization={auth}",
            headers,
        )
    amz_date = request.headers.get("x-amz-date")
    if amz_date is None:
        raise _auth_error(
            "IncompleteSignatureException",
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
            headers,
        )
    signed = tuple(match.group(2).lower().split(";"))
    return _SigV4(scope[0], scope[1], scope[2], scope[3], signed, match.group(3), amz_date)


def _check_identity(request: web.Request, sig: _SigV4, headers: dict[str, str]) -> None:
    config = request.app[mp._CONFIG_KEY]
    if sig.access_key != config.aws_access_key_id:
        raise _auth_error("UnrecognizedClientException", _INVALID_TOKEN, headers)
    token = request.headers.get("x-amz-security-token")
    if token != config.aws_session_token or (token is not None and "x-amz-security-token" not in sig.signed):
        raise _auth_error("UnrecognizedClientException", _INVALID_TOKEN, headers)


def _check_date(sig: _SigV4, headers: dict[str, str]) -> None:
    try:
        signed_at = dt.datetime.strptime(sig.amz_date, _AMZ_DATE).replace(tzinfo=dt.UTC)
    except ValueError:
        raise _auth_error(
            "IncompleteSignatureException", f"Date must be in ISO-8601 'basic format'. Got '{sig.amz_date}'.", headers
        ) from None
    now = dt.datetime.now(dt.UTC)
    if signed_at < now - _MAX_SKEW:
        raise _auth_error(
            "InvalidSignatureException",
            f"Signature expired: {sig.amz_date} is now earlier than {(now - _MAX_SKEW).strftime(_AMZ_DATE)} "
            f"({now.strftime(_AMZ_DATE)} - 5 min.)",
            headers,
        )
    if signed_at > now + _MAX_SKEW:
        raise _auth_error(
            "InvalidSignatureException",
            f"Signature not yet current: {sig.amz_date} is still later than {(now + _MAX_SKEW).strftime(_AMZ_DATE)} "
            f"({now.strftime(_AMZ_DATE)} + 5 min.)",
            headers,
        )


def _check_scope(request: web.Request, sig: _SigV4, headers: dict[str, str]) -> None:
    region = request.app[mp._CONFIG_KEY].aws_region
    problem = None
    if sig.date != sig.amz_date[:8]:
        problem = (
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
            f"'{sig.date}' != '{sig.amz_date[:8]}', from '{sig.amz_date}'."
        )
    elif region is not None and sig.region != region:
        problem = f"Credential should be scoped to a valid region. '{sig.region}' is wrong; expecting '{region}'"
    elif sig.service != "bedrock":
        problem = f"Credential should be scoped to correct service: 'bedrock'. The service '{sig.service}' is wrong"
    elif "host" not in sig.signed:
        problem = "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization."
    if problem is not None:
        raise _auth_error("InvalidSignatureException", problem, headers)


class _SignedHeadersOnly(SigV4Auth):
    """botocore's signer over exactly the headers the request carries (botocore leaves out a few, such as
    user-agent, when it signs; a verifier must take whatever the client listed as signed)."""

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        signed = HTTPHeaders()
        for name, value in request.headers.items():
            signed[name.lower()] = value
        return signed


def _expected_signature(request: web.Request, sig: _SigV4, body: bytes) -> str:
    """Recompute the signature over the request as received: method, raw path and query, signed headers, body."""
    config = request.app[mp._CONFIG_KEY]
    aws = AWSRequest(method=request.method, url=f"{request.scheme}://{request.host}{request.raw_path}", data=body)
    for name in sig.signed:
        for value in request.headers.getall(name, ()):
            aws.headers[name] = value  # HTTPHeaders appends: repeated headers stay repeated
    aws.context["timestamp"] = sig.amz_date
    credentials = Credentials(sig.access_key, config.aws_secret_access_key or "", config.aws_session_token)
    signer = _SignedHeadersOnly(credentials, sig.service, sig.region)
    canonical = signer.canonical_request(aws)
    return signer.signature(signer.string_to_sign(aws, canonical), aws)


def _check_sigv4(request: web.Request, body: bytes, headers: dict[str, str]) -> None:
    if request.app[mp._CONFIG_KEY].aws_access_key_id is None:
        return
    sig = _sigv4_header(request, headers)
    _check_identity(request, sig, headers)
    _check_date(sig, headers)
    _check_scope(request, sig, headers)
    if not hmac.compare_digest(_expected_signature(request, sig, body), sig.signature):
        raise _auth_error("InvalidSignatureException", _SIGNATURE_MISMATCH, headers)


_BEDROCK_FAULTS: Final = {
    400: ("ValidationException", "Injected validation error from mock provider."),
    403: ("AccessDeniedException", "You don't have access to the model with the specified model ID."),
    404: ("ResourceNotFoundException", "Could not resolve the foundation model from the provided model identifier."),
    408: ("ModelTimeoutException", "Model has timed out in processing the request. Try your request again."),
    424: ("ModelErrorException", "The model returned an error (injected by mock provider)."),
    429: ("ThrottlingException", "Too many requests, please wait before trying again."),
    500: ("InternalServerException", "The system encountered an unexpected error during processing. Try again."),
    503: ("ServiceUnavailableException", "Bedrock is unable to process your request."),
}


def _bedrock_fault(status: int, headers: dict[str, str]) -> web.Response:
    default = "InternalServerException" if status >= 500 else "ValidationException"
    err_type, message = _BEDROCK_FAULTS.get(status, (default, f"Injected error status {status} from mock provider."))
    return _aws_error(status, err_type, message, headers)


# ---------------------------------------------------------------------------------------------------
# Bedrock Converse: validation and the request's turn


_CONVERSE_FIELDS: Final = frozenset(
    {
        "messages", "system", "inferenceConfig", "toolConfig", "guardrailConfig", "additionalModelRequestFields",
        "additionalModelResponseFieldPaths", "promptVariables", "requestMetadata", "performanceConfig",
    }
)


def _validation(message: str, headers: dict[str, str]) -> mp._Reject:
    return _reject(_aws_error(400, "ValidationException", message, headers))


def _converse_body(body: Any, headers: dict[str, str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _validation("Malformed input request, please reformat your input and try again.", headers)
    unknown = sorted(set(body) - _CONVERSE_FIELDS)
    if unknown:
        raise _validation(
            f"Malformed input request: extraneous key [{unknown[0]}] is not permitted, please reformat your input "
            "and try again.",
            headers,
        )
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _validation(
            "1 validation error detected: Value null at 'messages' failed to satisfy constraint: "
            "Member must not be null",
            headers,
        )
    if not messages:
        raise _validation("A conversation must start with a user message. Try again with a conversation that starts "
                          "with a user message.", headers)
    _check_turns(messages, headers)
    uses_tools = any(
        isinstance(block, dict) and ("toolUse" in block or "toolResult" in block)
        for message in messages for block in message["content"]
    )
    if uses_tools and not isinstance(body.get("toolConfig"), dict):
        raise _validation("The toolConfig field must be defined when using toolUse and toolResult content blocks.",
                          headers)
    max_tokens = _obj(body.get("inferenceConfig")).get("maxTokens")
    if max_tokens is not None and (_int_field(max_tokens) or 0) < 1:
        raise _validation(f"1 validation error detected: Value '{max_tokens}' at 'inferenceConfig.maxTokens' failed "
                          "to satisfy constraint: Member must have value greater than or equal to 1", headers)
    return body


def _check_turns(messages: list[Any], headers: dict[str, str]) -> None:
    previous = None
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise _validation(f"1 validation error detected: Value '{role}' at 'messages.{index}.member.role' failed "
                              "to satisfy constraint: Member must satisfy enum value set: [user, assistant]", headers)
        if previous is None and role != "user":
            raise _validation("A conversation must start with a user message. Try again with a conversation that "
                              "starts with a user message.", headers)
        if role == previous:
            raise _validation("A conversation must alternate between user and assistant roles. Make sure the "
                              "conversation alternates between user and assistant roles and try again.", headers)
        previous = role
        _check_blocks(message.get("content"), index, headers)


def _check_blocks(content: Any, index: int, headers: dict[str, str]) -> None:
    if not isinstance(content, list) or not content:
        raise _validation(f"The content field in the Message object at messages.{index} is empty. Add a ContentBlock "
                          "object to the content field and try again.", headers)
    for number, block in enumerate(content):
        if not isinstance(block, dict) or not block:
            raise _validation(f"The ContentBlock object at messages.{index}.content.{number} is empty. Add a member "
                              "to the ContentBlock object and try again.", headers)
        text = block.get("text")
        if "text" in block and (not isinstance(text, str) or not text.strip()):
            raise _validation(f"The text field in the ContentBlock object at messages.{index}.content.{number} is "
                              "blank. Add text to the text field, and try again.", headers)


def _converse_text(content: Any) -> str:
    """A message's text: its text blocks and its tool results' text (as Anthropic's tool_result is read)."""
    pieces: list[str] = []
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            pieces.append(block["text"])
        elif isinstance(block, dict) and isinstance(block.get("toolResult"), dict):
            pieces.append(mp._text_of(block["toolResult"].get("content")))
    return " ".join(piece for piece in pieces if piece)


def _converse_ask(model_id: str, payload: dict[str, Any]) -> _Ask:
    messages = payload["messages"]
    plain = [{"role": message["role"], "content": _converse_text(message["content"])} for message in messages]
    tool_config = _obj(payload.get("toolConfig"))
    specs = [_obj(_obj(tool).get("toolSpec")) for tool in tool_config.get("tools") or []]
    tools = [(spec.get("name"), _obj(spec.get("inputSchema")).get("json")) for spec in specs if spec]
    choice = _obj(tool_config.get("toolChoice"))
    forced = _obj(choice.get("tool")).get("name")
    last = messages[-1]
    may_call = last["role"] == "user" and not any("toolResult" in block for block in last["content"])
    max_tokens = _int_field(_obj(payload.get("inferenceConfig")).get("maxTokens"))
    chars = len(mp._text_of(payload.get("system"))) + sum(len(message["content"]) for message in plain)
    return _Ask(model_id, plain, chars, tools, forced, "any" in choice, may_call, max_tokens)


# ---------------------------------------------------------------------------------------------------
# Bedrock Converse: replies, and the AWS event stream


_CONVERSE_STOP: Final = {"end": "end_turn", "tool": "tool_use", "length": "max_tokens"}
# Bedrock pads every stream event with a "p" field of random length against traffic analysis: a prefix of this.
_PADDING: Final = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_STRING_HEADER: Final = 7  # the event stream's header value type for a UTF-8 string


def _converse_usage(answer: _Answer) -> dict[str, int]:
    total = answer.input_tokens + answer.output_tokens
    return {"inputTokens": answer.input_tokens, "outputTokens": answer.output_tokens, "totalTokens": total}


def _latency_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _converse_json(answer: _Answer, tool_id: str, started: float) -> dict[str, Any]:
    if answer.call is None:
        content: list[dict[str, Any]] = [{"text": answer.text}]
    else:
        content = [{"toolUse": {"toolUseId": tool_id, "name": answer.call[0], "input": answer.call[1]}}]
    return {
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": _CONVERSE_STOP[answer.stop],
        "usage": _converse_usage(answer),
        "metrics": {"latencyMs": _latency_ms(started)},
    }


def _header(name: str, value: str) -> bytes:
    encoded_name, encoded_value = name.encode(), value.encode()
    return (
        struct.pack(">B", len(encoded_name)) + encoded_name
        + struct.pack(">BH", _STRING_HEADER, len(encoded_value)) + encoded_value
    )


def event_frame(event_type: str, payload: dict[str, Any]) -> bytes:
    """One AWS event-stream message: prelude (total length, headers length, CRC32 of those 8 bytes), string
    headers, the JSON payload padded like Bedrock's, and the CRC32 of everything before it."""
    headers = (
        _header(":event-type", event_type) + _header(":content-type", "application/json")
        + _header(":message-type", "event")
    )
    body = mp._dumps({**payload, "p": _PADDING[: random.randint(1, len(_PADDING))]})
    prelude = struct.pack(">II", 12 + len(headers) + len(body) + 4, len(headers))
    message = prelude + struct.pack(">I", binascii.crc32(prelude)) + headers + body
    return message + struct.pack(">I", binascii.crc32(message))


def _input_deltas(arguments: str) -> list[str]:
    """Tool input JSON in two or more fragments, as Bedrock streams it."""
    pieces = mp._argument_deltas(arguments)
    if len(pieces) >= 2:
        return pieces
    middle = max(1, len(arguments) // 2)
    return [arguments[:middle], arguments[middle:]]


def _converse_events(answer: _Answer, tool_id: str, started: float) -> Iterator[bytes]:
    yield event_frame("messageStart", {"role": "assistant"})
    if answer.call is None:
        for delta in mp._word_deltas(answer.text):
            yield event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": delta}})
    else:
        name, arguments = answer.call
        start = {"toolUse": {"toolUseId": tool_id, "name": name}}
        yield event_frame("contentBlockStart", {"contentBlockIndex": 0, "start": start})
        for piece in _input_deltas(mp._dumps(arguments).decode()):
            yield event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"toolUse": {"input": piece}}})
    yield event_frame("contentBlockStop", {"contentBlockIndex": 0})
    yield event_frame("messageStop", {"stopReason": _CONVERSE_STOP[answer.stop]})
    metrics = {"latencyMs": _latency_ms(started)}  # measured when the last event is written
    yield event_frame("metadata", {"usage": _converse_usage(answer), "metrics": metrics})


async def _bedrock(request: web.Request, model_id: str, *, stream: bool) -> web.StreamResponse:
    call = await mp._begin(request, BEDROCK, (model_id,))
    if call is None:
        return mp._reset_response()
    headers = call.headers
    headers["x-amzn-RequestId"] = str(uuid.uuid4())
    try:
        _check_sigv4(request, await request.read(), headers)
        if call.fault is not None:
            return _bedrock_fault(call.fault, headers)
        answer = _answer(_converse_ask(model_id, _converse_body(call.body, headers)))
    except mp._Reject as reject:
        return reject.response
    tool_id = mp._rand_id("tooluse_", 22)
    if stream:
        events = _converse_events(answer, tool_id, call.started)
        return await mp._stream(request, events, headers, call.started, openai=False, content_type=mp._EVENTSTREAM_CT)
    return mp._json_response(200, _converse_json(answer, tool_id, call.started), headers)


# ---------------------------------------------------------------------------------------------------
# Google: Gemini API and Vertex AI routing, auth and errors


_GOOGLE_METHODS: Final = frozenset({"generateContent", "streamGenerateContent"})
_VERTEX_401: Final = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid "
    "authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
)


@dataclass(frozen=True)
class _GoogleTarget:
    api: str  # GEMINI or VERTEX
    model: str
    method: str
    project: str | None = None
    location: str | None = None


def _google_target(parts: list[str]) -> _GoogleTarget | None:
    """By path suffix, as mock_provider routes: {v1|v1beta}/models/{model}:{method} is Gemini's,
    {v1|v1beta1}/projects/{p}/locations/{l}/publishers/google/models/{model}:{method} Vertex's."""
    model, _, method = parts[-1].partition(":")
    if len(parts) < 4 or parts[-2] != "models" or not model or method not in _GOOGLE_METHODS:
        return None
    if parts[-3] in ("v1", "v1beta"):
        return _GoogleTarget(GEMINI, model, method)
    vertex = parts[-9:-1]  # v1, projects, {p}, locations, {l}, publishers, google, models
    layout = ["projects", "locations", "publishers", "models"]
    if len(vertex) == 8 and vertex[0] in ("v1", "v1beta1") and vertex[1::2] == layout:
        return _GoogleTarget(VERTEX, model, method, vertex[2], vertex[4]) if vertex[6] == "google" else None
    return None


def _google_error(
    status: int, code: str, message: str, headers: dict[str, str], details: list[dict[str, Any]] | None = None
) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": code}
    if details is not None:
        error["details"] = details
    return mp._json_response(status, {"error": error}, headers)


def _error_info(reason: str, service: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "googleapis.com",
            "metadata": {"service": service}}


def _check_gemini_key(request: web.Request, headers: dict[str, str]) -> None:
    expected = request.app[mp._CONFIG_KEY].gemini_key
    if expected is None:
        return
    key = request.headers.get("x-goog-api-key") or request.query.get("key")
    service = "generativelanguage.googleapis.com"
    if not key:
        raise _reject(_google_error(
            403, "PERMISSION_DENIED",
            "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or "
            "other form of API consumer identity to call this API.",
            headers, [_error_info("CONSUMER_INVALID", service)],
        ))
    if key != expected:
        raise _reject(_google_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
                                    headers, [_error_info("API_KEY_INVALID", service)]))


def _check_vertex(request: web.Request, target: _GoogleTarget, headers: dict[str, str]) -> None:
    token = _bearer(request)
    expiry = request.app[TOKENS_KEY].get(token) if token else None
    if expiry is None or expiry <= time.time():
        headers["www-authenticate"] = 'Bearer realm="https://accounts.google.com/"'
        raise _reject(_google_error(401, "UNAUTHENTICATED", _VERTEX_401, headers,
                                    [_error_info("ACCESS_TOKEN_TYPE_UNSUPPORTED", "aiplatform.googleapis.com")]))
    config = request.app[mp._CONFIG_KEY]
    resource = f"projects/{target.project}/locations/{target.location}/publishers/google/models/{target.model}"
    if config.vertex_project is not None and target.project != config.vertex_project:
        raise _reject(_google_error(
            403, "PERMISSION_DENIED",
            f"Permission 'aiplatform.endpoints.predict' denied on resource '//aiplatform.googleapis.com/{resource}' "
            "(or it may not exist).",
            headers,
        ))
    if config.vertex_location is not None and target.location != config.vertex_location:
        raise _reject(_google_error(404, "NOT_FOUND", f"Publisher Model `{resource}` not found.", headers))


_GOOGLE_FAULTS: Final = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", _VERTEX_401),
    403: ("PERMISSION_DENIED", "The caller does not have permission"),
    404: ("NOT_FOUND", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    500: ("INTERNAL", "An internal error has occurred. Please retry or report in "
                      "https://developers.generativeai.google/guide/troubleshooting"),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}


def _google_fault(status: int, headers: dict[str, str]) -> web.Response:
    default = "INTERNAL" if status >= 500 else "FAILED_PRECONDITION"
    code, message = _GOOGLE_FAULTS.get(status, (default, f"Injected error status {status} from mock provider."))
    return _google_error(status, code, message, headers)


# ---------------------------------------------------------------------------------------------------
# Google: the GenerateContent request


_GEMINI_FIELDS: Final = frozenset(
    {
        "contents", "systemInstruction", "generationConfig", "tools", "toolConfig", "safetySettings",
        "cachedContent", "labels", "model", "serviceTier", "store",
    }
)
_GEMINI_ROLES: Final = ("user", "model", "function")


def _camel(name: str) -> str:
    return re.sub(r"_([a-z])", lambda match: match.group(1).upper(), name)


def _get(value: Any, name: str) -> Any:
    """A field of a Google JSON object by its camelCase name; the proto JSON parser takes snake_case too."""
    if not isinstance(value, dict):
        return None
    snake = re.sub(r"([A-Z])", lambda match: "_" + match.group(1).lower(), name)
    return value.get(name, value.get(snake))


def _invalid(message: str, headers: dict[str, str], violation: bool = False) -> mp._Reject:
    details = None
    if violation:
        violations = [{"description": message}]
        details = [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": violations}]
    return _reject(_google_error(400, "INVALID_ARGUMENT", message, headers, details))


def _gemini_body(body: Any, headers: dict[str, str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _invalid("Invalid JSON payload received. Expected an object at the top level.", headers, violation=True)
    unknown = next((name for name in body if _camel(name) not in _GEMINI_FIELDS), None)
    if unknown is not None:
        raise _invalid(f'Invalid JSON payload received. Unknown name "{unknown}": Cannot find field.', headers, True)
    contents = _get(body, "contents")
    if not isinstance(contents, list) or not contents:
        raise _invalid("* GenerateContentRequest.contents: contents is not specified\n", headers)
    for index, content in enumerate(contents):
        role = content.get("role", "user") if isinstance(content, dict) else None
        if role not in _GEMINI_ROLES:
            raise _invalid("Please use a valid role: user, model.", headers)
        parts = _get(content, "parts")
        if not isinstance(parts, list) or not parts:
            raise _invalid(f"* GenerateContentRequest.contents[{index}].parts: contents.parts must not be empty.\n",
                           headers)
    return body


def _lower_types(schema: Any) -> Any:
    """Gemini's OpenAPI-style schemas spell types in capitals ("OBJECT"); the argument builder reads JSON Schema."""
    if isinstance(schema, list):
        return [_lower_types(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: value.lower() if key == "type" and isinstance(value, str) else _lower_types(value)
            for key, value in schema.items()}


def _gemini_tools(payload: dict[str, Any]) -> list[tuple[Any, Any]]:
    declarations = [
        declaration
        for tool in _get(payload, "tools") or []
        for declaration in _get(tool, "functionDeclarations") or []
        if isinstance(declaration, dict)
    ]
    return [(declaration.get("name"), _lower_types(_schema(declaration))) for declaration in declarations]


def _schema(declaration: dict[str, Any]) -> Any:
    return _get(declaration, "parametersJsonSchema") or declaration.get("parameters")


def _gemini_ask(model: str, payload: dict[str, Any]) -> _Ask:
    contents = _get(payload, "contents")
    plain = [
        {"role": "assistant" if content.get("role") == "model" else "user", "content": mp._text_of(content["parts"])}
        for content in contents
    ]
    calling = _get(_get(payload, "toolConfig"), "functionCallingConfig") or {}
    mode = str(_get(calling, "mode") or "AUTO").upper()
    allowed = _get(calling, "allowedFunctionNames")
    tools = _gemini_tools(payload)
    if mode == "ANY" and isinstance(allowed, list) and allowed:
        tools = [tool for tool in tools if tool[0] in allowed]
    forced = tools[0][0] if mode == "ANY" and isinstance(allowed, list) and len(allowed) == 1 and tools else None
    last = contents[-1]
    answered = any(isinstance(part, dict) and _get(part, "functionResponse") for part in _get(last, "parts"))
    may_call = mode != "NONE" and last.get("role", "user") != "model" and not answered
    system = mp._text_of(_get(_get(payload, "systemInstruction"), "parts"))
    chars = len(system) + sum(len(message["content"]) for message in plain)
    max_tokens = _int_field(_get(_get(payload, "generationConfig"), "maxOutputTokens"))
    return _Ask(model, plain, chars, tools, forced, mode == "ANY", may_call, max_tokens)


# ---------------------------------------------------------------------------------------------------
# Google: the GenerateContent response, whole or streamed


_GEMINI_FINISH: Final = {"end": "STOP", "tool": "STOP", "length": "MAX_TOKENS"}
_GOOGLE_CHUNKS: Final = 3  # a streamed text reply comes in (at most) this many chunks


def _google_usage(target: _GoogleTarget, prompt: int, candidates: int) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": prompt + candidates,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    if target.api == VERTEX:
        usage["trafficType"] = "ON_DEMAND"
    return usage


def _google_payload(
    target: _GoogleTarget, response_id: str, parts: list[dict[str, Any]], finish: str | None, usage: dict[str, Any]
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}}
    if finish is not None:
        candidate["finishReason"] = finish
    candidate["index"] = 0
    payload: dict[str, Any] = {"candidates": [candidate], "usageMetadata": usage, "modelVersion": target.model}
    if target.api == VERTEX:
        payload["createTime"] = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    payload["responseId"] = response_id
    return payload


def _answer_parts(answer: _Answer) -> list[dict[str, Any]]:
    if answer.call is None:
        return [{"text": answer.text}]
    return [{"functionCall": {"name": answer.call[0], "args": answer.call[1]}}]


def _google_chunks(target: _GoogleTarget, answer: _Answer, response_id: str) -> Iterator[dict[str, Any]]:
    """The streamed reply: the text in a few chunks (each with the usage so far), the finish reason on the last."""
    finish = _GEMINI_FINISH[answer.stop]
    if answer.call is not None:
        usage = _google_usage(target, answer.input_tokens, answer.output_tokens)
        yield _google_payload(target, response_id, _answer_parts(answer), finish, usage)
        return
    deltas = mp._word_deltas(answer.text)
    size = math.ceil(len(deltas) / min(_GOOGLE_CHUNKS, len(deltas)))
    groups = ["".join(deltas[i : i + size]) for i in range(0, len(deltas), size)]
    sent = 0
    for number, text in enumerate(groups, start=1):
        sent = answer.output_tokens if number == len(groups) else sent + len(text.split())
        usage = _google_usage(target, answer.input_tokens, sent)
        yield _google_payload(target, response_id, [{"text": text}], finish if number == len(groups) else None, usage)


def _sse_events(chunks: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    for chunk in chunks:
        yield b"data: " + mp._dumps(chunk) + b"\r\n\r\n"


def _json_array_events(chunks: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    """streamGenerateContent without alt=sse: one JSON array, written element by element."""
    separator = b"["
    for chunk in chunks:
        yield separator + mp._dumps(chunk)
        separator = b",\r\n"
    yield b"]" if separator != b"[" else b"[]"


async def _google_reply(
    request: web.Request, target: _GoogleTarget, answer: _Answer, call: mp._Call
) -> web.StreamResponse:
    response_id = mp._rand_id("", 22)
    if target.method == "generateContent":
        usage = _google_usage(target, answer.input_tokens, answer.output_tokens)
        payload = _google_payload(target, response_id, _answer_parts(answer), _GEMINI_FINISH[answer.stop], usage)
        return mp._json_response(200, payload, call.headers)
    chunks = _google_chunks(target, answer, response_id)
    if request.query.get("alt") == "sse":
        return await mp._stream(request, _sse_events(chunks), call.headers, call.started, openai=False)
    events = _json_array_events(chunks)
    return await mp._stream(request, events, call.headers, call.started, openai=False, content_type=mp._JSON_CT)


async def _google(request: web.Request, target: _GoogleTarget) -> web.StreamResponse:
    call = await mp._begin(request, target.api, (target.model,))
    if call is None:
        return mp._reset_response()
    call.headers["vary"] = "Origin, X-Origin, Referer"
    try:
        if target.api == VERTEX:
            _check_vertex(request, target, call.headers)
        else:
            _check_gemini_key(request, call.headers)
        if call.fault is not None:
            return _google_fault(call.fault, call.headers)
        answer = _answer(_gemini_ask(target.model, _gemini_body(call.body, call.headers)))
    except mp._Reject as reject:
        return reject.response
    return await _google_reply(request, target, answer, call)


# ---------------------------------------------------------------------------------------------------
# OAuth: POST /token, google-auth's service-account grant


_JWT_BEARER: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_BAD_SIGNATURE: Final = "Invalid JWT Signature."
_BAD_TIMES: Final = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and "
    "exp values in the JWT claim."
)
_JWT_SLACK_S: Final = 300


class _GrantError(Exception):
    """An assertion the token endpoint refuses; the message is the error_description."""


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _rsa_key(pem: str) -> rsa.RSAPublicKey:
    data = pem.encode()
    key = (
        x509.load_pem_x509_certificate(data).public_key()
        if b"CERTIFICATE" in data
        else serialization.load_pem_public_key(data)
    )
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("google_public_key_pem: an RSA public key or certificate is needed for RS256")
    return key


def _jwt_claims(assertion: str, public_pem: str | None) -> dict[str, Any]:
    """The claims of an RS256 JWT whose signature checks out against ``public_pem`` (unchecked when None)."""
    try:
        header_b64, claims_b64, signature_b64 = assertion.split(".")
        header, claims = json.loads(_b64url(header_b64)), json.loads(_b64url(claims_b64))
        signature = _b64url(signature_b64)
    except (ValueError, binascii.Error):
        raise _GrantError(_BAD_SIGNATURE) from None
    if not isinstance(header, dict) or header.get("alg") != "RS256" or not isinstance(claims, dict):
        raise _GrantError(_BAD_SIGNATURE)
    if public_pem is not None:
        try:
            signed = f"{header_b64}.{claims_b64}".encode()
            _rsa_key(public_pem).verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise _GrantError(_BAD_SIGNATURE) from None
    return claims


def _check_claims(claims: dict[str, Any], request: web.Request) -> None:
    audience = claims.get("aud")
    # The audience is the token URL the client was given; a proxy may have changed the host on the way,
    # so the path is what can be checked.
    if not isinstance(audience, str) or urlsplit(audience).path.rstrip("/") != request.path.rstrip("/"):
        raise _GrantError(f"Invalid JWT: Failed audience check. The expected audience is {request.url}.")
    now = time.time()
    expires, issued = claims.get("exp"), claims.get("iat", now)
    if not isinstance(expires, int | float) or not isinstance(issued, int | float):
        raise _GrantError(_BAD_TIMES)
    if expires <= now or issued > now + _JWT_SLACK_S or expires - issued > _TOKEN_TTL_S + _JWT_SLACK_S:
        raise _GrantError(_BAD_TIMES)


def _issue_token(request: web.Request) -> str:
    tokens = request.app[TOKENS_KEY]
    now = time.time()
    for stale in [token for token, expiry in tokens.items() if expiry <= now]:
        del tokens[stale]
    token = "ya29.mock-" + mp._rand_id("", 40)
    tokens[token] = now + _TOKEN_TTL_S
    return token


async def _oauth_token(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    fields = {name: str(value) for name, value in form.items()}
    mp._record(request, request.app[mp._RECORDS_KEY], fields, GOOGLE_OAUTH)
    headers = {"x-mock-provider": request.app[mp._CONFIG_KEY].name, "cache-control": "no-cache, no-store"}
    grant_type = fields.get("grant_type")
    if grant_type != _JWT_BEARER:
        body = {"error": "unsupported_grant_type", "error_description": f"Invalid grant_type: {grant_type or ''}"}
        return mp._json_response(400, body, headers)
    try:
        claims = _jwt_claims(fields.get("assertion", ""), request.app[mp._CONFIG_KEY].google_public_key_pem)
        _check_claims(claims, request)
    except _GrantError as refused:
        return mp._json_response(400, {"error": "invalid_grant", "error_description": str(refused)}, headers)
    token = {"access_token": _issue_token(request), "expires_in": _TOKEN_TTL_S, "token_type": "Bearer"}
    return mp._json_response(200, token, headers)
