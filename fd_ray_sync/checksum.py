"""Checksums of tensors and fingerprints of a rank's weights. Pure functions over numpy."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable

import numpy as np

from fd_ray_sync.tensors import contiguous

_CHUNK = 8 << 20
_POOL = None


def _pool():
    # A registry-like, process-wide helper: zlib.crc32 releases the GIL on large buffers, so
    # chunks of one big tensor are checksummed on every core at once.
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    return _POOL


def crc32(array: np.ndarray) -> int:
    """Checksum of an array's bytes in C order (copies only when it is not contiguous).

    Up to 8 MiB it is the CRC-32 of the bytes; above, the CRC-32 of the CRC-32s of its 8 MiB
    chunks, computed in parallel threads. Both ends of a transfer use this function.
    """
    data = contiguous(array).reshape(-1).view(np.uint8)
    if data.nbytes <= _CHUNK:
        return zlib.crc32(data)
    chunks = [data[i : i + _CHUNK] for i in range(0, data.nbytes, _CHUNK)]
    sums = np.fromiter(_pool().map(zlib.crc32, chunks), dtype=np.uint32, count=len(chunks))
    return zlib.crc32(sums)


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
