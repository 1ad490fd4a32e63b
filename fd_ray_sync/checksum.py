"""Checksums of tensors and fingerprints of a rank's weights. Pure functions over numpy."""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np


def crc32(array: np.ndarray) -> int:
    """CRC-32 of an array's bytes in C order (copies only when the array is not contiguous)."""
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def fingerprint(named: Iterable[tuple[str, str, np.ndarray]]) -> str:
    """One hex digest for (name, dtype, array) triples, independent of their order.

    Each tensor contributes its name, dtype, shape and bytes; the per-tensor digests are
    combined in name order, so two ranks holding equal tensors get equal fingerprints.
    """
    parts = sorted(
        (name, zlib.crc32(f"{name}|{dtype}|{tuple(arr.shape)}".encode(), crc32(arr)))
        for name, dtype, arr in named
    )
    acc = 0
    for name, value in parts:
        acc = zlib.crc32(f"{name}:{value:08x};".encode(), acc)
    return f"{acc:08x}"
