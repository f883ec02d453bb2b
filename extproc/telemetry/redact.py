"""Secrets out of telemetry: every free-text field (prompt, completion, error) and every header set
passes through a ``Redactor`` before a log line or span leaves the process.

Built-in patterns cover the credentials this mesh handles (provider keys, bearer tokens, AWS keys);
operators add their own (customer ids, internal token formats) as regular expressions. A pattern
with a named group ``secret`` masks only that group, so ``x-api-key: abc`` keeps its key name and
reads ``x-api-key: [REDACTED]``, which keeps redacted logs useful for debugging.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

REDACTED = "[REDACTED]"

# Order matters: the specific shapes go first so that e.g. "Bearer sk-..." is masked as one token.
_BUILTIN_PATTERNS: tuple[str, ...] = (
    # Authorization: Bearer <token> / Basic <token>, anywhere in text (logged headers, error messages).
    # At least 8 characters, so that prose ("the bearer of") is left alone.
    r"\b(?:(?i:bearer)|Basic)\s+(?P<secret>[A-Za-z0-9._~+/\-]{8,}=*)",
    # key: value / key=value / "key": "value" for the usual credential field names.
    r"""(?i)\b(?:x-api-key|api[_-]?key|x-goog-api-key|access[_-]?token|refresh[_-]?token|client[_-]?secret"""
    r"""|secret[_-]?key|password|passwd)\b["']?\s*[:=]\s*["']?(?P<secret>[^\s"',;&}\]]+)""",
    # Anthropic (sk-ant-...) and OpenAI (sk-..., sk-proj-..., sk-svcacct-...) keys; one pattern as
    # the Anthropic shape is an OpenAI-looking prefix.
    r"\bsk-(?:ant-)?[A-Za-z0-9_\-]{16,}",
    # AWS access key ids (long-term AKIA, temporary ASIA, ...).
    r"\b(?:AKIA|ASIA|ABIA|ACCA|AROA|AIDA)[0-9A-Z]{16}\b",
)
_EMAIL = r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}\b"

# Header names whose value is a credential whatever it looks like: masked outright.
_SENSITIVE_HEADERS = frozenset({
    "authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie", "set-cookie",
})
# Names like x-auth-token, x-amz-security-token, x-client-secret; word-bounded so that
# x-ratelimit-remaining-tokens is not caught and stays readable.
_SENSITIVE_HEADER_WORDS = re.compile(
    r"(?:^|[-_])(?:auth|token|secret|password|passwd|api[-_]?key|apikey|credentials?|session)(?:[-_]|$)",
    re.IGNORECASE,
)


class RedactionPatternError(ValueError):
    """A configured redaction pattern is unusable; the message names the pattern."""


@dataclass(frozen=True, slots=True)
class _Rule:
    regex: re.Pattern[str]
    masks_group: bool  # True: only the "secret" group is replaced


def _compile(pattern: str, *, what: str, allow_empty: bool = False) -> _Rule:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise RedactionPatternError(f"invalid {what} {pattern!r}: {exc}") from None
    # A pattern matching "" would splice [REDACTED] between every character of every log line.
    if not allow_empty and regex.fullmatch(""):
        raise RedactionPatternError(f"invalid {what} {pattern!r}: it matches the empty string")
    return _Rule(regex, "secret" in regex.groupindex)


class Redactor:
    """Masks secrets in text and header sets. Thread-safe and immutable once built."""

    def __init__(self, patterns: Iterable[str] = (), *, header_names: Iterable[str] = (), emails: bool = False,
                 builtins: bool = True) -> None:
        rules = [_compile(p, what="built-in pattern") for p in _BUILTIN_PATTERNS] if builtins else []
        if emails:
            rules.append(_compile(_EMAIL, what="built-in pattern"))
        rules.extend(_compile(p, what="redaction pattern") for p in patterns)
        self._rules: tuple[_Rule, ...] = tuple(rules)
        # Header names are matched whole and case-insensitively; plain names work as-is.
        self._header_rules = tuple(_compile(f"(?i:{p})", what="header name pattern", allow_empty=True).regex
                                   for p in header_names)

    def redact(self, text: str) -> str:
        for rule in self._rules:
            text = rule.regex.sub(_mask_secret_group if rule.masks_group else REDACTED, text)
        return text

    def is_sensitive_header(self, name: str) -> bool:
        lowered = name.lower()
        return (lowered in _SENSITIVE_HEADERS or _SENSITIVE_HEADER_WORDS.search(lowered) is not None
                or any(r.fullmatch(lowered) for r in self._header_rules))

    def redact_headers(self, headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
        """Credential headers masked whole (their presence is still visible); others text-redacted."""
        items = headers.items() if isinstance(headers, Mapping) else headers
        return {name: REDACTED if self.is_sensitive_header(name) else self.redact(value) for name, value in items}


def _mask_secret_group(match: re.Match[str]) -> str:
    start, end = match.span("secret")
    if start < 0:  # the group is optional in this pattern and did not take part: mask everything
        return REDACTED
    whole = match.group(0)
    offset = match.start()
    return whole[: start - offset] + REDACTED + whole[end - offset:]
