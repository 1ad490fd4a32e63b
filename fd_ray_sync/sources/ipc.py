"""The co-located (ipc) transport, rank side: copy slices straight out of the trainer's memory.

The trainer (on the ranks' node) shares memory once (`fd_ray_sync.ipc`): a ring of bucket
slots, or its own registered tensors. Each rank attaches every segment once and keeps it
(`fd_ray_sync.shm.attach`), cuts its TP slice / EP experts as a strided view and the manager
copies it into the parameter in place, hashing each block as it lands. Nothing goes through
the object store; the feed (ring) or the spec (registered) only says where the bytes are.

Over CUDA (`fd_ray_sync.cuda_ipc`: the trainer's device memory, names starting "cuda-ipc-")
the views are torch tensors on this rank's GPU and the manager copies them device to device.
The copies run on this rank's stream, so the rank waits for them before it tells the trainer
a slot is free (the next bucket's fetch) and before the load ends (`close`); checksums of
what it wrote are taken on its device (`fd_ray_sync.cuda_hash`).

The trainer's memory changes with the next step, so an ipc version is not kept for restores:
a replica that must reload it (a rank died, an update failed after writing) waits for the
next update (`TransportSpec.restorable` is False).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from fd_ray_sync import cuda_hash, cuda_ipc, shm
from fd_ray_sync.buckets import local_checksum, local_meta
from fd_ray_sync.errors import ChecksumError, WeightMismatchError
from fd_ray_sync.feed import BucketTicket
from fd_ray_sync.messages import TensorMeta
from fd_ray_sync.sharding import REPLICATED, ShardSpec, take_shard
from fd_ray_sync.sources.base import (
    Chunk,
    RankContext,
    TransportSpec,
    WeightSource,
    group_chunks,
    register_source,
)
from fd_ray_sync.sources.object_store import BucketStreamSource, StreamSpec
from fd_ray_sync.tensors import as_storage, storage_dtype

Memory = shm.Segment | cuda_ipc.CudaSegment


def _attach(names: tuple[str, ...]) -> list[Memory]:
    """Each named memory, attached once by this process (and kept); CUDA mappings of the same
    trainer that these names no longer list (a grown ring, a new registration) are closed."""
    if any(cuda_ipc.is_cuda_name(n) for n in names):
        cuda_ipc.release_others(set(names))
    return [cuda_ipc.attach(n) if cuda_ipc.is_cuda_name(n) else shm.attach(n) for n in names]


def _view(memory: Memory, t: TensorMeta, base: int = 0):
    """`t` in `memory` at `base + t.offset`: a numpy view (shared memory) or a torch tensor on
    this rank's GPU (CUDA IPC), no copy."""
    if isinstance(memory, cuda_ipc.CudaSegment):
        return memory.tensor(base + t.offset, tuple(t.shape), t.dtype)
    array = memory.array(base + t.offset, t.nbytes)
    return array.view(storage_dtype(t.dtype)).reshape(t.shape)


def _wait_for_copies(memories) -> None:
    """Block until this rank's device copies out of `memories` are done (CUDA only)."""
    if any(isinstance(m, cuda_ipc.CudaSegment) for m in memories):
        import torch

        torch.cuda.current_stream().synchronize()


@dataclass(frozen=True)
class IpcRingSpec(StreamSpec):
    """A pipelined update through the trainer's ring: a ticket's `ref` is the slot index of
    its bucket, `slots` the slots' segment names."""

    transport = "ipc"
    check_while_copying = True
    relayed = False
    slots: tuple[str, ...] = ()
    slot_offsets: tuple[int, ...] = ()  # where each slot starts in its memory (CUDA)

    def received(self, feed) -> TransportSpec:
        return self.without_data()


