"""The driver API: launch or connect to a fleet, push weights, generate, inspect.

    fleet = Fleet.launch(FleetConfig(tp=2, dp=1))
    report = fleet.update(model.state_dict(), version=step)     # paddle, torch or numpy
    results = fleet.generate(["Hello"], max_new_tokens=16)     # each carries its version

`Fleet` is the trainer side of the object-store transfer: it packs the weights into buckets,
`ray.put`s them (the trainer's one copy), and hands the refs to the coordinator, which runs
the all-or-nothing transaction on every rank.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import ray

from fd_ray_sync.buckets import BucketMeta, iter_buckets, local_checksum
from fd_ray_sync.checksum import combine_digests, tensor_digest
from fd_ray_sync.collective import TrainerEnd, chain_order
from fd_ray_sync.comm import CommGroups
from fd_ray_sync.config import FEED_THREADS, FleetConfig, ParallelConfig
from fd_ray_sync.errors import ConfigError, StateError, WeightSyncError
from fd_ray_sync.ipc import BucketRing, Registration, aligned
from fd_ray_sync.log import get_logger
from fd_ray_sync.mapping import CheckedMappings, WeightMapping
from fd_ray_sync.messages import GenerationResult, TensorMeta, UpdateReport
from fd_ray_sync.ray_stats import ProcessRef, local_store_room
from fd_ray_sync.routing import Router
from fd_ray_sync.sharding import REPLICATED, ShardPlan, ShardSpec, local_shape_of
from fd_ray_sync.shards import ShardSet, check_sets
from fd_ray_sync.sleep import sleep_level, sleep_tags
from fd_ray_sync.sources import TransportSpec
from fd_ray_sync.sources.collective import SLOTS, CollectiveSpec, extent
from fd_ray_sync.sources.ipc import IpcRingSpec, IpcStorageSpec
from fd_ray_sync.sources.object_store import StreamSpec
from fd_ray_sync.sources.sharded import ShardedSpec
from fd_ray_sync.sources.snapshot import SnapshotSpec
from fd_ray_sync.tensors import shape_and_dtype, storage_dtype
from fd_ray_sync.version import validate_version

log = get_logger(__name__)


def reference_engine(model: str, parallel: ParallelConfig, groups: CommGroups):
    """The default engine factory: the reference LM preset `model`, zero-initialized."""
    from fd_ray_sync.engine.model import preset
    from fd_ray_sync.engine.reference import ReferenceEngine

    return ReferenceEngine(preset(model), parallel, groups)


class Fleet:
    """A handle on a running fleet (its named CoordinatorActor)."""

    def __init__(self, coordinator: Any, config: FleetConfig):
        self.coordinator = coordinator
        self.config = config
        self._plans: dict[int, dict[str, ShardSpec]] | None = None
        self._held: list[list] = []  # bucket refs of the committed (and an unsure) version
        self._ring: BucketRing | None = None  # the ipc or collective transport's, once used
        self._end: TrainerEnd | None = None  # the collective transport's group, once used
        self._mappings = CheckedMappings(lambda: _get(self.coordinator.manifest.remote()))

    @classmethod
    def launch(
        cls, config: FleetConfig | None = None, engine_factory=None, address: str | None = None
    ) -> Fleet:
        """Start the coordinator and `dp * tp` rank actors (joins or starts a Ray cluster)."""
        from actors.coordinator import CoordinatorActor

        config = config or FleetConfig()
        _ensure_ray(address, config.namespace)
        factory = engine_factory or functools.partial(reference_engine, config.model)
        coordinator = CoordinatorActor.options(
            name=config.name,
            namespace=config.namespace,
            lifetime="detached" if config.detached else None,
        ).remote(config, factory)
        try:
            _get(coordinator.start.remote())
        except Exception:
            try:  # the ranks and placement group are detached: take them down too
                ray.get(coordinator.shutdown.remote(), timeout=60)
            finally:
                ray.kill(coordinator)
            raise
        return cls(coordinator, config)

    @classmethod
    def connect(
        cls, name: str = "fd-ray-sync", namespace: str = "fd_ray_sync", address: str | None = None
    ) -> Fleet:
        """Attach to a fleet launched elsewhere (e.g. a detached one) by its name."""
        _ensure_ray(address, namespace)
        try:
            coordinator = ray.get_actor(name, namespace=namespace)
        except ValueError:
            raise StateError(f"no fleet named {name!r} in namespace {namespace!r}") from None
        status = ray.get(coordinator.status.remote())
        config = FleetConfig(
            name=name,
            namespace=namespace,
            tp=status["tp"],
            dp=status["dp"],
            keep_committed=status["keep_committed"],
            **status["trainer"],
        )
        return cls(coordinator, config)

    # --- updates -------------------------------------------------------------------------

    def update(
        self,
        weights: Mapping[str, Any] | Iterable[tuple[str, Any]] | Registration,
        version: str | int,
        force: bool = False,
        verify_fingerprints: bool = True,
        mapping: WeightMapping | None = None,
        partial: bool = False,
    ) -> UpdateReport:
        """Push full (unsharded) weights to every rank; returns when committed or raises.

        `weights` is a mapping or an iterator of `(name, tensor)` (paddle, torch or numpy),
        or storage registered with `register()`. The transport is
        `FleetConfig.load.load_strategy`:

        - "object_store": a mapping is pipelined (`FleetConfig.pipelined`): its names,
          shapes and dtypes are announced first (ranks check them before writing anything),
          then ranks write each bucket while the next ones are packed and put, at most
          `FleetConfig.buckets_in_flight` ahead. An iterator is packed and put in full first
          (only one bucket of references is held while packing), then checked whole by the
          ranks before they write.
        - "ipc" (the trainer on the ranks' node): buckets are packed into a ring of
          `buckets_in_flight` shared-memory slots allocated once, ranks copy out of one
          while the next is packed; a `Registration` is read by the ranks in place.

        With `verify_fingerprints`, each rank's weights must match the fingerprint computed
        here for its slice.

        With `mapping` (`fd_ray_sync.mapping`), `weights` have the trainer's names and
        layouts: they are checked against the engine's (once per fleet handle and source
        manifest) before anything moves, then mapped one tensor at a time as they are packed.
        Every parameter must be there (the update is refused, naming the missing ones),
        unless `partial`: then `weights` may be a subset (the layers that changed, LoRA
        adapters) and the others keep their committed values; the fleet's fingerprints and
        version cover the whole model afterwards, and a failure puts back exactly the
        tensors it overwrote (see docs/design-notes.md, "Partial updates and LoRA").
        """
        if mapping is not None:
            weights = self._mappings.mapped(weights, mapping)
        if isinstance(weights, Registration):
            return self._update_registered(weights, version, force, verify_fingerprints, partial)
        load = self.config.load
        tp_plans = self._tp_plans(load.verify_checksum or verify_fingerprints)
        if load.load_strategy == "ipc":
            return self._update_ring(
                dict(weights), version, force, tp_plans, verify_fingerprints, partial
            )
        if load.load_strategy == "collective":
            return self._update_collective(
                dict(weights), version, force, tp_plans, verify_fingerprints, partial
            )
        if load.load_strategy != "object_store":
            raise ConfigError(
                f"Fleet.update pushes weights over 'object_store', 'ipc' or 'collective', not "
                f"{load.load_strategy!r} (snapshots: update_from_snapshot)"
            )
        announced = None
        # Each rank of a pipelined update waits for its next bucket in a coordinator thread.
        world = self.config.tp * self.config.dp
        if isinstance(weights, Mapping) and self.config.pipelined and world <= FEED_THREADS - 4:
            announced = _announce(weights)
        buckets = iter_buckets(weights, load.bucket_bytes, tp_plans is not None, tp_plans)
        return self.push_buckets(buckets, version, announced, force, verify_fingerprints, partial)

    def _tp_plans(self, checked: bool) -> list[ShardPlan] | None:
        """One shard plan per TP rank: checksums are of each rank's slice, so a rank checks
        only the bytes it takes, and the same checksums give each rank's expected
        fingerprint (replicas share them)."""
        if not checked:
            return None
        plans = self.shard_plans()
        return [plans[r] for r in range(self.config.tp)]

    def push_buckets(
        self,
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
                feed=self.coordinator,
                uid=uid,
                keep=self.config.keep_committed,
            )
        ahead = self.config.buckets_in_flight if announced is not None else None
        refs: list = []

        def feed(expect: _Expected) -> int:
            fed, count, waiting = [], 0, None
            room = _StoreRoom()
            for meta, arrays in buckets:
                if waiting is not None:  # asked for before this bucket was packed
                    _get(waiting)
                room.wait_for(meta.nbytes)
                expect.add(meta)
                ref = ray.put(arrays)
                del arrays
                if self.config.keep_committed:
                    refs.append(ref)
                fed.append(self.coordinator.feed_bucket.remote(uid, meta, [ref]))
                del ref
                count += 1
                # Backpressure: the next bucket is put once every rank has written the one
                # `ahead` places before it (at most `ahead` buckets in flight).
                waiting = None
                if ahead is not None and count >= ahead:
                    waiting = self.coordinator.feed_wait.remote(uid, count - ahead)
            for call in [waiting, *fed] if waiting is not None else fed:
                _get(call)
            return count

        try:
            report = self._feed_update(
                uid, spec, version, force, verify_fingerprints, feed, partial
            )
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            # The coordinator died mid-update: this version may have been committed. Keep
            # its buckets alive with the last committed ones until an update is confirmed.
            self._held = [*self._held[-1:], refs]
            raise
        # This driver owns the buckets: holding the committed version's refs keeps them
        # (the rollback and recovery copy) alive even if every rank holding them dies.
        self._held = [refs] if self.config.keep_committed else []
        return report

    def _feed_update(
        self,
        uid: str,
        spec: TransportSpec | None,
        version: str,
        force: bool,
        verify_fingerprints: bool,
        feed: Callable[[_Expected], int],
        partial: bool = False,
    ) -> UpdateReport:
        """Run one fed update: the coordinator's transaction starts, `feed(expect)` hands it
        every bucket (returning how many), then the end and each rank's fingerprint."""
        expect = _Expected(self.shard_plans() if verify_fingerprints else {}, self.config.tp)
        update = self.coordinator.update_stream.remote(
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
            _get(self.coordinator.feed_end.remote(uid, count, expect.fingerprints()))
        except StateError:
            _get(update)  # the feed was closed because the update failed: raise why
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            raise
        except BaseException as e:  # packing failed here: abort the update on every rank
            with contextlib.suppress(Exception):
                ray.get(self.coordinator.feed_close.remote(uid, f"{type(e).__name__}: {e}"))
                ray.get(update)
            raise
        return _get(update)

    # --- the co-located (ipc) transport --------------------------------------------------

    def register(self, weights: Any) -> Registration:
        """Register the trainer's own tensors as the ranks' source (ipc, registered storage):
        `weights` lives in shared memory (`fd_ray_sync.ipc.share`), as a mapping or a torch
        module holding it. Pass the result to `update` each step; register again after the
        trainer reallocates a tensor (`update` refuses, naming it, until then)."""
        return Registration(weights)

    def _update_registered(
        self,
        registration: Registration,
        version: str | int,
        force: bool,
        verify: bool,
        partial: bool = False,
    ) -> UpdateReport:
        """Ranks copy straight from the registered tensors. Checks: the trainer hashes each
        rank's slices while the ranks copy (and hash what they wrote); the verify phase
        compares the two as fingerprints, so the trainer's read overlaps the ranks'."""
        version = validate_version(version)
        tensors = registration.tensors()  # where each tensor is; refuses reallocated ones
        spec = IpcStorageSpec(
            version,
            tensors=tuple(tensors),
            segments=tuple(registration.segment_of(t.name) for t in tensors),
            chunk_bytes=self.config.load.bucket_bytes,
        )
        checked = verify or self.config.load.verify_checksum
        tp_plans = self._tp_plans(checked)

        def feed(expect: _Expected) -> int:
            if checked:
                expect.add(BucketMeta(index=0, tensors=tuple(registration.tensors(tp_plans))))
            return 0

        self._held = []
        return self._feed_update(uuid.uuid4().hex, spec, version, force, checked, feed, partial)

    def _update_ring(
        self,
        weights: dict[str, Any],
        version: str | int,
        force: bool,
        tp_plans: list[ShardPlan] | None,
        verify: bool,
        partial: bool = False,
    ) -> UpdateReport:
        version = validate_version(version)
        ring = self._ring_for(weights)
        parts = ring.plan(weights)
        uid = uuid.uuid4().hex
        spec = IpcRingSpec(
            version,
            announced=tuple(_announce(weights)),
            feed=self.coordinator,
            uid=uid,
            keep=False,
            slots=ring.names,
        )

        def feed(expect: _Expected) -> int:
            fed = []
            for i, names in enumerate(parts):
                if i >= len(ring):  # the slot's last bucket must be written by every rank
                    _get(self.coordinator.feed_wait.remote(uid, i - len(ring)))
                meta = ring.pack(i, [(n, weights[n]) for n in names], tp_plans)
                expect.add(meta)
                fed.append(self.coordinator.feed_bucket.remote(uid, meta, [i % len(ring)]))
            for call in fed:
                _get(call)
            return len(parts)

        self._held = []
        return self._feed_update(uid, spec, version, force, verify, feed, partial)

    def _ring_for(self, weights: Mapping[str, Any], shared: bool = True) -> BucketRing:
        """This trainer's ring, allocated on first use and kept; grown (new segments, which
        ranks attach once more) when a tensor does not fit a slot. `shared`: in segments
        the ranks attach (ipc); else private memory the collective transport sends from."""
        largest = max(
            (aligned(math.prod(s) * storage_dtype(d).itemsize) for s, d in _shapes(weights)),
            default=0,
        )
        want = max(self.config.load.bucket_bytes, largest)
        slots = self.config.buckets_in_flight if shared else SLOTS
        ring = self._ring
        if (
            ring is None
            or ring.slot_bytes < want
            or len(ring) != slots
            or bool(ring.segments) != shared
        ):
            if ring is not None:
                ring.close()
            self._ring = ring = BucketRing(slots, want, shared)
        return ring

    # --- the collective transport --------------------------------------------------------

    def _update_collective(
        self,
        weights: dict[str, Any],
        version: str | int,
        force: bool,
        tp_plans: list[ShardPlan] | None,
        verify: bool,
        partial: bool = False,
    ) -> UpdateReport:
        """Broadcast buckets along the weight-sync group's chain (`fd_ray_sync.collective`):
        two private slots, bucket i+1 packed (and hashed) while bucket i is sent."""
        import torch

        version = validate_version(version)
        world = self.config.tp * self.config.dp
        if world > FEED_THREADS - 4:  # each rank waits for its next bucket in a feed thread
            raise ConfigError(
                f"the collective transport serves at most {FEED_THREADS - 4} ranks for now "
                f"(the coordinator's feed threads); this fleet has {world}"
            )
        ring = self._ring_for(weights, shared=False)
        parts = ring.plan(weights)
        end = self._trainer_end()
        # Lost ranks are rebuilt first: the group is formed with the processes that load.
        members = _get(self.coordinator.sync_members.remote())
        nodes = {int(r): node for r, (node, _) in members.items()}
        pids = {int(r): pid for r, (_, pid) in members.items()}
        info = end.prepare(chain_order(nodes, ray.get_runtime_context().get_node_id()), pids)
        uid = uuid.uuid4().hex
        spec = CollectiveSpec(
            version,
            announced=tuple(_announce(weights)),
            feed=self.coordinator,
            uid=uid,
            keep=False,
            group=info,
            slot_bytes=ring.slot_bytes,
        )
        closed = functools.partial(_get_now, self.coordinator.feed_closed, uid)

        def feed(expect: _Expected) -> int:
            group = end.joined(closed)
            slots = [torch.from_numpy(slot) for slot in ring.slots]
            # NCCL sends device memory: each packed slot is copied to the trainer's GPU.
            wire = slots if group.device == "cpu" else group.buffers(len(slots), ring.slot_bytes)
            sending: list[list] = [[] for _ in slots]
            fed = []
            for i, names in enumerate(parts):
                k = i % len(slots)
                group.wait_sent(sending[k], closed)  # the slot's last bucket is on its way
                meta = ring.pack(i, [(n, weights[n]) for n in names], tp_plans)
                expect.add(meta)
                fed.append(self.coordinator.feed_bucket.remote(uid, meta, [k]))
                n = extent(meta)
                if wire is not slots:
                    wire[k][:n].copy_(slots[k][:n])
                sending[k] = group.send(wire[k], n, i)
            for works in sending:
                group.wait_sent(works, closed)
            for call in fed:
                _get(call)
            return len(parts)

        self._held = []
        try:
            return self._feed_update(uid, spec, version, force, verify, feed, partial)
        except BaseException:
            end.failed()
            raise

    def _trainer_end(self) -> TrainerEnd:
        if self._end is None:
            self._end = TrainerEnd(
                ray.util.get_node_ip_address(),
                "nccl" if self.config.use_gpu else "gloo",
                # Inside the phase timeout: a rank waiting on a stalled peer says which one
                # before the coordinator gives up on the phase.
                0.8 * self.config.phase_timeout_s,
            )
        return self._end

    def update_shards(
        self,
        sets: Sequence[ShardSet | ray.ObjectRef],
        version: str | int,
        force: bool = False,
        partial: bool = False,
    ) -> UpdateReport:
        """One update from several sharded trainers: each put its own pieces of each
        parameter (`fd_ray_sync.shards.put_shards`, in its own process) and `sets` holds
        what each returned (or the refs of their calls). The pieces are checked here (each
        parameter covered exactly once, one shape and dtype) before any rank sees them;
        every rank assembles its slice from the pieces that overlap it. No process holds
        the whole model, this one included (it sees only where the pieces are).
        `partial`: the pieces may cover a subset of the parameters (see `update`)."""
        version = validate_version(version)
        sets = [ray.get(s) if isinstance(s, ray.ObjectRef) else s for s in sets]
        check_sets(sets)
        spec = ShardedSpec(
            version,
            sets=tuple(sets),
            chunk_bytes=self.config.load.bucket_bytes,
            partial=partial,
        )
        self._held = []
        return _get(self.coordinator.update.remote(spec, force))

    def update_from_snapshot(
        self,
        path: str | os.PathLike,
        version: str | int | None = None,
        force: bool = False,
        partial: bool = False,
    ) -> UpdateReport:
        """Every rank loads its own files from `path` (a folder all nodes can read);
        `partial`: the files may hold a subset of the parameters (see `update`)."""
        version = validate_version(version) if version is not None else None
        folder = os.fspath(os.path.abspath(path))
        spec = SnapshotSpec(version, folder=folder, partial=partial)
        return _get(self.coordinator.update.remote(spec, force))

    def scale(self, dp: int) -> dict:
        """Grow or shrink the fleet to `dp` replicas while the others keep serving; a new
        replica loads the committed version from a serving one (the trainer is not needed)."""
        out = _get(self.coordinator.scale.remote(dp))
        self.config = self.config.model_copy(update={"dp": dp})
        self._plans = None
        return out

    def clear(self, mode: str | None = None) -> None:
        """Free every rank's weights and KV cache; serving stops until the next update
        (requests in flight drained as `mode` says; default FleetConfig.pause_mode)."""
        _get(self.coordinator.clear.remote(mode))

    def sleep(self, level: int = 1, tags: str | Sequence[str] | None = None) -> dict:
        """Free the fleet's memory for a while; it stops serving until `wake_up`.

        `tags`: "weights" and/or "kv_cache" (a list, or comma separated; None: both). Level 1
        keeps each rank's weights in its host memory (pinned on GPU), so `wake_up` serves the
        same version again without the trainer; level 2 discards them: the next update loads
        them (sleep(2), update, wake_up(["kv_cache"])). While weights sleep at level 1 an
        update is refused. Returns {"asleep": tag -> level, "seconds": ...}."""
        return _get(self.coordinator.sleep.remote(sleep_level(level), sleep_tags(tags)))

    def wake_up(self, tags: str | Sequence[str] | None = None) -> dict:
        """Bring back what sleeps among `tags` (None: both); once nothing sleeps the fleet
        serves again (after a level-2 sleep: once updated)."""
        return _get(self.coordinator.wake_up.remote(sleep_tags(tags)))

    # --- serving and status --------------------------------------------------------------

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int = 32, replica: int | None = None
    ) -> list[GenerationResult]:
        """Run `prompts` on one replica (the next in turn, or `replica`), straight through
        its front: every result carries the one committed version that produced it. While
        an update or a pause closes every gate, the request waits for it to end."""
        return self.router.generate(prompts, max_new_tokens, replica)

    @functools.cached_property
    def router(self) -> Router:
        return Router(self.coordinator, self.config.name, self.config.phase_timeout_s)

    def pause(self, mode: str = "wait") -> dict:
        """Stop serving until `resume` (FastDeploy's /v1/pause): requests wait at each
        replica's gate; `mode` says what happens to those in flight (abort, wait, keep; see
        FleetConfig.pause_mode). Updates still run while paused."""
        return _get(self.coordinator.pause_serving.remote(mode))

    def resume(self) -> dict:
        return _get(self.coordinator.resume_serving.remote())

    def is_paused(self) -> bool:
        return _get(self.coordinator.is_paused.remote())

    def status(self) -> dict:
        return _get(self.coordinator.status.remote())

    def shard_plans(self) -> dict[int, dict[str, ShardSpec]]:
        """Rank -> its shard plan (one per TP rank would do; replicas repeat them)."""
        if self._plans is None:
            raw = _get(self.coordinator.shard_plans.remote())
            self._plans = {
                r: {n: ShardSpec(**s) for n, s in plan.items()} for r, plan in raw.items()
            }
        return self._plans

    def shutdown(self) -> None:
        """Stop the ranks and the coordinator."""
        _get(self.coordinator.shutdown.remote())
        ray.kill(self.coordinator)
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._end is not None:
            self._end.close()
            self._end = None


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


class _Expected:
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


def _announce(weights: Mapping[str, Any]) -> list[TensorMeta]:
    return [TensorMeta(name=n, shape=s, dtype=d) for n, (s, d) in zip(weights, _shapes(weights))]


def _shapes(weights: Mapping[str, Any]) -> list[tuple[tuple[int, ...], str]]:
    return [shape_and_dtype(t) for t in weights.values()]


def _get(ref):
    """`ray.get`, raising an fd-ray-sync error from the coordinator as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, WeightSyncError):
            raise e.cause from None
        raise


def _get_now(method, *args, timeout: float = 10.0):
    """One quick call's answer (a poll while waiting on something else)."""
    return ray.get(method.remote(*args), timeout=timeout)


def _ensure_ray(address: str | None, namespace: str) -> None:
    if not ray.is_initialized():
        ray.init(address=address, namespace=namespace)
