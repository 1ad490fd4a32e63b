"""Weights from buckets in Ray's object store (the default source of `Fleet.update`).

The trainer `ray.put`s each bucket (see `fd_ray_sync.buckets`); a rank maps the buckets one
at a time and copies only its own TP slice / EP experts straight into the parameters. While
bucket i is written, bucket i+1 is already being fetched to the rank's node.

Two forms:
- `ObjectStoreSource`: every bucket exists already (a committed version being restored, or
  an update whose names were not known in advance). Names/shapes/dtypes and checksums are
  all checked before the first write.
- `BucketStreamSource`: the pipelined update. The trainer announced the names, shapes and
  dtypes up front (checked before the first write) and is still putting buckets while the
  rank writes the first ones; each bucket is checked against the announcement and its
  checksums as it arrives, and the rank's request for the next bucket reports what it has
  written (the trainer's backpressure). Ranks on a relay chain re-put each bucket for the
  next node (see `fd_ray_sync.feed.relay_plan`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fd_ray_sync.buckets import BucketMeta, bucket_views, local_checksum, local_meta
from fd_ray_sync.checksum import digest
from fd_ray_sync.errors import ChecksumError, WeightMismatchError
from fd_ray_sync.feed import BucketTicket
from fd_ray_sync.messages import TensorMeta
from fd_ray_sync.sharding import REPLICATED, ShardSpec, local_shape_of, take_shard
from fd_ray_sync.sources.base import (
    Chunk,
    RankContext,
    TransportSpec,
    WeightSource,
    register_source,
)
from fd_ray_sync.tensors import as_storage, storage_dtype


@dataclass(frozen=True)
class ObjectStoreSpec(TransportSpec):
    """Every bucket of a version already in the object store: `refs[i]` holds `metas[i]`'s
    arrays (a committed version kept for restores, or an update gathered whole)."""

    transport = "object_store"
    metas: tuple[BucketMeta, ...] = ()
    refs: tuple = field(default=(), repr=False)

    @property
    def restorable(self) -> bool:
        return bool(self.refs)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.metas)


@dataclass(frozen=True)
class StreamSpec(TransportSpec):
    """A pipelined update: the trainer announced every tensor (`announced`, full shapes) and
    feeds buckets under `uid` to the coordinator (`feed`), which hands each rank its next
    `fd_ray_sync.feed.BucketTicket`. With `keep`, ranks collect the trainer's refs."""

    transport = "object_store"
    streaming = True
    relayed = True
    announced: tuple[TensorMeta, ...] = field(default=(), repr=False)
    feed: Any = field(default=None, repr=False)  # the CoordinatorActor
    uid: str = ""
    keep: bool = True

    @property
    def nbytes(self) -> int:
        return sum(math.prod(t.shape) * storage_dtype(t.dtype).itemsize for t in self.announced)

    def received(self, feed) -> ObjectStoreSpec:
        return ObjectStoreSpec(self.version, feed.metas(), feed.refs())


@register_source("object_store")
class ObjectStoreSource(WeightSource):
    """A rank's view of a bucketed update. `refs[i]` holds the arrays of `metas[i]`."""

    def __init__(
        self,
        metas: Sequence[BucketMeta],
        refs: Sequence[object],
        plan: Mapping[str, ShardSpec],
        version: str | None = None,
    ):
        if len(metas) != len(refs):
            raise WeightMismatchError(f"{len(metas)} bucket metadata for {len(refs)} buckets")
        self.metas, self.refs, self.plan = list(metas), list(refs), plan
        self._version = version

    @classmethod
    def open(cls, spec: ObjectStoreSpec | StreamSpec, ctx: RankContext) -> WeightSource:
        if not isinstance(spec, StreamSpec):
            return cls(spec.metas, spec.refs, ctx.plan, spec.version)
        feed, uid, rank = spec.feed, spec.uid, ctx.rank
        return BucketStreamSource(
            spec.announced,
            request=lambda i: feed.take_bucket.remote(uid, rank, i, i - 2),
            relay=lambda i, refs: feed.relay_bucket.remote(uid, ctx.node, i, refs),
            plan=ctx.plan,
            version=spec.version,
            keep=spec.keep,
        )

    def version(self) -> str | None:
        return self._version

    def manifest(self) -> dict[str, TensorMeta]:
        out: dict[str, TensorMeta] = {}
        for bucket in self.metas:
            for t in bucket.tensors:
                if t.name in out:
                    raise WeightMismatchError(f"parameter {t.name!r} appears in two buckets")
                out[t.name] = local_meta(t, self.plan.get(t.name, REPLICATED))
        return out

    def _fetch(self, i: int) -> list:
        import ray

        if i + 1 < len(self.refs):  # start pulling the next bucket to this node
            ray.wait([self.refs[i + 1]], fetch_local=True, timeout=0)
        return ray.get(self.refs[i])

    def verify(self) -> None:
        """Check the bytes this rank will write (its slice) against the trainer's checksums."""
        for i, meta in enumerate(self.metas):
            for t, array in bucket_views(meta, self._fetch(i)):
                spec = self.plan.get(t.name, REPLICATED)
                want = local_checksum(t, spec)
                if want is None and t.checksum is not None:
                    got, want = digest(array), t.checksum  # only the whole tensor's is known
                elif want is not None:
                    got = digest(take_shard(as_storage(array, t.dtype), spec))
                else:
                    continue
                if got != want:
                    raise ChecksumError(
                        f"bucket {meta.index}: parameter {t.name!r} does not match its checksum"
                    )

    def chunks(self) -> Iterator[tuple[str, Chunk]]:
        for i, meta in enumerate(self.metas):
            chunk: Chunk = {}
            for t, array in bucket_views(meta, self._fetch(i)):
                if tuple(array.shape) != tuple(t.shape):
                    raise WeightMismatchError(
                        f"bucket {meta.index}: {t.name} has shape {array.shape}, "
                        f"metadata says {t.shape}"
                    )
                full = as_storage(array, t.dtype)
                chunk[t.name] = (take_shard(full, self.plan.get(t.name, REPLICATED)), t.dtype)
            yield f"bucket {meta.index}", chunk


