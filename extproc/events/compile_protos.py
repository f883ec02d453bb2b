"""Regenerate the checked-in Python code for our protobuf schemas (``protos/``).

    python -m extproc.events.compile_protos            # rewrite extproc/events/gen/
    python -m extproc.events.compile_protos --out DIR  # write elsewhere (the freshness test does)

The code is checked in so that running the processor needs only the protobuf runtime, not a
compiler; a test regenerates it into a temporary directory and fails when the two differ. It runs
protoc from grpcio-tools (a dev dependency) in a subprocess, so nothing about the compiler leaks
into the caller's interpreter.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
GEN_DIR = Path(__file__).resolve().parent / "gen"
# Every schema we compile, relative to PROTO_ROOT. The generated module lives at the same path
# under GEN_DIR (protoc mirrors the proto path), i.e. extproc.events.gen.ai.extproc.v1.usage_event_pb2:
# nested under our package so it can never shadow or be shadowed by a top-level package (the
# xds-protos `envoy`, or another `ai` distribution).
PROTOS = ("ai/extproc/v1/usage_event.proto",)
# Files protoc writes per schema; the freshness test compares exactly these.
SUFFIXES = ("_pb2.py", "_pb2.pyi")


def generated_files(out: Path = GEN_DIR) -> list[Path]:
    return [out / (proto.removesuffix(".proto") + suffix) for proto in PROTOS for suffix in SUFFIXES]


def compile_protos(out: Path = GEN_DIR) -> list[Path]:
    """Run protoc over PROTOS into ``out``; returns the files written. Raises on compiler errors."""
    out.mkdir(parents=True, exist_ok=True)
    # google/protobuf/*.proto (Timestamp) ship inside grpcio-tools, not with protoc's caller.
    well_known = resources.files("grpc_tools") / "_proto"
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
               f"--python_out={out}", f"--pyi_out={out}", *PROTOS]
    result = subprocess.run(command, cwd=PROTO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({result.returncode}): {result.stderr.strip()}")
    return generated_files(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extproc.events.compile_protos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=GEN_DIR, help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        written = compile_protos(args.out)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
