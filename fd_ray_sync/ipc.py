"""The trainer's half of the co-located (ipc) transport on CPU: memory shared with the ranks.

Two modes, one protocol (ranks attach each segment once and copy their TP slices out of it):

- Bucket ring (`BucketRing`): a few segments of `slot_bytes` allocated once. Bucket i is
  packed into slot i % slots; the trainer packs bucket i+1 while ranks copy out of bucket i,
  and reuses a slot only once every rank said it has written the bucket it held
  (`fd_ray_sync.feed.BucketFeed`: "ready" is the feed receiving the bucket, after the pack;
  "released" is the ranks' written count). Checksums are taken while packing, of the bytes
  just written (still in cache for whole tensors): the trainer reads its weights once.

      slot k:  | t0 bytes | pad to 64 | t1 bytes | pad | ...     (TensorMeta.offset each)

- Registered storage (`Registration`): the trainer's own tensors live in shared memory
  (`share()` puts a state dict there once; train in place on what it returns). Ranks copy
  straight from them: no pack copy. Each update checks every tensor still sits where it was
  registered (a reallocated tensor would leave ranks reading memory the trainer no longer
  writes) and refuses, naming it, when not.

On GPUs the same protocol runs over CUDA IPC handles (see `fd_ray_sync.gpucheck`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fd_ray_sync import shm
from fd_ray_sync.buckets import BucketMeta, plan_parts, slice_checksums
from fd_ray_sync.checksum import copy_and_digest, copy_and_digests
from fd_ray_sync.errors import StateError, WeightMismatchError
from fd_ray_sync.messages import TensorMeta
from fd_ray_sync.sharding import REPLICATED, ShardPlan, ShardSpec, take_shard
from fd_ray_sync.tensors import (
    BITS_DTYPES,
    from_bits,
    shape_and_dtype,
    storage_dtype,
    tagged,
    to_host,
)


def aligned(nbytes: int) -> int:
    return -(-nbytes // shm.ALIGN) * shm.ALIGN


def _checksums(dst: np.ndarray, src: np.ndarray | None, name: str, plans) -> tuple | None:
    """Copy `src` into `dst` (when given) and return the slice checksums of `name` for
    `plans` (one shard plan per TP rank). The copy runs on every core and hashes each block
    where it landed: the tensor is read once, whether the ranks take it whole or in slices
    that together cover it; other layouts are hashed after the copy."""
    if plans is None:
        if src is not None:
            copy_and_digest(dst, src)
        return None
    specs = [plan.get(name, REPLICATED) for plan in plans]
    try:
        if src is not None and all(s.is_replicated for s in specs):
            return (copy_and_digest(dst, src),)
        if src is not None and _cover(specs):
            return tuple(
                copy_and_digests(
                    [take_shard(dst, s) for s in specs], [take_shard(src, s) for s in specs]
                )
            )
        if src is not None:
            copy_and_digest(dst, src)
        return slice_checksums(dst, specs)
    except WeightMismatchError as e:
        raise WeightMismatchError(f"parameter {name!r}: {e}") from None


def _cover(specs: Sequence[ShardSpec]) -> bool:
    """Whether the ranks' slices are the tensor's parts, each once."""
    first = specs[0]
    return first.axis is not None and sorted((s.axis, s.parts, s.index) for s in specs) == [
        (first.axis, first.parts, i) for i in range(first.parts)
    ]


class BucketRing:
    """`slots` shared segments of `slot_bytes`, allocated once, reused by every update."""

    def __init__(self, slots: int, slot_bytes: int, shared: bool = True):
        if slots < 2:
            raise StateError(f"a bucket ring needs at least 2 slots, not {slots}")
        self.slot_bytes = slot_bytes
        # Shared: segments the ranks attach (ipc). Private: this process's own memory, which
        # the collective transport sends from.
        self.segments = [shm.create(f"ring{k}", slot_bytes) for k in range(slots)] if shared else []
        self.slots = (
            [s.array(0, slot_bytes) for s in self.segments]
            if shared
            else [np.empty(slot_bytes, np.uint8) for _ in range(slots)]
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.segments)

    def __len__(self) -> int:
        return len(self.slots)

    def plan(self, weights: Mapping[str, Any]) -> list[list[str]]:
        """The names of each bucket, in order (a tensor bigger than a slot is refused)."""
        sizes = {}
        for name, tensor in weights.items():
            shape, dtype = shape_and_dtype(tensor)
            sizes[name] = aligned(math.prod(shape) * storage_dtype(dtype).itemsize)
            if sizes[name] > self.slot_bytes:
                raise WeightMismatchError(
                    f"parameter {name!r} ({sizes[name]} bytes) does not fit a ring slot of "
                    f"{self.slot_bytes} bytes"
                )
        return plan_parts(sizes, self.slot_bytes)

    def pack(
        self,
        index: int,
        named: Sequence[tuple[str, Any]],
        plans: Sequence[ShardPlan] | None = None,
    ) -> BucketMeta:
        """Copy `named` tensors into slot `index % len(self)` (the caller made sure no rank
        still reads it) and describe them; with `plans`, each TP rank's slice checksums."""
        slot = self.slots[index % len(self.slots)]
        metas, offset = [], 0
        for name, tensor in named:
            array, dtype = to_host(tensor)
            offset = aligned(offset)
            dst = slot[offset : offset + array.nbytes].view(array.dtype).reshape(array.shape)
            sums = _checksums(dst, array, name, plans)
            metas.append(
                TensorMeta(
                    name=name,
                    shape=array.shape,
                    dtype=dtype,
                    offset=offset,
                    nbytes=array.nbytes,
                    slice_checksums=sums,
                )
            )
            offset += array.nbytes
        return BucketMeta(index=index, tensors=tuple(metas))

    def close(self) -> None:
        self.slots = []
        for segment in self.segments:
            segment.unlink()
        self.segments = []


