"""Checksums of tensors and fingerprints of a rank's weights. Pure functions over numpy.

The checksum of an array is a blocked xxh3-64 digest of its bytes in C order. xxh3 runs at
memory speed (~14 GB/s a core here, against ~2 GB/s for zlib's CRC-32) and releases the GIL,
so the cost of a check is close to the cost of reading the bytes once, and a rank can take
it while it copies (`copy_and_digest`): each block is hashed right after it landed, still in
cache, instead of in a second pass over the parameter.

Blocks are ranges of the leading axis of about `BLOCK` bytes:

    a: float32 [4096, 2048]  (8 KiB a row)  ->  blocks a[0:128], a[128:256], ...   (1 MiB each)
    digest(a) = xxh3_64(le_u64(xxh3_64(a[0:128])) + le_u64(xxh3_64(a[128:256])) + ...)

An array of at most `BLOCK` bytes (a 0-d array, a small vector) is one block: its digest is
the xxh3-64 of its bytes. Where one leading index alone holds more than `BLOCK` bytes (a 3-d
expert stack), each index is a part digested the same way, recursively. The blocks depend
only on the shape and the bytes, never on the strides, so a TP slice cut from the trainer's
full tensor and the same slice in a rank's parameter give the same digest; a non-contiguous
block is copied into a small scratch buffer before hashing, never the whole tensor.

Snapshot files written before xxh3 carry CRC-32s (`legacy_crc32`), still checked on load.
"""

from __future__ import annotations

import functools
import math
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash

from fd_ray_sync.tensors import contiguous

BLOCK = 256 << 10
# Below this, one thread does the work: handing blocks to the pool costs more than it saves.
_PARALLEL_BYTES = 32 << 20
_WORKERS = max(1, min(8, os.cpu_count() or 1))
_POOL = None

_xxh3 = xxhash.xxh3_64_intdigest


def _pool():
    # A registry-like, process-wide helper: xxh3 and numpy's copies release the GIL, so the
    # blocks of one big tensor are hashed (and copied) on every core at once.
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_WORKERS)
    return _POOL


def _parts(shape: tuple[int, ...], nbytes: int) -> tuple[int, bool] | None:
    """How an array of `shape` and `nbytes` splits: None when it is one block, else
    (leading indices per part, whether each part is a block (True) or a sub-array digested
    recursively (False))."""
    if not shape or nbytes <= BLOCK:
        return None
    per_index = nbytes // shape[0]
    if per_index <= BLOCK:
        return BLOCK // per_index, True
    return 1, False


def _hash_block(block: np.ndarray, scratch: list) -> int:
    """xxh3-64 of one block's C-order bytes (copied into `scratch[0]`, grown as needed and
    reused by the caller's next blocks, when the block is not contiguous)."""
    if block.flags.c_contiguous:
        return _xxh3(block)
    if scratch[0] is None or scratch[0].nbytes < block.nbytes:
        scratch[0] = np.empty(max(block.nbytes, BLOCK), np.uint8)
    staged = scratch[0][: block.nbytes].view(block.dtype).reshape(block.shape)
    np.copyto(staged, block)
    return _xxh3(staged)


def _combine(values: Iterable[int]) -> int:
    """xxh3-64 of the little-endian uint64 block digests, in order."""
    return _xxh3(np.fromiter(values, dtype="<u8").tobytes())


Leaf = Callable[[object, list], tuple[int, ...]]