class BucketStreamSource(WeightSource):
    """A rank's view of a pipelined update: buckets arrive while it writes.

    `request(i)` returns an ObjectRef of bucket i's `fd_ray_sync.feed.BucketTicket` (its
    meta; the copy to fetch; the trainer's copy; whether this rank re-puts it for the next
    node), or of None after the last one. It is called for bucket i+1 before
    bucket i is written, so it also tells the feed that every bucket up to i-1 is written.
    `relay(i, [ref])` hands on this node's copy of bucket i. `announced` lists every tensor
    (full shapes) the trainer will send. With `keep`, the trainer's bucket refs are
    collected (`metas`, `refs`) so the rank can name the committed version's data afterwards.
    """

    name = "object_store"
    streaming = True

    def __init__(
        self,
        announced: Sequence[TensorMeta],
        request: Callable[[int], object],
        relay: Callable[[int, list], object] | None,
        plan: Mapping[str, ShardSpec],
        version: str | None = None,
        keep: bool = True,
    ):
        self.announced = {t.name: t for t in announced}
        if len(self.announced) != len(announced):
            raise WeightMismatchError("a parameter is announced twice in the update")
        self._request, self._relay, self.plan = request, relay, plan
        self._version, self._keep = version, keep
        self._checksums: dict[str, int | None] = {}
        self.metas: list[BucketMeta] = []
        self.refs: list = []

    def version(self) -> str | None:
        return self._version

    def manifest(self) -> dict[str, TensorMeta]:
        out = {}
        for name, t in self.announced.items():
            spec = self.plan.get(name, REPLICATED)
            out[name] = t.model_copy(
                update={
                    "shape": local_shape_of(name, spec, t.shape),
                    "checksum": None,
                    "slice_checksums": None,
                }
            )
        return out

    def checksum(self, name: str) -> int | None:
        return self._checksums.get(name)

    def received(self, spec: TransportSpec) -> TransportSpec:
        if not self._keep:
            return spec.without_data()
        return ObjectStoreSpec(spec.version, tuple(self.metas), tuple(self.refs))

    # Hooks of the bucket's data path (the object store's here; the ipc ring overrides them).

    def _fetch(self, ticket: BucketTicket) -> list:
        """The arrays of the ticket's bucket, zero-copy views where possible."""
        import ray

        arrays = ray.get(ticket.ref)
        if ticket.relay:  # this node's own copy, for the next node to fetch
            self._relay(ticket.meta.index, [ray.put(arrays)])
        return arrays

    def _prefetch(self, ticket: BucketTicket) -> None:
        """The next bucket is known: start bringing it here (while this one is written)."""
        import ray

        ray.wait([ticket.ref], fetch_local=True, timeout=0)

    def _get(self, pending: object) -> BucketTicket | None:
        """The answer of `request` (blocks until the feed has it)."""
        import ray

        return ray.get(pending)

    def _arrived(self, pending: object) -> bool:
        """Whether the answer of `request` is already here."""
        import ray

        return bool(ray.wait([pending], timeout=0)[0])

    def chunks(self) -> Iterator[tuple[str, Chunk]]:
        seen: set[str] = set()
        pending = self._request(0)
        i = 0
        while True:
            item = self._get(pending)
            if item is None:
                break
            meta = item.meta
            if meta.index != i:
                raise WeightMismatchError(f"bucket {meta.index} arrived where {i} was due")
            arrays = self._fetch(item)
            pending = self._request(i + 1)  # ask for the next bucket before writing this one
            if self._arrived(pending) and (nxt := self._get(pending)) is not None:
                self._prefetch(nxt)
            chunk: Chunk = {}
            for t, array in bucket_views(meta, arrays):
                want = self.announced.get(t.name)
                if want is None or t.name in seen:
                    what = "was not announced" if want is None else "arrived twice"
                    raise WeightMismatchError(f"bucket {i}: parameter {t.name!r} {what}")
                if (tuple(t.shape), t.dtype) != (tuple(want.shape), want.dtype):
                    raise WeightMismatchError(
                        f"bucket {i}: {t.name} is {t.dtype}{list(t.shape)}, announced as "
                        f"{want.dtype}{list(want.shape)}"
                    )
                seen.add(t.name)
                spec = self.plan.get(t.name, REPLICATED)
                self._checksums[t.name] = local_checksum(t, spec)
                chunk[t.name] = (take_shard(as_storage(array, t.dtype), spec), t.dtype)
            if self._keep:
                self.metas.append(meta)
                self.refs.append(item.origin)
            del arrays, item
            yield f"bucket {i}", chunk
            del chunk
            i += 1
        missing = sorted(set(self.announced) - seen)
        if missing:
            raise WeightMismatchError(
                f"the update ended after {i} buckets without {len(missing)} announced "
                f"parameter(s): {', '.join(missing[:5])}"
            )
