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

On GPUs the same protocol runs over CUDA IPC (`fd_ray_sync.cuda_ipc`): a ring on `device`
is a few device buffers, and registered CUDA tensors are shared where they lie (no `share()`
step); names and offsets are the same, ranks copy device to device. Checksums of device
bytes are taken on the device (`fd_ray_sync.cuda_hash`: the same blocked xxh3 numbers), the
trainer's slices of every registered tensor in one launch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fd_ray_sync import cuda_ipc, shm
from fd_ray_sync.buckets import BucketMeta, device_slice_checksums, plan_parts, slice_checksums
from fd_ray_sync.checksum import copy_and_digest, copy_and_digests
from fd_ray_sync.errors import StateError, WeightMismatchError
from fd_ray_sync.messages import TensorMeta
from fd_ray_sync.sharding import REPLICATED, ShardPlan, ShardSpec, take_shard
from fd_ray_sync.tensors import (
    BITS_DTYPES,
    contiguous,
    from_bits,
    on_cuda,
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
    """`slots` shared segments of `slot_bytes`, allocated once, reused by every update.

    With `device` (a torch CUDA device), the slots are device buffers shared by CUDA IPC:
    `names[k]` is slot k's allocation and `offsets[k]` where the slot starts in it."""

    def __init__(self, slots: int, slot_bytes: int, shared: bool = True, device: str | None = None):
        if slots < 2:
            raise StateError(f"a bucket ring needs at least 2 slots, not {slots}")
        self.slot_bytes = slot_bytes
        self.device = device
        self.segments: list[shm.Segment] = []
        self._names: tuple[str, ...] = ()
        self.offsets: tuple[int, ...] = (0,) * slots
        if device is not None:
            import torch

            self.slots = [
                torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(slots)
            ]
            exported: dict[int, str] = {}
            shared_at = [cuda_ipc.export(slot, exported) for slot in self.slots]
            self._names = tuple(name for name, _ in shared_at)
            self.offsets = tuple(offset for _, offset in shared_at)
        elif shared:  # segments the ranks attach (ipc)
            self.segments = [shm.create(f"ring{k}", slot_bytes) for k in range(slots)]
            self._names = tuple(s.name for s in self.segments)
            self.slots = [s.array(0, slot_bytes) for s in self.segments]
        else:  # this process's own memory, which the collective transport sends from
            self.slots = [np.empty(slot_bytes, np.uint8) for _ in range(slots)]

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    @property
    def shared(self) -> bool:
        return bool(self._names)

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
        packed: dict[str, Any] = {}  # device tensors to hash on the device, all at once
        for name, tensor in named:
            offset = aligned(offset)
            if self.device is not None:
                shape, dtype, nbytes, sums, dst = _pack_device(slot, offset, tensor, name, plans)
                if dst is not None:
                    packed[name] = dst
            else:
                array, dtype = to_host(tensor)
                shape, nbytes = array.shape, array.nbytes
                dst = slot[offset : offset + nbytes].view(array.dtype).reshape(shape)
                sums = _checksums(dst, array, name, plans)
            metas.append(
                TensorMeta(
                    name=name,
                    shape=shape,
                    dtype=dtype,
                    offset=offset,
                    nbytes=nbytes,
                    slice_checksums=sums,
                )
            )
            offset += nbytes
        metas = _hashed_on_device(metas, packed, plans)
        if self.device is not None:  # ranks read the slot from other processes' streams
            import torch

            torch.cuda.synchronize(self.device)
        return BucketMeta(index=index, tensors=tuple(metas))

    def close(self) -> None:
        self.slots = []
        self._names = ()
        for segment in self.segments:
            segment.unlink()
        self.segments = []


def _pack_device(slot: Any, offset: int, tensor: Any, name: str, plans) -> tuple:
    """Copy `tensor` into the device slot at `offset`: (shape, dtype, nbytes, checksums, the
    copy when its checksums are still to take on the device). A host tensor crosses once
    (host to device) and is hashed there."""
    import torch

    shape, dtype = shape_and_dtype(tensor)
    nbytes = math.prod(shape) * storage_dtype(dtype).itemsize
    dst = slot[offset : offset + nbytes].view(getattr(torch, dtype)).view(shape)
    host = None
    if not on_cuda(tensor):
        host, _ = to_host(tensor)
        tensor = from_bits(torch.from_numpy(contiguous(host)), dtype)
    dst.copy_(tensor.detach())
    if plans is None:
        return shape, dtype, nbytes, None, None
    if host is None:
        return shape, dtype, nbytes, None, dst
    return shape, dtype, nbytes, _checksums(host, None, name, plans), None


def _hashed_on_device(metas: list, tensors: Mapping[str, Any], plans) -> list:
    """`metas` with the slice checksums of the CUDA `tensors` (by name) for `plans`, taken on
    the device in one launch."""
    if not tensors:
        return metas
    specs = {name: [plan.get(name, REPLICATED) for plan in plans] for name in tensors}
    sums = device_slice_checksums(tensors, specs)
    return [
        m.model_copy(update={"slice_checksums": sums[m.name]}) if m.name in sums else m
        for m in metas
    ]


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

    `weights` is a mapping of tensors in shared memory (`share`) or of torch CUDA tensors
    (shared where they lie, by CUDA IPC), or a torch module whose `state_dict()` holds them;
    it is read again at each update, so a tensor the trainer reallocated (a new storage,
    shape or dtype) is noticed and refused."""

    def __init__(self, weights: Any):
        self.weights = weights
        self._exported: dict[int, str] = {}  # CUDA allocations shared, by base address
        self.places: dict[str, tuple[str, int, tuple[int, ...], str, int]] = {}
        for name, tensor in self._current().items():
            self.places[name] = self._place(name, tensor)

    def _current(self) -> Mapping[str, Any]:
        if hasattr(self.weights, "state_dict") and not isinstance(self.weights, Mapping):
            return self.weights.state_dict()
        return self.weights

    def _place(self, name: str, tensor: Any) -> tuple[str, int, tuple[int, ...], str, int]:
        if on_cuda(tensor):
            if not tensor.is_contiguous():
                raise WeightMismatchError(f"registered parameter {name!r} is not contiguous")
            shape, dtype = shape_and_dtype(tensor)
            if tensor.numel() == 0:  # no allocation to share (its pointer is 0)
                return (cuda_ipc.NO_MEMORY, 0, shape, dtype, 0)
            where = cuda_ipc.export(tensor.detach(), self._exported)
            return (*where, shape, dtype, tensor.data_ptr())
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
        devices = set()
        on_device: dict[str, Any] = {}  # checked CUDA tensors: hashed together, on the device
        for name, (_, offset, shape, dtype, address) in self.places.items():
            if name not in current:
                continue
            tensor = current[name]
            if on_cuda(tensor):  # shape and pointer only: no read unless checked
                devices.add(tensor.device)
                now_shape, now_dtype = shape_and_dtype(tensor)
                now_address, array = tensor.data_ptr(), None
            else:
                array, now_dtype = to_host(tensor)
                now_shape, now_address = tuple(array.shape), array.__array_interface__["data"][0]
            if (now_shape, now_dtype, now_address) != (shape, dtype, address):
                problems.append(
                    f"{name} was reallocated ({dtype}{list(shape)} -> "
                    f"{now_dtype}{list(now_shape)}, or a new storage)"
                )
                continue
            if array is None and plans is not None:
                on_device[name] = tensor.detach()
            metas.append(
                TensorMeta(
                    name=name,
                    shape=shape,
                    dtype=dtype,
                    offset=offset,
                    nbytes=math.prod(shape) * storage_dtype(dtype).itemsize,
                    slice_checksums=None if array is None else _checksums(array, None, name, plans),
                )
            )
        if not problems:
            metas = _hashed_on_device(metas, on_device, plans)
        if problems:
            raise StateError(
                "registered storage changed since Fleet.register(): "
                + "; ".join(problems[:5])
                + ": register the weights again"
            )
        if devices:  # the trainer's last writes land before ranks read from their streams
            import torch

            for device in devices:
                torch.cuda.synchronize(device)
        return metas

    def segment_of(self, name: str) -> str:
        return self.places[name][0]