@dataclass(frozen=True)
class IpcStorageSpec(TransportSpec):
    """The trainer's registered tensors: `tensors[i]` (full shape, offset and slice
    checksums) lies in segment `segments[i]`."""

    transport = "ipc"
    check_while_copying = True
    tensors: tuple[TensorMeta, ...] = field(default=(), repr=False)
    segments: tuple[str, ...] = field(default=(), repr=False)
    chunk_bytes: int = 256 << 20  # tensors per chunk written (progress granularity)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class IpcRingSource(BucketStreamSource):
    """Buckets out of the trainer's ring slots, as the feed says they are ready."""

    name = "ipc"

    def __init__(self, spec: IpcRingSpec, ctx: RankContext):
        feed, uid, rank = spec.feed, spec.uid, ctx.rank
        super().__init__(
            spec.announced,
            request=lambda i: feed.take_bucket.remote(uid, rank, i, i - 2),
            relay=None,
            plan=ctx.plan,
            version=spec.version,
            keep=False,
        )
        if len(spec.slot_offsets) != len(spec.slots):
            raise WeightMismatchError(
                f"the ring spec gives {len(spec.slot_offsets)} slot offsets for "
                f"{len(spec.slots)} slots"
            )
        self.slots = _attach(spec.slots)  # once; kept by shm / cuda_ipc
        self.offsets = spec.slot_offsets

    def _fetch(self, ticket: BucketTicket) -> list:
        # The next request tells the trainer the previous bucket's slot is free: its copies,
        # queued on this rank's stream, must be done by then.
        _wait_for_copies(self.slots)
        slot, base = self.slots[ticket.ref], self.offsets[ticket.ref]
        return [_view(slot, t, base) for t in ticket.meta.tensors]

    def close(self) -> None:
        _wait_for_copies(self.slots)

    def _prefetch(self, ticket: BucketTicket) -> None:
        pass  # the bytes are already in this node's memory


@register_source("ipc")
class IpcStorageSource(WeightSource):
    """The trainer's registered tensors, every byte already there."""

    deferred_checksums = True

    def __init__(self, spec: IpcStorageSpec, plan: Mapping[str, ShardSpec]):
        if len(spec.tensors) != len(spec.segments):
            raise WeightMismatchError(
                f"{len(spec.tensors)} registered tensors for {len(spec.segments)} segments"
            )
        self.spec, self.plan = spec, plan
        self._version = spec.version
        names = tuple(sorted(set(spec.segments) - {cuda_ipc.NO_MEMORY}))
        self.segments = dict(zip(names, _attach(names)))

    @classmethod
    def open(cls, spec: IpcRingSpec | IpcStorageSpec, ctx: RankContext) -> WeightSource:
        if isinstance(spec, IpcRingSpec):
            return IpcRingSource(spec, ctx)
        return cls(spec, ctx.plan)

    def version(self) -> str | None:
        return self._version

    def _full(self, i: int) -> tuple[TensorMeta, np.ndarray]:
        t = self.spec.tensors[i]
        if self.spec.segments[i] == cuda_ipc.NO_MEMORY:
            return t, np.empty(t.shape, storage_dtype(t.dtype))  # no bytes to read
        return t, _view(self.segments[self.spec.segments[i]], t)

    def manifest(self) -> dict[str, TensorMeta]:
        out: dict[str, TensorMeta] = {}
        for t in self.spec.tensors:
            if t.name in out:
                raise WeightMismatchError(f"parameter {t.name!r} is registered twice")
            out[t.name] = local_meta(t, self.plan.get(t.name, REPLICATED))
        return out

    def verify(self) -> None:
        names, wants, mine = [], [], []
        for i in range(len(self.spec.tensors)):
            t, full = self._full(i)
            spec = self.plan.get(t.name, REPLICATED)
            want = local_checksum(t, spec)
            if want is not None:
                names.append(t.name)
                wants.append(want)
                mine.append(take_shard(full, spec))
        for name, want, got in zip(names, wants, cuda_hash.digests(mine)):  # device ones at once
            if got != want:
                raise ChecksumError(f"registered parameter {name!r} does not match its checksum")

    def chunks(self) -> Iterator[tuple[str, Chunk]]:
        def named():
            for i in range(len(self.spec.tensors)):
                t, full = self._full(i)
                spec = self.plan.get(t.name, REPLICATED)
                yield t.name, take_shard(as_storage(full, t.dtype), spec), t.dtype

        return group_chunks(named(), self.spec.chunk_bytes, "registered tensors")

    def close(self) -> None:
        # The trainer's next step may write these tensors once the update commits.
        _wait_for_copies(self.segments.values())
