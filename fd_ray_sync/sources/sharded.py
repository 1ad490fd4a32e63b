"""Sharded trainers' pieces, assembled on each rank (see `fd_ray_sync.shards`).

Every trainer put its own pieces of each parameter in its node's object store; a rank
fetches only the buckets holding pieces that overlap its slice, checks those pieces'
checksums before writing anything, and assembles each parameter's slice in turn (extra
memory: one chunk of assembled slices).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fd_ray_sync import shards
from fd_ray_sync.checksum import digest
from fd_ray_sync.errors import ChecksumError
from fd_ray_sync.messages import TensorMeta
from fd_ray_sync.sharding import REPLICATED, ShardSpec, local_shape_of
from fd_ray_sync.sources.base import (
    Chunk,
    RankContext,
    TransportSpec,
    WeightSource,
    group_chunks,
    register_source,
)
from fd_ray_sync.tensors import storage_dtype


@dataclass(frozen=True)
class ShardedSpec(TransportSpec):
    """One update from several trainers: each `ShardSet` is what one of them put."""

    transport = "sharded"
    sets: tuple[shards.ShardSet, ...] = field(default=(), repr=False)
    chunk_bytes: int = 256 << 20

    @property
    def restorable(self) -> bool:
        return bool(self.sets)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.sets)


@register_source("sharded")
class ShardedSource(WeightSource):
    def __init__(self, spec: ShardedSpec, plan: Mapping[str, ShardSpec]):
        self.spec, self.plan = spec, plan
        self.full = shards.check_sets(spec.sets)  # name -> (full shape, dtype)
        self.pieces = shards.plan_of(spec.sets)
        self._cache: dict[tuple[int, int], list] = {}

    @classmethod
    def open(cls, spec: ShardedSpec, ctx: RankContext) -> WeightSource:
        return cls(spec, ctx.plan)

    def version(self) -> str | None:
        return self.spec.version

    def _local(self, name: str) -> shards.Box:
        shape, _ = self.full[name]
        spec = self.plan.get(name, REPLICATED)
        local_shape_of(name, spec, shape)  # names the parameter when it does not split
        return shards.slice_box(spec, shape)

    def manifest(self) -> dict[str, TensorMeta]:
        return {
            name: TensorMeta(name=name, shape=self._local(name).shape, dtype=dtype)
            for name, (_, dtype) in self.full.items()
        }

    def _needed(self, name: str) -> Iterator[tuple[shards.ShardSet, int, int, list]]:
        """The pieces of `name` that overlap this rank's slice, with the boxes they cover."""
        local = self._local(name)
        for s, b, k in self.pieces[name]:
            t = s.metas[b].tensors[k]
            boxes = shards.region_boxes(s.regions[name], t.shape)
            if any(shards.intersect(box, local) is not None for box, _ in boxes):
                yield s, b, k, boxes

    def _bucket(self, s: shards.ShardSet, b: int) -> list:
        """Bucket `b` of set `s` (zero-copy views of this node's store; the last few kept)."""
        import ray

        key = (s.trainer, b)
        if key not in self._cache:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = ray.get(s.refs[b])
        return self._cache[key]

    def verify(self) -> None:
        for name in self.full:
            for s, b, k, _ in self._needed(name):
                t = s.metas[b].tensors[k]
                if t.checksum is not None and digest(self._bucket(s, b)[k]) != t.checksum:
                    raise ChecksumError(
                        f"the piece of {name!r} from trainer {s.trainer} (bucket {b}) does "
                        "not match its checksum"
                    )

    def chunks(self) -> Iterator[tuple[str, Chunk]]:
        def named():
            for name, (_, dtype) in self.full.items():
                local = self._local(name)
                parts: Sequence = [
                    (box, first, self._bucket(s, b)[k])
                    for s, b, k, boxes in self._needed(name)
                    for box, first in boxes
                ]
                out = np.empty(local.shape, storage_dtype(dtype))
                yield name, shards.assemble(out, local, parts), dtype

        return group_chunks(named(), self.spec.chunk_bytes, "sharded parameters")

    def close(self) -> None:
        self._cache.clear()