def share(weights: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `weights` (numpy arrays or CPU torch tensors) in one shared segment owned by
    this process, as the same types: train in place on these (for a torch module,
    `module.load_state_dict(shared, assign=True)`), and register them with the fleet."""
    arrays = {name: to_host(t) for name, t in weights.items()}
    total = sum(aligned(a.nbytes) for a, _ in arrays.values())
    segment = shm.create("weights", max(total, 1))
    out, offset = {}, 0
    for name, (array, dtype) in arrays.items():
        dst = segment.array(offset, array.nbytes).view(array.dtype).reshape(array.shape)
        np.copyto(dst, array, casting="no")
        offset += aligned(array.nbytes)
        out[name] = _like(weights[name], dst, dtype)
    return out


def _like(original: Any, array: np.ndarray, dtype: str) -> Any:
    """`array` as the framework type of `original` (sharing its memory)."""
    if isinstance(original, np.ndarray):
        return tagged(array, dtype) if dtype in BITS_DTYPES else array
    if type(original).__module__.startswith("torch"):
        import torch

        return from_bits(torch.from_numpy(array), dtype)
    raise WeightMismatchError(
        f"cannot place a {type(original).__name__} in shared memory: registered storage "
        "takes numpy arrays or CPU torch tensors (other trainers use the bucket ring)"
    )


def _locate(address: int, nbytes: int) -> tuple[str, int] | None:
    """(segment, offset) of `nbytes` at `address` inside a segment this process owns."""
    for segment in list(shm._owned.values()):
        if segment.address <= address and address + nbytes <= segment.address + segment.nbytes:
            return segment.name, address - segment.address
    return None


class Registration:
    """A trainer's tensors registered once as the ranks' source (registered storage).

    `weights` is a mapping of tensors in shared memory (`share`), or a torch module whose
    `state_dict()` holds them; it is read again at each update, so a tensor the trainer
    reallocated (a new storage, shape or dtype) is noticed and refused."""

    def __init__(self, weights: Any):
        self.weights = weights
        self.places: dict[str, tuple[str, int, tuple[int, ...], str, int]] = {}
        for name, tensor in self._current().items():
            self.places[name] = self._place(name, tensor)

    def _current(self) -> Mapping[str, Any]:
        if hasattr(self.weights, "state_dict") and not isinstance(self.weights, Mapping):
            return self.weights.state_dict()
        return self.weights

    @staticmethod
    def _place(name: str, tensor: Any) -> tuple[str, int, tuple[int, ...], str, int]:
        array, dtype = to_host(tensor)
        if not array.flags.c_contiguous:
            raise WeightMismatchError(f"registered parameter {name!r} is not contiguous")
        address = array.__array_interface__["data"][0]
        where = _locate(address, array.nbytes)
        if where is None:
            raise WeightMismatchError(
                f"parameter {name!r} is not in shared memory this process owns: put the "
                "weights there with fd_ray_sync.ipc.share() and train on what it returns"
            )
        return (*where, tuple(array.shape), dtype, address)

    def tensors(self, plans: Sequence[ShardPlan] | None = None) -> list[TensorMeta]:
        """Every registered tensor as it is now (segment offsets, with each TP rank's slice
        checksums for `plans`); refuses when one moved since registration."""
        current = self._current()
        problems = []
        if set(current) != set(self.places):
            added = sorted(set(current) - set(self.places))
            gone = sorted(set(self.places) - set(current))
            problems.append(f"names changed (new: {added[:5]}, gone: {gone[:5]})")
        metas = []
        for name, (_, offset, shape, dtype, address) in self.places.items():
            if name not in current:
                continue
            array, now_dtype = to_host(current[name])
            now = (tuple(array.shape), now_dtype, array.__array_interface__["data"][0])
            if now != (shape, dtype, address):
                problems.append(
                    f"{name} was reallocated ({dtype}{list(shape)} -> "
                    f"{now_dtype}{list(array.shape)}, or a new storage)"
                )
                continue
            metas.append(
                TensorMeta(
                    name=name,
                    shape=shape,
                    dtype=dtype,
                    offset=offset,
                    nbytes=array.nbytes,
                    slice_checksums=_checksums(array, None, name, plans),
                )
            )
        if problems:
            raise StateError(
                "registered storage changed since Fleet.register(): "
                + "; ".join(problems[:5])
                + ": register the weights again"
            )
        return metas

    def segment_of(self, name: str) -> str:
        return self.places[name][0]