def _blocked(shape: tuple[int, ...], nbytes: int, leaf: Leaf, parallel: bool = True) -> list[int]:
    """The blocked digests of arrays of one `shape` and `nbytes`: `leaf(index, scratch)`
    hashes the block at `index` (one that fits in `BLOCK`) of every array and returns their
    digests. The parts of a big array are shared among the pool's threads in contiguous
    runs, each with a scratch buffer of its own."""
    split = _parts(shape, nbytes)
    if split is None:
        return list(leaf(Ellipsis, [None]))
    step, blocks = split
    n = shape[0]
    starts = range(0, n, step)

    def part(i: int, scratch: list) -> tuple[int, ...]:
        if blocks:
            return leaf(slice(i, i + step), scratch)
        # One leading index is bigger than a block: digest it as an array of its own.
        # Never from the pool again: its threads would wait on each other.
        sub = functools.partial(_nested, leaf, i)
        return tuple(_blocked(shape[1:], nbytes // n, sub, parallel=False))

    def run(lo: int, hi: int) -> list[tuple[int, ...]]:
        scratch = [None]
        return [part(i, scratch) for i in starts[lo:hi]]

    count = len(starts)
    if not parallel or nbytes < _PARALLEL_BYTES or _WORKERS == 1:
        parts = run(0, count)
    else:
        runs = min(count, 2 * _WORKERS)
        bounds = [count * k // runs for k in range(runs + 1)]
        futures = [_pool().submit(run, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
        parts = [p for f in futures for p in f.result()]
    return [_combine(p[j] for p in parts) for j in range(len(parts[0]))]


def _nested(leaf: Leaf, i: int, index: object, scratch: list) -> tuple[int, ...]:
    return leaf((i, index), scratch)


def _at(array: np.ndarray, index) -> np.ndarray:
    """`array[index]` for the indices `_blocked` passes (Ellipsis, a slice, or a nested
    (i, index) pair), always an array (a 0-d one stays one)."""
    if isinstance(index, tuple):
        i, rest = index
        return _at(array[i], rest)
    return array[index]


@functools.lru_cache(maxsize=256)
def block_ranges(shape: tuple[int, ...], itemsize: int) -> np.ndarray:
    """(byte offset, byte count) of each block `digest` hashes in a C-contiguous array of
    `shape` and `itemsize` (rows of a read-only uint64 array), in the order
    `digest_of_blocks` takes their hashes: what a device hashes in place
    (`fd_ray_sync.cuda_hash`). Models repeat a few shapes, so each is worked out once."""
    nbytes = math.prod(shape) * itemsize
    indices: list[object] = []

    def record(index, scratch) -> tuple[int]:
        indices.append(index)
        return (0,)

    _blocked(shape, nbytes, record, parallel=False)
    ranges = np.array([_byte_range(shape, itemsize, i) for i in indices], np.uint64)
    ranges.flags.writeable = False
    return ranges.reshape(-1, 2)


def _byte_range(shape: tuple[int, ...], itemsize: int, index) -> tuple[int, int]:
    """Where the block at `index` (as `_blocked` passes it) lies in a C-contiguous array."""
    row = math.prod(shape[1:]) * itemsize  # bytes per leading index
    if index is Ellipsis:
        return 0, math.prod(shape) * itemsize
    if isinstance(index, tuple):
        i, rest = index
        offset, size = _byte_range(shape[1:], itemsize, rest)
        return i * row + offset, size
    start, stop, _ = index.indices(shape[0])
    return start * row, (stop - start) * row


def digest_of_blocks(shape: tuple[int, ...], itemsize: int, hashes: Sequence[int]) -> int:
    """`digest` of an array of `shape` and `itemsize` whose blocks (`block_ranges`, in order)
    have the xxh3-64 values `hashes`."""
    nbytes = math.prod(shape) * itemsize
    split = _parts(shape, nbytes)
    if split is None:  # one block
        return int(hashes[0])
    if split[1]:  # one level of blocks (every tensor but expert stacks): no tree to walk
        return _xxh3(np.asarray(hashes, dtype="<u8").tobytes())
    values = iter(int(h) for h in hashes)
    return _blocked(shape, nbytes, lambda i, s: (next(values),), False)[0]


def digest(array: np.ndarray) -> int:
    """The checksum of an array's bytes in C order (see the module docstring). Both ends of a
    transfer use it; strided arrays are hashed block by block without a full copy."""
    return digests([array])[0]


def digests(arrays: Sequence[np.ndarray], parallel: bool = True) -> list[int]:
    """`digest` of each array. Arrays of one shape and item size (the TP slices of one
    tensor) are walked together, block i of each in turn: the slices of a column-split
    tensor share its rows, which are then read from memory once, not once a slice."""
    if len({(a.shape, a.itemsize) for a in arrays}) > 1:
        return [digests([a], parallel)[0] for a in arrays]
    if not arrays:
        return []

    def leaf(index, scratch) -> tuple[int, ...]:
        return tuple(_hash_block(_at(a, index), scratch) for a in arrays)

    return _blocked(arrays[0].shape, arrays[0].nbytes, leaf, parallel)


def copy_and_digest(dst: np.ndarray, src: np.ndarray) -> int:
    """Copy `src` into `dst` block by block, hashing each block of `dst` right after it was
    written (still in cache). Returns `digest(src)`, taken of the bytes where they landed.

    `dst` must be a writable C-contiguous array of `src`'s shape and dtype (a parameter's
    storage, e.g. `fd_ray_sync.params.host_view`); `src` may be strided.
    """
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(
            f"cannot copy a {src.dtype}{list(src.shape)} array into {dst.dtype}{list(dst.shape)}"
        )
    if not dst.flags.c_contiguous or not dst.flags.writeable:
        raise ValueError("copy_and_digest needs a writable C-contiguous destination")

    def leaf(index, scratch) -> tuple[int]:
        out = _at(dst, index)
        np.copyto(out, _at(src, index), casting="no")
        return (_xxh3(out),)

    return _blocked(dst.shape, dst.nbytes, leaf)[0]


def copy_and_digests(dsts: Sequence[np.ndarray], srcs: Sequence[np.ndarray]) -> list[int]:
    """Copy each `srcs[k]` into `dsts[k]` (writable arrays of one shape and dtype, e.g. the
    TP slices of a tensor being packed), block by block on every core, hashing each block
    right where it landed. Returns `digest(srcs[k])` for each k: one pass over the bytes."""
    if len(dsts) != len(srcs) or not dsts:
        raise ValueError(f"{len(dsts)} destinations for {len(srcs)} sources")
    for d, src in zip(dsts, srcs):
        if d.shape != src.shape or d.dtype != src.dtype or not d.flags.writeable:
            raise ValueError(
                f"cannot copy a {src.dtype}{list(src.shape)} array into {d.dtype}{list(d.shape)}"
            )
    if len({(d.shape, d.itemsize) for d in dsts}) > 1:
        return [copy_and_digests([d], [src])[0] for d, src in zip(dsts, srcs)]

    def leaf(index, scratch) -> tuple[int, ...]:
        out = []
        for d, src in zip(dsts, srcs):
            block = _at(d, index)
            np.copyto(block, _at(src, index), casting="no")
            out.append(_hash_block(block, scratch))
        return tuple(out)

    return _blocked(dsts[0].shape, dsts[0].nbytes, leaf)


def legacy_crc32(array: np.ndarray) -> int:
    """The checksum of snapshot files written before xxh3 (metadata key "fd_ray_sync.crc32").

    Up to 8 MiB it is the CRC-32 of the bytes; above, the CRC-32 of the CRC-32s of its 8 MiB
    chunks. Only read back, to keep older snapshot folders loading.
    """
    chunk = 8 << 20
    data = contiguous(array).reshape(-1).view(np.uint8)
    if data.nbytes <= chunk:
        return zlib.crc32(data)
    chunks = [data[i : i + chunk] for i in range(0, data.nbytes, chunk)]
    sums = np.fromiter(_pool().map(zlib.crc32, chunks), dtype=np.uint32, count=len(chunks))
    return zlib.crc32(sums)


def tensor_digest(name: str, dtype: str, shape: tuple[int, ...], checksum: int) -> int:
    """Digest of one tensor: its name, dtype, shape and the checksum (`digest`) of its bytes."""
    return _xxh3(f"{name}|{dtype}|{tuple(shape)}|{checksum:016x}".encode())


def combine_digests(digests: Iterable[tuple[str, int]]) -> str:
    """One hex fingerprint from (name, tensor_digest) pairs, independent of their order."""
    state = xxhash.xxh3_64()
    for name, value in sorted(digests):
        state.update(f"{name}:{value:016x};".encode())
    return state.hexdigest()


def fingerprint(named: Iterable[tuple[str, str, np.ndarray]]) -> str:
    """Fingerprint of (name, dtype, array) triples: equal tensors give equal fingerprints,
    whatever their order or the rank holding them."""
    return combine_digests(
        (name, tensor_digest(name, dtype, arr.shape, digest(arr))) for name, dtype, arr in named
    )
