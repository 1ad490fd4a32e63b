"""The feed of one pipelined update: buckets as the trainer puts them, taken by the ranks.

Ray-free (plain threads and a condition variable): the coordinator serves it from its "feed"
threads, the trainer calls `add`/`wait_written`/`end`, each rank calls `take` for its next
bucket. A bucket is whatever the transport passes around (an object-store ref today);
`relay_plan` decides which rank nodes hand buckets on to which.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fd_ray_sync.buckets import BucketMeta
from fd_ray_sync.errors import StateError


@dataclass(frozen=True)
class BucketTicket:
    """What a rank gets for its next bucket (`BucketFeed.take`)."""

    meta: BucketMeta
    ref: Any  # the copy to fetch: the trainer's, or the previous node's relayed one
    origin: Any  # the trainer's copy (the one the committed version keeps)
    relay: bool  # this rank re-puts the bucket for the next node on the chain


class BucketFeed:
    """One pipelined update's buckets, as the trainer puts them and the ranks take them.

    Before putting another bucket, the trainer waits until every rank has written the one
    `ahead` places back (backpressure), and on a relay chain of n nodes n - 1 more (`chain`:
    every hop then has a bucket to move at once; a bucket of a longer window stays in the
    store until every rank wrote it, the trainer's copy and each relayer's); a rank asks
    for bucket i+1 before writing bucket i, saying which ones it has written. Calls run in
    the coordinator's feed threads in no guaranteed order, so buckets are kept by index
    and the end may be announced before the last bucket is in; and no caller sends a call
    that another of its calls waiting here depends on. Closing wakes every waiter with the
    reason (the update failed/ended).
    """

    def __init__(self, ranks: int, keep: bool):
        self.cond = threading.Condition()
        self.buckets: dict[int, list] = {}  # index -> [meta, ref]; ref None once released
        # The relay chain (see `relay_plan`): rank -> node, node -> node it fetches from,
        # ranks that re-put each bucket for the next node, and those copies by (node, index).
        self.node_of: dict[int, str] = {}
        self.source: dict[str, str] = {}
        self.relayers: set[int] = set()
        self.relayed: dict[tuple[str, int], object] = {}
        self.widen = 0  # buckets the trainer's backpressure allows beyond its own window
        self.count: int | None = None  # set when the trainer has put the last bucket
        self.expected: dict[int, str] | None = None
        self.written = [-1] * ranks
        self.released = -1  # buckets up to here are released (keep off)
        self.keep = keep
        self.closed: str | None = None

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        if not self.cond.wait_for(lambda: self.closed is not None or ready(), timeout):
            raise StateError(f"{what} within {timeout:g}s")
        if self.closed is not None:
            raise StateError(self.closed)

    def _complete(self) -> bool:
        return self.count is not None and len(self.buckets) == self.count

    def add(self, meta: BucketMeta, ref) -> None:
        with self.cond:
            if self.closed is not None:
                raise StateError(self.closed)
            if meta.index in self.buckets or (self.count is not None and meta.index >= self.count):
                raise StateError(f"bucket {meta.index} fed twice or after the end")
            self.buckets[meta.index] = [meta, ref]
            self.cond.notify_all()

    def chain(self, node_of: dict[int, str], trainer_node: str | None) -> None:
        """Relay this update along `relay_plan(node_of, trainer_node)`."""
        with self.cond:
            self.node_of = dict(node_of)
            self.source, self.relayers = relay_plan(self.node_of, trainer_node)
            self.widen = len(self.source)

    def wait_written(self, index: int, timeout: float) -> None:
        """Return once every rank wrote bucket `index` (less the relay chain's widening)."""
        with self.cond:
            index -= self.widen
            self._wait(lambda: min(self.written) >= index, timeout, f"ranks did not write {index}")

    def end(self, count: int, expected: dict[int, str] | None) -> None:
        with self.cond:
            if self.closed is not None:
                raise StateError(self.closed)
            if any(i >= count for i in self.buckets):
                raise StateError(f"the trainer ended after {count} buckets, more were fed")
            self.count, self.expected = count, expected
            self.cond.notify_all()

    def wait_end(self, timeout: float) -> None:
        """Return once the trainer said the feed is complete (with its expected
        fingerprints): a non-streaming update's trainer computes them while ranks load."""
        with self.cond:
            self._wait(lambda: self.count is not None, timeout, "the trainer did not finish")

    def wait_closed(self, timeout: float) -> bool:
        """True once the feed is closed (waits up to `timeout` seconds)."""
        with self.cond:
            return self.cond.wait_for(lambda: self.closed is not None, timeout)

    def close(self, reason: str) -> None:
        with self.cond:
            if self.closed is None:
                self.closed = reason
                for entry in self.buckets.values():  # the transaction keeps what it needs
                    entry[1] = None
                self.relayed.clear()
                self.cond.notify_all()

    def take(self, rank: int, index: int, done: int, timeout: float):
        """Bucket `index` for `rank`, which has written every bucket up to `done`; None
        after the last bucket."""
        with self.cond:
            self.written[rank] = max(self.written[rank], done)
            self._release(min(self.written))
            self.cond.notify_all()
            upstream = self.source.get(self.node_of.get(rank, ""))

            def arrived() -> bool:
                if index == self.count and self._complete():
                    return True
                return index in self.buckets and (
                    upstream is None or (upstream, index) in self.relayed
                )

            self._wait(arrived, timeout, f"bucket {index} did not arrive (is the trainer alive?)")
            if index not in self.buckets:
                return None
            meta, origin = self.buckets[index]
            ref = origin if upstream is None else self.relayed[(upstream, index)]
            if ref is None:
                raise StateError(f"bucket {index} was already released")
            return BucketTicket(meta=meta, ref=ref, origin=origin, relay=rank in self.relayers)

    def relay(self, node: str, index: int, ref) -> None:
        """`node` holds its own copy of bucket `index` now: the next node fetches it there."""
        with self.cond:
            if self.closed is None:
                self.relayed[(node, index)] = ref
                self.cond.notify_all()

    def _release(self, written: int) -> None:
        """Drop the relayed copies every rank has written, and (no committed copy) the
        buckets themselves: the store frees them."""
        for key in [k for k in self.relayed if k[1] <= written]:
            del self.relayed[key]
        if not self.keep:
            for i in range(self.released + 1, written + 1):
                self.buckets[i][1] = None
            self.released = max(self.released, written)

    def wait_all(self, timeout: float) -> tuple[tuple[BucketMeta, ...], tuple]:
        with self.cond:
            self._wait(self._complete, timeout, "the trainer did not finish")
            return self.metas(), self.refs()

    def metas(self) -> tuple[BucketMeta, ...]:
        return tuple(self.buckets[i][0] for i in sorted(self.buckets))

    def refs(self) -> tuple:
        return tuple(self.buckets[i][1] for i in sorted(self.buckets))

    def progress(self) -> dict:
        with self.cond:
            return {"buckets_put": len(self.buckets), "written": [w + 1 for w in self.written]}


def relay_plan(nodes: dict[int, str], trainer_node: str | None) -> tuple[dict, set]:
    """The chain of rank nodes a pipelined update travels along.

    Ranks on the trainer's node read its buckets in place. The other nodes, in order of
    their lowest rank, form a chain: the first fetches each bucket from the trainer's node,
    its lowest rank re-puts it there, the next node fetches that copy, and so on. Returns
    (node -> the node it fetches from, ranks that re-put); with fewer than two such nodes
    there is nothing to relay.
    """
    chain: list[str] = []
    for rank in sorted(nodes):
        node = nodes[rank]
        if node != trainer_node and node not in chain:
            chain.append(node)
    if len(chain) < 2:
        return {}, set()
    source = {chain[k]: chain[k - 1] for k in range(1, len(chain))}
    first_rank: dict[str, int] = {}
    for rank in sorted(nodes):
        first_rank.setdefault(nodes[rank], rank)
    return source, {first_rank[node] for node in chain[:-1]}
