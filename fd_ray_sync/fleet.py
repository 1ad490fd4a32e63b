"""The driver API: launch or connect to a fleet, push weights, generate, inspect.

    fleet = Fleet.launch(FleetConfig(tp=2, dp=1))
    report = fleet.update(model.state_dict(), version=step)     # paddle, torch or numpy
    results = fleet.generate(["Hello"], max_new_tokens=16)     # each carries its version

`Fleet` is the trainer's handle: `update` picks the transport, whose trainer side packs and
sends the weights while the coordinator runs the all-or-nothing transaction on every rank.
The object store's (buckets `ray.put`, the trainer's one copy) and the fed update every
transport shares live in `fd_ray_sync.push`; the direct transports' (ipc, collective) in
`fd_ray_sync.push_direct`. Both keep their state on this handle.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ray

from fd_ray_sync import push, push_direct
from fd_ray_sync.buckets import BucketMeta, iter_buckets
from fd_ray_sync.collective import TrainerEnd
from fd_ray_sync.comm import CommGroups
from fd_ray_sync.config import FEED_THREADS, FleetConfig, ParallelConfig
from fd_ray_sync.errors import ConfigError, StateError
from fd_ray_sync.ipc import BucketRing, Registration
from fd_ray_sync.log import get_logger
from fd_ray_sync.mapping import CheckedMappings, WeightMapping
from fd_ray_sync.messages import GenerationResult, TensorMeta, UpdateReport
from fd_ray_sync.push import announce, get
from fd_ray_sync.routing import Router
from fd_ray_sync.sharding import ShardPlan, ShardSpec
from fd_ray_sync.shards import ShardSet, check_sets
from fd_ray_sync.sleep import sleep_level, sleep_tags
from fd_ray_sync.sources.sharded import ShardedSpec
from fd_ray_sync.sources.snapshot import SnapshotSpec
from fd_ray_sync.version import validate_version

log = get_logger(__name__)


def reference_engine(model: str, parallel: ParallelConfig, groups: CommGroups):
    """The default engine factory: the reference LM preset `model`, zero-initialized."""
    from fd_ray_sync.engine.reference import ReferenceEngine
    from fd_ray_sync.engine.spec import preset

    return ReferenceEngine(preset(model), parallel, groups)


class Fleet:
    """A handle on a running fleet (its named CoordinatorActor)."""

    def __init__(self, coordinator: Any, config: FleetConfig):
        self.coordinator = coordinator
        self.config = config
        self._plans: dict[int, dict[str, ShardSpec]] | None = None
        self._held: list[list] = []  # bucket refs of the committed (and an unsure) version
        self._ring: BucketRing | None = None  # the ipc or collective transport's, once used
        self._retired: BucketRing | None = None  # a replaced device ring (push_direct.retire)
        self._end: TrainerEnd | None = None  # the collective transport's group, once used
        self._mappings = CheckedMappings(lambda: get(self.coordinator.manifest.remote()))

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
            started = get(coordinator.start.remote())
        except Exception:
            try:  # the ranks and placement group are detached: take them down too
                ray.get(coordinator.shutdown.remote(), timeout=60)
            finally:
                ray.kill(coordinator)
            raise
        # use_gpu=None is decided by the placement (the cluster's GPUs): the trainer's side
        # needs the answer (a GPU fleet fed CUDA tensors shares a device ring).
        return cls(coordinator, config.model_copy(update={"use_gpu": started["use_gpu"]}))

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
            return push_direct.update_registered(
                self, weights, version, force, verify_fingerprints, partial
            )
        load = self.config.load
        tp_plans = self._tp_plans(load.verify_checksum or verify_fingerprints)
        if load.load_strategy == "ipc":
            return push_direct.update_ring(
                self, dict(weights), version, force, tp_plans, verify_fingerprints, partial
            )
        if load.load_strategy == "collective":
            return push_direct.update_collective(
                self, dict(weights), version, force, tp_plans, verify_fingerprints, partial
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
            announced = announce(weights)
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
        return push.push_buckets(
            self, buckets, version, announced, force, verify_fingerprints, partial
        )

    # --- the co-located (ipc) transport --------------------------------------------------

    def register(self, weights: Any) -> Registration:
        """Register the trainer's own tensors as the ranks' source (ipc, registered storage):
        `weights` lives in shared memory (`fd_ray_sync.ipc.share`), as a mapping or a torch
        module holding it. Pass the result to `update` each step; register again after the
        trainer reallocates a tensor (`update` refuses, naming it, until then)."""
        return Registration(weights)

    # --- sharded trainers, snapshots, scaling and memory ---------------------------------

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
        return get(self.coordinator.update.remote(spec, force))

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
        return get(self.coordinator.update.remote(spec, force))

    def scale(self, dp: int) -> dict:
        """Grow or shrink the fleet to `dp` replicas while the others keep serving; a new
        replica loads the committed version from a serving one (the trainer is not needed)."""
        out = get(self.coordinator.scale.remote(dp))
        self.config = self.config.model_copy(update={"dp": dp})
        self._plans = None
        return out

    def clear(self, mode: str | None = None) -> None:
        """Free every rank's weights and KV cache; serving stops until the next update
        (requests in flight drained as `mode` says; default FleetConfig.pause_mode)."""
        get(self.coordinator.clear.remote(mode))

    def sleep(self, level: int = 1, tags: str | Sequence[str] | None = None) -> dict:
        """Free the fleet's memory for a while; it stops serving until `wake_up`.

        `tags`: "weights" and/or "kv_cache" (a list, or comma separated; None: both). Level 1
        keeps each rank's weights in its host memory (pinned on GPU), so `wake_up` serves the
        same version again without the trainer; level 2 discards them: the next update loads
        them (sleep(2), update, wake_up(["kv_cache"])). While weights sleep at level 1 an
        update is refused. Returns {"asleep": tag -> level, "seconds": ...}."""
        return get(self.coordinator.sleep.remote(sleep_level(level), sleep_tags(tags)))

    def wake_up(self, tags: str | Sequence[str] | None = None) -> dict:
        """Bring back what sleeps among `tags` (None: both); once nothing sleeps the fleet
        serves again (after a level-2 sleep: once updated)."""
        return get(self.coordinator.wake_up.remote(sleep_tags(tags)))

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
        return get(self.coordinator.pause_serving.remote(mode))

    def resume(self) -> dict:
        return get(self.coordinator.resume_serving.remote())

    def is_paused(self) -> bool:
        return get(self.coordinator.is_paused.remote())

    def status(self) -> dict:
        return get(self.coordinator.status.remote())

    def shard_plans(self) -> dict[int, dict[str, ShardSpec]]:
        """Rank -> its shard plan (one per TP rank would do; replicas repeat them)."""
        if self._plans is None:
            raw = get(self.coordinator.shard_plans.remote())
            self._plans = {
                r: {n: ShardSpec(**s) for n, s in plan.items()} for r, plan in raw.items()
            }
        return self._plans

    def placement_groups(self) -> list:
        """Each replica's placement group: bundle i holds TP rank i (one node per replica; on
        GPU fleets one whole GPU per bundle). With `gpus_per_rank` below 1, place a trainer
        actor in a rank's bundle (`PlacementGroupSchedulingStrategy(pg, i)`, `num_gpus` at
        most the rest) to put it on that rank's GPU, for the ipc transport."""
        return get(self.coordinator.placement_groups.remote())

    def shutdown(self) -> None:
        """Stop the ranks and the coordinator."""
        get(self.coordinator.shutdown.remote())
        ray.kill(self.coordinator)
        self._held = []  # the committed buckets this driver kept alive go with the fleet
        for ring in (self._ring, self._retired):
            if ring is not None:
                ring.close()
        self._ring = self._retired = None
        if self._end is not None:
            self._end.close()
            self._end = None


def _ensure_ray(address: str | None, namespace: str) -> None:
    if not ray.is_initialized():
        ray.init(address=address, namespace=namespace)
