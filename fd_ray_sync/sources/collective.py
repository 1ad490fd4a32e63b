"""The collective transport, rank side: buckets broadcast along the weight-sync group's chain.

The trainer packs each bucket into one of two slots (checksums taken while packing, as the
ipc ring does), tells the feed what it holds (`BucketMeta`, so each rank checks its slices
as they land) and sends it in pieces to the first member of the chain
(`fd_ray_sync.collective`). Each rank receives the bucket into one of two preallocated
buffers, forwarding every piece to the next member as it lands, then cuts its TP slice / EP
experts out of it while the next bucket arrives in the other buffer. The bytes never pass
through the object store.

The trainer's buffers are reused, so a collective version is not kept for restores (like
ipc): a replica that must reload it waits for the next update.
"""

from __future__ import annotations

from dataclasses import dataclass

from fd_ray_sync import collective
from fd_ray_sync.collective import GroupInfo
from fd_ray_sync.errors import StateError
from fd_ray_sync.feed import BucketTicket
from fd_ray_sync.sources.base import RankContext, TransportSpec, WeightSource, register_source
from fd_ray_sync.sources.object_store import BucketStreamSource, StreamSpec
from fd_ray_sync.tensors import storage_dtype

SLOTS = 2  # receive buffers per rank: one being written out, one arriving


def extent(meta) -> int:
    """Bytes a packed bucket spans (tensors start at aligned offsets)."""
    return max((t.offset + t.nbytes for t in meta.tensors), default=0)


@dataclass(frozen=True)
class CollectiveSpec(StreamSpec):
    """A pipelined update over the weight-sync group `group`; each bucket fits `slot_bytes`."""

    transport = "collective"
    check_while_copying = True
    relayed = False
    group: GroupInfo | None = None
    slot_bytes: int = 0

    def received(self, feed) -> TransportSpec:
        return self.without_data()


class _Arrival:
    """One bucket being received (and forwarded down the chain) into buffer `buf`."""

    def __init__(self, group, buf, ticket: BucketTicket):
        self.ticket, self.buf, self.group = ticket, buf, group
        self.waiter = group.receive(buf, extent(ticket.meta), ticket.meta.index)

    def arrays(self, aborted) -> list:
        info = self.group.info
        what = f"bucket {self.ticket.meta.index} from {info.who(self.group.prev)}"
        self.waiter.result(what, info.timeout_s, aborted)
        used = self.buf[: extent(self.ticket.meta)]
        data = used.cpu().numpy() if used.device.type != "cpu" else used.numpy()
        out = []
        for t in self.ticket.meta.tensors:
            raw = data[t.offset : t.offset + t.nbytes]
            out.append(raw.view(storage_dtype(t.dtype)).reshape(t.shape))
        return out


@register_source("collective")
class CollectiveSource(BucketStreamSource):
    """Buckets as they arrive over the weight-sync group (see the module docstring)."""

    def __init__(self, spec: CollectiveSpec, ctx: RankContext, host: str):
        feed, uid, rank = spec.feed, spec.uid, ctx.rank
        super().__init__(
            spec.announced,
            request=lambda i: feed.take_bucket.remote(uid, rank, i, i - SLOTS),
            relay=None,
            plan=ctx.plan,
            version=spec.version,
            keep=False,
        )
        if spec.group is None:
            raise StateError("a collective update without its weight-sync group")
        self.spec = spec
        self.group = collective.join(spec.group, rank, host, self._aborted)  # all, or none
        self.buffers = self.group.buffers(SLOTS, spec.slot_bytes)
        self.arrivals: dict[int, _Arrival] = {}

    @classmethod
    def open(cls, spec: CollectiveSpec, ctx: RankContext) -> WeightSource:
        import ray

        return cls(spec, ctx, ray.util.get_node_ip_address())

    def _aborted(self) -> str | None:
        import ray

        return ray.get(self.spec.feed.feed_closed.remote(self.spec.uid))

    def _start(self, ticket: BucketTicket) -> _Arrival:
        i = ticket.meta.index
        if i not in self.arrivals:
            buf = self.buffers[i % SLOTS]  # its last bucket (i - 2) was written out already
            self.arrivals[i] = _Arrival(self.group, buf, ticket)
        return self.arrivals[i]

    def _fetch(self, ticket: BucketTicket) -> list:
        try:
            return self._start(ticket).arrays(self._aborted)
        except BaseException:
            collective.leave(self.spec.group.key)  # sends may be left unmatched: rebuild
            raise
        finally:
            self.arrivals.pop(ticket.meta.index, None)

    def _prefetch(self, ticket: BucketTicket) -> None:
        self._start(ticket)  # arrives (and goes on down the chain) while this one is written

    def close(self) -> None:
        if any(a.waiter.thread.is_alive() for a in self.arrivals.values()):
            collective.leave(self.spec.group.key)  # abandoned mid-bucket: the group is unusable
        self.arrivals.clear()
