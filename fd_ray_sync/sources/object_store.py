"""Weights from buckets in Ray's object store (the default source of `Fleet.update`).

The trainer `ray.put`s each bucket (see `fd_ray_sync.buckets`); a rank receives the bucket
metadata inline and the object refs, checks names/shapes/dtypes against its model from the
metadata alone, verifies checksums, then maps the buckets one at a time and copies only its
own TP slice / EP experts straight into the parameters. While bucket i is written, bucket i+1
is already being fetched to the rank's node.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from fd_ray_sync.buckets import BucketMeta, bucket_views, local_checksum
from fd_ray_sync.checksum import crc32
from fd_ray_sync.errors import ChecksumError, WeightMismatchError
from fd_ray_sync.messages import TensorMeta
from fd_ray_sync.sharding import REPLICATED, ShardSpec, take_shard
from fd_ray_sync.sources.base import Chunk, WeightSource, register_source
from fd_ray_sync.tensors import as_storage


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

    def version(self) -> str | None:
        return self._version

    def manifest(self) -> dict[str, TensorMeta]:
        out: dict[str, TensorMeta] = {}
        for bucket in self.metas:
            for t in bucket.tensors:
                if t.name in out:
                    raise WeightMismatchError(f"parameter {t.name!r} appears in two buckets")
                spec = self.plan.get(t.name, REPLICATED)
                out[t.name] = t.model_copy(
                    update={
                        "shape": spec.local_shape(t.shape),
                        "nbytes": t.nbytes // max(1, spec.parts),
                        "crc32": local_checksum(t, spec),  # of this rank's bytes
                        "slice_crc32": None,
                    }
                )
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
                if want is None and t.crc32 is not None:
                    got, want = crc32(array), t.crc32  # only the whole tensor's is known
                elif want is not None:
                    got = crc32(take_shard(as_storage(array, t.dtype), spec))
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
