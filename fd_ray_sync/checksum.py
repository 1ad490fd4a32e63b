"""Checksums of tensors and fingerprints of a rank's weights. Pure functions over numpy."""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np


def crc32(array: np.ndarray) -> int:
    """CRC-32 of an array's bytes in C order (copies only when the array is not contiguous)."""
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def tensor_digest(name: str, dtype: str, shape: tuple[int, ...], crc: int) -> int:
    """Digest of one tensor: its name, dtype, shape and the CRC-32 of its bytes."""
    return zlib.crc32(f"{name}|{dtype}|{tuple(shape)}".encode(), crc)


def combine_digests(digests: Iterable[tuple[str, int]]) -> str:
    """One hex fingerprint from (name, tensor_digest) pairs, independent of their order."""
    acc = 0
    for name, value in sorted(digests):
        acc = zlib.crc32(f"{name}:{value:08x};".encode(), acc)
    return f"{acc:08x}"


def fingerprint(named: Iterable[tuple[str, str, np.ndarray]]) -> str:
    """Fingerprint of (name, dtype, array) triples: equal tensors give equal fingerprints,
    whatever their order or the rank holding them."""
    return combine_digests(
        (name, tensor_digest(name, dtype, arr.shape, crc32(arr))) for name, dtype, arr in named
    )
