"""Shared fixtures. Real parts only: Envoy binary, our processor as a subprocess, the mock provider.

When a real dependency is missing, tests skip with the reason; with EXTPROC_REQUIRE_SERVICES=1
(set by .ci/run) a missing dependency fails instead, so CI cannot go green by skipping.
"""

from __future__ import annotations

import os

import pytest

REQUIRE = os.environ.get("EXTPROC_REQUIRE_SERVICES") == "1"


def missing(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"{reason} (EXTPROC_REQUIRE_SERVICES=1 turns this skip into a failure)")
    pytest.skip(reason)
