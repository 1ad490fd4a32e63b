"""The trainer side of a fed update, and of the object-store transport.

Every transport that feeds buckets one by one (object store, ipc ring, registered storage,
collective) runs the same fed update (`feed_update`): the coordinator's transaction starts,
the transport's `feed(expect)` hands it each bucket's metadata (and sends the bytes its own
way), and `Expected` turns the slice checksums of what was sent into each rank's expected
fingerprint. The object store's feed is `push_buckets`: each bucket is `ray.put` (the
trainer's one copy) once the node's store has room for it (`_StoreRoom`), and the refs go to
the coordinator, at most `buckets_in_flight` ahead of the slowest rank when pipelined.

These functions are `Fleet`'s (`fd_ray_sync.fleet`), split out to keep it short: they take
the handle and keep its transport state on it (`_held`, the committed version's refs).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ray

from fd_ray_sync.buckets import BucketMeta, local_checksum
from fd_ray_sync.checksum import combine_digests, tensor_digest
from fd_ray_sync.errors import StateError, WeightSyncError
from fd_ray_sync.messages import TensorMeta, UpdateReport
from fd_ray_sync.ray_stats import ProcessRef, local_store_room
from fd_ray_sync.sharding import REPLICATED, ShardPlan, local_shape_of
from fd_ray_sync.sources import TransportSpec
from fd_ray_sync.sources.object_store import StreamSpec
from fd_ray_sync.tensors import shape_and_dtype
from fd_ray_sync.version import validate_version

if TYPE_CHECKING:
    from fd_ray_sync.fleet import Fleet


def push_buckets(
    fleet: Fleet,
    buckets: Iterable[tuple[BucketMeta, list]],
    version: str | int,
    announced: Sequence[TensorMeta] | None = None,
    force: bool = False,
    verify_fingerprints: bool = True,
    partial: bool = False,
) -> UpdateReport:
    """`update` from ready-made buckets (`fd_ray_sync.buckets.iter_buckets` output):
    each is `ray.put` and fed to the fleet in order; `announced` pipelines them."""
    version = validate_version(version)
    uid = uuid.uuid4().hex
    spec = None
    if announced is not None:
        spec = StreamSpec(
            version,
            announced=tuple(announced),
            feed=fleet.coordinator,
            uid=uid,
            keep=fleet.config.keep_committed,
        )
    ahead = fleet.config.buckets_in_flight if announced is not None else None
    refs: list = []

    def feed(expect: Expected) -> int:
        fed, count, waiting = [], 0, None
        room = _StoreRoom()
        for meta, arrays in buckets:
            if waiting is not None:  # asked for before this bucket was packed
                get(waiting)
            room.wait_for(meta.nbytes)
            expect.add(meta)
            ref = ray.put(arrays)
            del arrays
            if fleet.config.keep_committed:
                refs.append(ref)
            fed.append(fleet.coordinator.feed_bucket.remote(uid, meta, [ref]))
            del ref
            count += 1
            # Backpressure: the next bucket is put once every rank has written the one
            # `ahead` places before it (at most `ahead` buckets in flight).
            waiting = None
            if ahead is not None and count >= ahead:
                waiting = fleet.coordinator.feed_wait.remote(uid, count - ahead)
        for call in [waiting, *fed] if waiting is not None else fed:
            get(call)
        return count

    try:
        report = feed_update(fleet, uid, spec, version, force, verify_fingerprints, feed, partial)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
        # The coordinator died mid-update: this version may have been committed. Keep
        # its buckets alive with the last committed ones until an update is confirmed.
        fleet._held = [*fleet._held[-1:], refs]
        raise
    except BaseException:
        refs.clear()  # a failed version's buckets go now, whoever still holds this frame
        raise
    # This driver owns the buckets: holding the committed version's refs keeps them
    # (the rollback and recovery copy) alive even if every rank holding them dies.
    fleet._held = [refs] if fleet.config.keep_committed else []
    return report


def feed_update(
    fleet: Fleet,
    uid: str,
    spec: TransportSpec | None,
    version: str,
    force: bool,
    verify_fingerprints: bool,
    feed: Callable[[Expected], int],
    partial: bool = False,
) -> UpdateReport:
    """Run one fed update: the coordinator's transaction starts, `feed(expect)` hands it
    every bucket (returning how many), then the end and each rank's fingerprint."""
    expect = Expected(fleet.shard_plans() if verify_fingerprints else {}, fleet.config.tp)
    update = fleet.coordinator.update_stream.remote(
        uid,
        spec,
        version,
        force,
        ray.get_runtime_context().get_node_id(),  # ranks elsewhere relay (FleetConfig.relay)
        ProcessRef.here(),  # watched while the update runs: its death aborts it at once
        partial,
    )
    try:
        count = feed(expect)
        get(fleet.coordinator.feed_end.remote(uid, count, expect.fingerprints()))
    except StateError:
        get(update)  # the feed was closed because the update failed: raise why
        raise
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
        raise
    except BaseException as e:  # packing failed here: abort the update on every rank
        with contextlib.suppress(Exception):
            ray.get(fleet.coordinator.feed_close.remote(uid, f"{type(e).__name__}: {e}"))
            ray.get(update)
        raise
    return get(update)


