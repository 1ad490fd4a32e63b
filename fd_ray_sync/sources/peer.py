"""Restores from a healthy replica: a rebuilt or rolled-back replica loads the committed
version from the ranks of a replica that serves it, not from the trainer.

Each rank of the healthy replica exports its own parameters (already its TP slice / EP
experts) as buckets in its node's object store (`WeightManagerActor.export`); the rank of
the same TP rank in the replica being restored reads them as they are (no slicing), checks
their checksums before writing, and the restore then compares every rank's fingerprint
with the committed one. Nothing of the trainer is needed, so recovery works after the
trainer process is gone (its kept buckets went with it) and for transports that keep no
copy (ipc, collective). The exported buckets live while the spec does: the restore drops it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fd_ray_sync.buckets import BucketMeta
from fd_ray_sync.sources.base import RankContext, TransportSpec, WeightSource, register_source
from fd_ray_sync.sources.object_store import ObjectStoreSource


@dataclass(frozen=True)
class PeerSpec(TransportSpec):
    """The committed version as replica `replica`'s ranks exported it: `metas[t]` and
    `refs[t]` are the buckets of its TP rank t (local shapes)."""

    transport = "peer"
    replica: int = -1
    metas: tuple[tuple[BucketMeta, ...], ...] = field(default=(), repr=False)
    refs: tuple[tuple, ...] = field(default=(), repr=False)

    @property
    def restorable(self) -> bool:
        return bool(self.refs)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for metas in self.metas for m in metas)

    @property
    def where(self) -> str:
        return f" in replica {self.replica}"


@register_source("peer")
class PeerSource(ObjectStoreSource):
    """One TP rank's share of a `PeerSpec`: tensors taken whole (they are slices already)."""

    @classmethod
    def open(cls, spec: PeerSpec, ctx: RankContext) -> WeightSource:
        t = ctx.parallel.tp_rank
        return cls(spec.metas[t], spec.refs[t], {}, spec.version)

    def received(self, spec: TransportSpec) -> TransportSpec:
        return spec.without_data()  # the peer's copy goes once restored
