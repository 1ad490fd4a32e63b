"""Bucketing: grouping tensors into transfer units. Pure functions over numpy.

A bucket is a list of contiguous host arrays plus a `BucketMeta` naming each one. Ray stores a
list of numpy arrays as out-of-band buffers, so `ray.put(bucket)` is the trainer's single copy
and `ray.get` on a rank's node is a zero-copy, read-only view of the store:

    BucketMeta(index=3, tensors=[TensorMeta(name="layers.0.mlp.up.weight", shape=(64, 128),
               dtype="float32", nbytes=32768, checksum=...), ...])
    arrays    = [<uint8/float32 array of 32768 bytes>, ...]    # same order as `tensors`

Shapes in a bucket are the full (unsharded) shapes; each rank cuts its own slice on arrival.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from fd_ray_sync.checksum import digest, digests
from fd_ray_sync.errors import WeightMismatchError
from fd_ray_sync.messages import TensorMeta
from fd_ray_sync.sharding import REPLICATED, ShardPlan, ShardSpec, local_shape_of, take_shard
from fd_ray_sync.tensors import contiguous, on_cuda, to_host


class BucketMeta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    tensors: tuple[TensorMeta, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_parts(sizes: Mapping[str, int], part_bytes: int) -> list[list[str]]:
    """Group names, in order, into parts of at most `part_bytes`; a bigger tensor stands alone."""
    parts: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if parts[-1] and used + size > part_bytes:
            parts.append([])
            used = 0
        parts[-1].append(name)
        used += size
    return parts if parts[0] else []


def iter_buckets(
    weights: Mapping[str, Any] | Iterable[tuple[str, Any]],
    bucket_bytes: int,
    checksum: bool = True,
    slice_plans: Sequence[ShardPlan] | None = None,
) -> Iterator[tuple[BucketMeta, list[np.ndarray]]]:
    """Stream `(name, tensor)` pairs (paddle, torch or numpy) into buckets of ~`bucket_bytes`.

    Tensors are taken as zero-copy host views where the framework allows; only one bucket's
    worth of references is held at a time, so a trainer can stream layer by layer. With
    `slice_plans` (one shard plan per TP rank), checksums are of each rank's slice
    (`slice_checksums`) rather than of the whole tensor.
    """
    pairs = weights.items() if isinstance(weights, Mapping) else weights
    metas: list[TensorMeta] = []
    arrays: list[np.ndarray] = []
    used = 0
    index = 0
    seen: set[str] = set()
    for name, tensor in pairs:
        if name in seen:
            raise WeightMismatchError(f"parameter {name!r} appears twice in the update")
        seen.add(name)
        array, dtype = to_host(tensor)
        array = contiguous(array)
        if arrays and used + array.nbytes > bucket_bytes:
            yield BucketMeta(index=index, tensors=tuple(metas)), arrays
            metas, arrays, used, index = [], [], 0, index + 1
        whole = slices = None
        if checksum and slice_plans:
            specs = [plan.get(name, REPLICATED) for plan in slice_plans]
            try:
                slices = slice_checksums(array, specs)
            except WeightMismatchError as e:
                raise WeightMismatchError(f"parameter {name!r}: {e}") from None
        elif checksum:
            whole = digest(array)
        metas.append(
            TensorMeta(
                name=name,
                shape=array.shape,
                dtype=dtype,
                nbytes=array.nbytes,
                checksum=whole,
                slice_checksums=slices,
            )
        )
        arrays.append(array)
        used += array.nbytes
    if arrays:
        yield BucketMeta(index=index, tensors=tuple(metas)), arrays


def slice_checksums(array: np.ndarray, specs: Sequence[ShardSpec]) -> tuple[int, ...]:
    """Checksum of each rank's slice; one entry when every rank holds the whole tensor.

    The slices are hashed together, block by block (a column slice's block is staged in a
    small buffer, never copied whole), so the full tensor is read from memory once. A CUDA
    tensor is hashed on its device (`fd_ray_sync.cuda_hash`), to the same numbers."""
    if on_cuda(array):
        return device_slice_checksums({"": array}, {"": specs})[""]
    if all(spec.is_replicated for spec in specs):
        return (digest(array),)
    return tuple(digests([take_shard(array, spec) for spec in specs]))


def device_slice_checksums(
    tensors: Mapping[str, Any], specs: Mapping[str, Sequence[ShardSpec]]
) -> dict[str, tuple[int, ...]]:
    """`slice_checksums` of many CUDA tensors (by name, with each one's rank specs), hashed on
    their device in one launch (`fd_ray_sync.cuda_hash`)."""
    from fd_ray_sync import cuda_hash

    parts, counts = [], {}
    for name, tensor in tensors.items():
        mine, before = specs[name], len(parts)
        try:
            if all(s.is_replicated for s in mine):
                parts.append(tensor)
            else:
                parts += [take_shard(tensor, s) for s in mine]
        except WeightMismatchError as e:
            raise WeightMismatchError(f"parameter {name!r}: {e}" if name else str(e)) from None
        counts[name] = len(parts) - before
    values, out, at = cuda_hash.digests(parts), {}, 0
    for name, count in counts.items():
        out[name] = tuple(values[at : at + count])
        at += count
    return out


def local_checksum(meta: TensorMeta, spec: ShardSpec) -> int | None:
    """The checksum of the slice `spec` of `meta`'s tensor, where the metadata has one."""
    if meta.slice_checksums is not None:
        sums = meta.slice_checksums
        return sums[0 if len(sums) == 1 else spec.index]
    return meta.checksum if spec.is_replicated else None


def local_meta(meta: TensorMeta, spec: ShardSpec) -> TensorMeta:
    """`meta` (a full tensor's) as the rank holding slice `spec` sees it: local shape and
    bytes, and the checksum of its slice where the metadata has one."""
    return meta.model_copy(
        update={
            "shape": local_shape_of(meta.name, spec, meta.shape),
            "nbytes": meta.nbytes // max(1, spec.parts),
            "checksum": local_checksum(meta, spec),
            "slice_checksums": None,
        }
    )


def bucket_views(
    meta: BucketMeta, arrays: list[np.ndarray]
) -> Iterator[tuple[TensorMeta, np.ndarray]]:
    """Each tensor of a received bucket as a (meta, full-shape array) pair, checked for size."""
    if len(arrays) != len(meta.tensors):
        raise WeightMismatchError(
            f"bucket {meta.index} holds {len(arrays)} arrays, its metadata lists "
            f"{len(meta.tensors)}"
        )
    for t, array in zip(meta.tensors, arrays):
        if array.nbytes != t.nbytes:
            raise WeightMismatchError(
                f"bucket {meta.index}: {t.name} has {array.nbytes} bytes, metadata says {t.nbytes}"
            )
        yield t, array