class _StoreRoom:
    """Waits, before a put, until this node's object store has room for it.

    Ray frees the buckets of a superseded version asynchronously (about a second after the
    commit that drops them, measured); putting the next version before they are gone
    spills to disk (seconds per GiB). One query per update while the known room lasts;
    after `STORE_WAIT_S` in one update it stops waiting and lets Ray spill.
    """

    STORE_WAIT_S = 10.0

    def __init__(self):
        self.deadline = time.monotonic() + self.STORE_WAIT_S
        self.room: int | None = None

    def wait_for(self, nbytes: int) -> None:
        while self.room is None or self.room < nbytes:
            self.room = local_store_room()
            if self.room >= nbytes or time.monotonic() >= self.deadline:
                break
            time.sleep(0.02)
        self.room -= nbytes


class Expected:
    """Each rank's expected fingerprint, from the slice checksums of the buckets sent."""

    def __init__(self, plans: Mapping[int, ShardPlan], tp: int):
        self.plans, self.tp = plans, tp
        self.digests: dict[int, list[tuple[str, int]]] = {r: [] for r in range(tp)}

    def add(self, meta: BucketMeta) -> None:
        if not self.plans:
            return
        for t in meta.tensors:
            for r in range(self.tp):
                spec = self.plans[r].get(t.name, REPLICATED)
                shape = local_shape_of(t.name, spec, t.shape)
                checksum = local_checksum(t, spec)
                self.digests[r].append((t.name, tensor_digest(t.name, t.dtype, shape, checksum)))

    def fingerprints(self) -> dict[int, str] | None:
        if not self.plans:
            return None
        by_tp = {r: combine_digests(d) for r, d in self.digests.items()}
        return {r: by_tp[r % self.tp] for r in self.plans}


def announce(weights: Mapping[str, Any]) -> list[TensorMeta]:
    return [TensorMeta(name=n, shape=s, dtype=d) for n, (s, d) in zip(weights, shapes(weights))]


def shapes(weights: Mapping[str, Any]) -> list[tuple[tuple[int, ...], str]]:
    return [shape_and_dtype(t) for t in weights.values()]


def get(ref):
    """`ray.get`, raising an fd-ray-sync error from the coordinator as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        # Ray's frames hold the error they raise in a reference cycle through its traceback,
        # and those frames hold their callers' (bucket refs in an update's locals): without
        # the traceback, nothing outlives the error's handlers until a garbage collection.
        e.__traceback__ = None
        cause = e.cause if isinstance(e.cause, WeightSyncError) else e
    try:
        raise cause from None
    finally:
        del cause  # this frame, in the error's traceback, must not hold the error


def get_now(method, *args, timeout: float = 10.0):
    """One quick call's answer (a poll while waiting on something else)."""
    return ray.get(method.remote(*args), timeout=timeout)
