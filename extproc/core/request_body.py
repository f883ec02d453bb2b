"""Reading a request body safely: depth-bounded, exact for big integers, and aware of duplicate keys."""

from __future__ import annotations

import json
import re

import orjson

from extproc.base.apis import ApiError, ErrorKind

# Deeper nesting than any real request needs; orjson reads up to 1024 levels but writes only 254, and
# a deep body costs every stage that walks it.
MAX_JSON_DEPTH = 64
# Integers orjson cannot hold exactly (it reads them as floats): such bodies are read by the stdlib.
_BIG_INT = re.compile(rb"\d{20}|-\d{19}")
# Fields the decision reads: if one appears twice, the provider might read the other copy than we did
# (first key wins in some parsers, last in ours), so such a body is always re-serialised with one copy.
_DECISIVE_KEYS = (b'"model"', b'"stream"', b'"stream_options"', b'"max_tokens"', b'"max_completion_tokens"')


def parse_body(body: bytes) -> tuple[dict[str, object], bool] | ApiError:
    """The request object, and whether it must be re-serialised before it is sent on."""
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _too_deep(body):
        return ApiError(ErrorKind.INVALID_REQUEST, f"request body nests deeper than {MAX_JSON_DEPTH} levels",
                        "invalid_json")
    data = _parse_json(body)
    if isinstance(data, ApiError):
        return data
    return data, any(body.count(key) > 1 for key in _DECISIVE_KEYS)


def _too_deep(body: bytes) -> bool:
    """Bracket depth outside strings: a byte scan, run only for bodies with many brackets."""
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


def dump_json(data: object) -> bytes:
    try:
        return orjson.dumps(data)
    except TypeError:  # an integer beyond 64 bits, read exactly by the stdlib
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(body: bytes) -> dict[str, object] | ApiError:
    try:
        if _BIG_INT.search(body) is not None:
            data = json.loads(body, parse_constant=_no_constant)
        else:
            data = orjson.loads(body)
    except (orjson.JSONDecodeError, ValueError) as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            return ApiError(ErrorKind.INVALID_REQUEST, f"request body is not valid UTF-8 (byte {bad.start})",
                            "invalid_utf8")
        return ApiError(ErrorKind.INVALID_REQUEST, f"request body is not valid JSON: {exc}", "invalid_json")
    if not isinstance(data, dict):
        return ApiError(ErrorKind.INVALID_REQUEST, "request body must be a JSON object", "invalid_json")
    return data
