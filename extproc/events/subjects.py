"""Where usage events live on NATS: subject per caller, one stream for all of them.

``<prefix>.<namespace>.<service>`` lets a consumer filter by caller with plain subject wildcards
(``ai.usage.payments.>``, ``ai.usage.*.checkout``) instead of decoding every event.
"""

from __future__ import annotations

import re

DEFAULT_PREFIX = "ai.usage"
DEFAULT_STREAM = "AI_USAGE"
EMPTY_TOKEN = "_"  # a subject token cannot be empty: the unknown namespace becomes "_"

# Characters a NATS subject token must not contain: the separator, the wildcards, whitespace
# (which the protocol splits on) and control characters.
_BAD_TOKEN_CHARS = re.compile(r"[.*>\s\x00-\x1f\x7f]")
_VALID_PREFIX = re.compile(r"^[^.*>\s\x00-\x1f\x7f]+(\.[^.*>\s\x00-\x1f\x7f]+)*$")


def token(value: str) -> str:
    """One subject token for an arbitrary name: forbidden characters become ``_``."""
    return _BAD_TOKEN_CHARS.sub("_", value) or EMPTY_TOKEN


def check_prefix(prefix: str) -> str:
    """The prefix as given, or ValueError: it is configuration, so a bad one fails at startup."""
    if not _VALID_PREFIX.match(prefix):
        raise ValueError(f"invalid NATS subject prefix {prefix!r}: dot-separated tokens without '*', '>' or spaces")
    return prefix


def subject_for(prefix: str, namespace: str, service: str) -> str:
    return f"{prefix}.{token(namespace)}.{token(service)}"


def filter_subject(prefix: str, namespace: str | None = None, service: str | None = None) -> str:
    """The subject filter for a tail: ``None`` (not given) matches every namespace / service."""
    ns = "*" if namespace is None else token(namespace)
    svc = "*" if service is None else token(service)
    return f"{prefix}.{ns}.{svc}"


def stream_subjects(prefix: str) -> list[str]:
    return [f"{prefix}.>"]
