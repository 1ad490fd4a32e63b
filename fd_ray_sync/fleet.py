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
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ray

from fd_ray_sync.buckets import BucketMeta, iter_buckets, local_checksum
from fd_ray_sync.checksum import combine_digests, tensor_digest
from fd_ray_sync.comm import CommGroups
from fd_ray_sync.config import FEED_THREADS, FleetConfig, ParallelConfig
from fd_ray_sync.errors import StateError, WeightSyncError
from fd_ray_sync.log import get_logger
from fd_ray_sync.messages import GenerationResult, TensorMeta, UpdateReport
from fd_ray_sync.ray_stats import ProcessRef, local_store_room
from fd_ray_sync.sharding import REPLICATED, ShardSpec, local_shape_of
from fd_ray_sync.sources.object_store import StreamSpec
from fd_ray_sync.sources.snapshot import SnapshotSpec
from fd_ray_sync.tensors import shape_and_dtype
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
        weights: Mapping[str, Any] | Iterable[tuple[str, Any]],
        version: str | int,
        force: bool = False,
        verify_fingerprints: bool = True,
    ) -> UpdateReport:
        """Push full (unsharded) weights to every rank; returns when committed or raises.

        `weights` is a mapping or an iterator of `(name, tensor)` (paddle, torch or numpy).
        A mapping is pipelined (`FleetConfig.pipelined`): its names, shapes and dtypes are
        announced first (ranks check them before writing anything), then ranks write each
        bucket while the next ones are packed and put, at most
        `FleetConfig.buckets_in_flight` ahead. An iterator is packed and put in full first
        (only one bucket of references is held while packing), then checked whole by the
        ranks before they write. With `verify_fingerprints`, each rank's weights must match
        the fingerprint computed here for its slice.
        """
        load = self.config.load
        # Checksums are of each TP rank's slice: a rank checks only the bytes it takes, and
        # the same checksums give each rank's expected fingerprint (replicas share them).
        checked = load.verify_checksum or verify_fingerprints
        plans = self.shard_plans() if checked else {}
        tp_plans = [plans[r] for r in range(self.config.tp)] if checked else None
        announced = None
        # Each rank of a pipelined update waits for its next bucket in a coordinator thread.
        world = self.config.tp * self.config.dp
        if isinstance(weights, Mapping) and self.config.pipelined and world <= FEED_THREADS - 4:
            announced = []
            for name, tensor in weights.items():
                shape, dtype = shape_and_dtype(tensor)
                announced.append(TensorMeta(name=name, shape=shape, dtype=dtype))
        buckets = iter_buckets(weights, load.bucket_bytes, checked, tp_plans)
        return self.push_buckets(buckets, version, announced, force, verify_fingerprints)

    def push_buckets(
        self,
        buckets: Iterable[tuple[BucketMeta, list]],
        version: str | int,
        announced: Sequence[TensorMeta] | None = None,
        force: bool = False,
        verify_fingerprints: bool = True,
    ) -> UpdateReport:
        """`update` from ready-made buckets (`fd_ray_sync.buckets.iter_buckets` output):
        each is `ray.put` and fed to the fleet in order; `announced` pipelines them."""
        version = validate_version(version)
        plans = self.shard_plans() if verify_fingerprints else {}
        tp = self.config.tp
        digests: dict[int, list[tuple[str, int]]] = {r: [] for r in range(tp)}
        uid = uuid.uuid4().hex
        ahead = self.config.buckets_in_flight if announced is not None else None
        spec = None
        if announced is not None:
            spec = StreamSpec(
                version,
                announced=tuple(announced),
                feed=self.coordinator,
                uid=uid,
                keep=self.config.keep_committed,
            )
        update = self.coordinator.update_stream.remote(
            uid,
            spec,
            version,
            force,
            ray.get_runtime_context().get_node_id(),  # ranks elsewhere relay (FleetConfig.relay)
            ProcessRef.here(),  # watched while the update runs: its death aborts it at once
        )
        refs, fed, count, waiting = [], [], 0, None
        room = _StoreRoom()
        try:
            for meta, arrays in buckets:
                if waiting is not None:  # asked for before this bucket was packed
                    _get(waiting)
                room.wait_for(meta.nbytes)
                if verify_fingerprints:
                    for t in meta.tensors:
                        for r in range(tp):
                            spec = plans[r].get(t.name, REPLICATED)
                            checksum = local_checksum(t, spec)
                            shape = local_shape_of(t.name, spec, t.shape)
                            digest = tensor_digest(t.name, t.dtype, shape, checksum)
                            digests[r].append((t.name, digest))
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
            expected = None
            if verify_fingerprints:
                by_tp = {r: combine_digests(d) for r, d in digests.items()}
                expected = {r: by_tp[r % tp] for r in plans}
            _get(self.coordinator.feed_end.remote(uid, count, expected))
        except StateError:
            _get(update)  # the feed was closed because the update failed: raise why
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            self._held = [*self._held[-1:], refs]
            raise
        except BaseException as e:  # packing failed here: abort the update on every rank
            with contextlib.suppress(Exception):
                ray.get(self.coordinator.feed_close.remote(uid, f"{type(e).__name__}: {e}"))
                ray.get(update)
            raise
        try:
            report = _get(update)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            # The coordinator died mid-update: this version may have been committed. Keep
            # its buckets alive with the last committed ones until an update is confirmed.
            self._held = [*self._held[-1:], refs]
            raise
        # This driver owns the buckets: holding the committed version's refs keeps them
        # (the rollback and recovery copy) alive even if every rank holding them dies.
        self._held = [refs] if self.config.keep_committed else []
        return report

    def update_from_snapshot(
        self, path: str | os.PathLike, version: str | int | None = None, force: bool = False
    ) -> UpdateReport:
        """Every rank loads its own files from `path` (a folder all nodes can read)."""
        version = validate_version(version) if version is not None else None
        folder = os.fspath(os.path.abspath(path))
        return _get(self.coordinator.update.remote(SnapshotSpec(version, folder=folder), force))

    def clear(self) -> None:
        _get(self.coordinator.clear.remote())

    # --- serving and status --------------------------------------------------------------

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int = 32, replica: int | None = None
    ) -> list[GenerationResult]:
        return _get(self.coordinator.generate.remote(list(prompts), max_new_tokens, replica))

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


def _get(ref):
    """`ray.get`, raising an fd-ray-sync error from the coordinator as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, WeightSyncError):
            raise e.cause from None
        raise


def _ensure_ray(address: str | None, namespace: str) -> None:
    if not ray.is_initialized():
        ray.init(address=address, namespace=namespace)
