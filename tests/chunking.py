"""Feeding a byte stream in different chunkings: whole, byte by byte, halves, seeded random cuts."""

from __future__ import annotations

import random

CHUNKINGS = ["whole", "bytes", "halves", "seed-1", "seed-2", "seed-3"]


def split(data: bytes, how: str) -> list[bytes]:
    if how == "whole":
        return [data]
    if how == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    if how == "halves":
        return [data[: len(data) // 2], data[len(data) // 2 :]]
    rng = random.Random(int(how.removeprefix("seed-")))
    cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(1, 60))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
