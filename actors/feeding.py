"""The feed of a pipelined update, the coordinator's side (part of CoordinatorActor).

The trainer (`Fleet.update`, fd_ray_sync.push) starts `update_stream`, which runs the
transaction (actors/transaction.py) in the actor's main thread, and puts buckets while the
ranks already write the first ones: `feed_bucket`, `feed_wait` (backpressure), `feed_end`;
ranks take theirs with `take_bucket` and relay with `relay_bucket`. These run in the "feed"
concurrency group, beside the transaction; the feed itself is fd_ray_sync.feed.BucketFeed.
"""

from __future__ import annotations

import dataclasses
import threading

import ray

from fd_ray_sync.buckets import BucketMeta
from fd_ray_sync.feed import BucketFeed
from fd_ray_sync.messages import UpdateReport
from fd_ray_sync.ray_stats import ProcessRef, is_alive
from fd_ray_sync.sources import TransportSpec
from fd_ray_sync.sources.object_store import ObjectStoreSpec

TRAINER_POLL_S = 0.5  # how often a running update asks whether its trainer still lives


class FeedMixin:
    """Pipelined updates: the feed calls and `update_stream` (part of CoordinatorActor)."""

    def _feed(self, uid: str) -> BucketFeed:
        with self._feeds_lock:
            feed = self._feeds.get(uid)
            if feed is None:
                ranks = len(self._first_replicas()) * self.config.tp  # ranks 0.. load it
                feed = self._feeds[uid] = BucketFeed(ranks, self.config.keep_committed)
                ended = [u for u, f in self._feeds.items() if f.closed is not None]
                for old in ended[:-8]:  # keep a few, for late calls to find them closed
                    del self._feeds[old]
            return feed

    @ray.method(concurrency_group="feed")
    def feed_bucket(self, uid: str, meta: BucketMeta, refs: list) -> None:
        """Add bucket `meta.index` (its ref inside `refs`, so it stays a ref)."""
        self._feed(uid).add(meta, refs[0])

    @ray.method(concurrency_group="feed")
    def feed_wait(self, uid: str, index: int) -> None:
        """Return once every rank has written bucket `index` (the trainer's backpressure)."""
        self._feed(uid).wait_written(index, self.config.phase_timeout_s)

    @ray.method(concurrency_group="feed")
    def feed_end(self, uid: str, count: int, expected: dict[int, str] | None) -> None:
        self._feed(uid).end(count, expected)

    @ray.method(concurrency_group="feed")
    def feed_close(self, uid: str, reason: str) -> None:
        """The trainer gave up (its packing failed): the update aborts."""
        self._feed(uid).close(f"the trainer stopped: {reason}")

    @ray.method(concurrency_group="feed")
    def feed_closed(self, uid: str) -> str | None:
        """Why the feed `uid` closed (the update failed or ended), or None while it runs."""
        with self._feeds_lock:
            feed = self._feeds.get(uid)
        return "the update is over" if feed is None else feed.closed

    @ray.method(concurrency_group="feed")
    def take_bucket(self, uid: str, rank: int, index: int, done: int):
        """Bucket `index` for `rank` (see `BucketFeed.take`), or None after the last; `rank`
        has written every bucket up to `done`."""
        return self._feed(uid).take(rank, index, done, self.config.phase_timeout_s)

    @ray.method(concurrency_group="feed")
    def relay_bucket(self, uid: str, node: str, index: int, refs: list) -> None:
        self._feed(uid).relay(node, index, refs[0])

    def sync_members(self) -> dict[int, tuple[str, int]]:
        """Rank -> (node, pid) of the processes the next update loads into (replicas that
        lost a rank are rebuilt first): the collective transport forms its group of them."""
        self._rebuild_lost()
        ranks = len(self._first_replicas()) * self.config.tp
        return {r: (self._nodes[r], self._pids[r]) for r in range(ranks)}

    def update_stream(
        self,
        uid: str,
        spec: TransportSpec | None,
        version: str,
        force: bool = False,
        trainer_node: str | None = None,
        trainer: ProcessRef | None = None,
        partial: bool = False,
    ) -> UpdateReport:
        """Load the update the trainer feeds under `uid` (`partial`: a subset of the
        parameters, see `_transaction`).

        `spec` is the streaming transport's description of the update (its announced
        tensors: ranks check them before the first write and write buckets as they arrive).
        None: the update is gathered first (every bucket put in the object store), then
        checked whole before anything is written. While the feed is open, `trainer` is
        watched: its death closes the feed within a second.
        """
        feed = self._feed(uid)
        if trainer is not None:
            threading.Thread(target=self._watch_trainer, args=(feed, trainer), daemon=True).start()
        try:
            if spec is None:
                metas, refs = feed.wait_all(self.config.phase_timeout_s)
                spec = ObjectStoreSpec(version, metas, refs)
            elif self.config.relay and spec.relayed:
                ranks = len(self._first_replicas()) * self.config.tp
                feed.chain({r: n for r, n in self._nodes.items() if r < ranks}, trainer_node)
            spec = dataclasses.replace(spec, version=version, partial=partial)
            return self._transaction(spec, feed, force)
        except Exception as e:
            feed.close(f"the update failed: {type(e).__name__}: {e}")
            raise
        finally:
            feed.close("the update ended")

    @staticmethod
    def _watch_trainer(feed: BucketFeed, trainer: ProcessRef) -> None:
        """Close `feed` as soon as the trainer feeding it is dead: ranks waiting for its next
        bucket stop at once instead of at the phase timeout."""
        while not feed.wait_closed(TRAINER_POLL_S):
            try:
                alive = is_alive(trainer)
            except Exception:  # noqa: BLE001 - the GCS did not answer: ask again
                continue
            if not alive:
                feed.close(f"the trainer ({trainer}) died")
                return
