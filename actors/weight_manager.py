"""WeightManagerActor: one per rank (GPU). Owns an engine and its DynamicWeightManager.

Each transaction phase is one remote method, called by the coordinator on every rank at once
(the join is the barrier). Status questions run in their own concurrency group, so they are
answered while a phase is running. The actor is restartable: Ray brings a dead rank back as
a fresh, empty process, and the coordinator sets it up and loads the committed version
before it serves again.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
from collections.abc import Callable, Sequence

import ray

from fd_ray_sync import cuda_ipc, gpus, shm
from fd_ray_sync.buckets import BucketMeta, plan_parts
from fd_ray_sync.comm import CommGroups, init_world
from fd_ray_sync.config import LoadConfig, ParallelConfig
from fd_ray_sync.engine.base import InferenceEngine
from fd_ray_sync.errors import PartialUpdateError, StateError, VersionError
from fd_ray_sync.log import get_logger
from fd_ray_sync.manager import DynamicWeightManager
from fd_ray_sync.manager_load import PreparedLoad
from fd_ray_sync.memwatch import AnonPeak, memory_now
from fd_ray_sync.messages import LoadReport, PrepareReport, TensorMeta
from fd_ray_sync.params import device_memory, param_dtype, param_shape, read_param
from fd_ray_sync.sleep import Tags, describe
from fd_ray_sync.sources import (
    RankContext,
    TransportSpec,
    VersionOnly,
    WeightSource,
    open_source,
)
from fd_ray_sync.status import KVCacheStatus, ModelWeightsStatus
from fd_ray_sync.tensors import contiguous, storage_dtype

EngineFactory = Callable[[ParallelConfig, CommGroups], InferenceEngine]


def _free_endpoint() -> str:
    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((ip, 0))
        return f"{ip}:{s.getsockname()[1]}"


@ray.remote(concurrency_groups={"status": 1})
class WeightManagerActor:
    def __init__(self, parallel: ParallelConfig, load: LoadConfig, engine_factory: list):
        """`engine_factory`: [the object ref of an `EngineFactory`], fetched only once the rank
        has chosen which GPUs it sees (Ray resolves a bare ref argument before `__init__`, and
        loading the factory imports its module, which may start CUDA: paddle does on import)."""
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        gpus.see_node_gpus()  # before CUDA starts in this process
        try:
            import paddle
        except ModuleNotFoundError as e:  # a torch engine's one-rank replicas run without it
            if e.name != "paddle":
                raise
        else:
            # Ray ends ranks with signals (shutdown, rebuilds); paddle's handler would print
            # a C++ "FatalError" trace for each, which reads like a crash.
            paddle.disable_signal_handler()
        self.parallel, self.load = parallel, load
        self._factory: EngineFactory = ray.get(engine_factory[0])
        self.rank = parallel.rank
        self.log = get_logger(__name__, self.rank)
        self.engine: InferenceEngine | None = None
        self.manager: DynamicWeightManager | None = None
        self.endpoint = _free_endpoint()
        self._fingerprint: str | None = None
        self._pending: TransportSpec | None = None
        self._prepared: tuple[TransportSpec, PreparedLoad] | None = None
        self.committed: TransportSpec | None = None
        self.committed_fingerprints: dict[int, str | None] = {}
        self._watch: AnonPeak | None = None
        self._export: list[list[str]] = []  # parameter names of each exported bucket
        self._stop = threading.Event()  # set by `interrupt`, asked by the engine

    # --- setup ---------------------------------------------------------------------------

    def get_endpoint(self) -> str:
        return self.endpoint

    def setup(self, endpoints: Sequence[str]) -> dict:
        """Join the replica's world and TP/EP groups, build the engine and its manager."""
        if self.manager is not None:
            raise StateError(f"rank {self.rank} is already set up (pid {os.getpid()})")
        init_world(self.parallel, endpoints)
        groups = CommGroups(self.parallel)
        groups.start()
        self.engine = self._factory(self.parallel, groups)
        self.manager = DynamicWeightManager(self.engine, self.load)
        node = ray.get_runtime_context().get_node_id()
        return {"rank": self.rank, "pid": os.getpid(), "node": node}

    def shard_plan(self) -> dict:
        return {n: s.model_dump() for n, s in self._engine().shard_plan().items()}

    def manifest(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Parameter name -> (full shape, dtype): what a mapped update must produce."""
        full = self._engine().full_shapes()
        return {
            n: (tuple(full.get(n, param_shape(p))), param_dtype(p))
            for n, p in self._manager().params.items()
        }

    def _engine(self) -> InferenceEngine:
        if self.engine is None:
            raise StateError(f"rank {self.rank} is not set up")
        return self.engine

    def _manager(self) -> DynamicWeightManager:
        if self.manager is None:
            raise StateError(f"rank {self.rank} is not set up")
        return self.manager

    # --- transaction phases --------------------------------------------------------------

    def pause(self) -> None:
        """Stop serving: drop requests and the KV/prefix cache, which the new weights would
        make stale (the load re-allocates it)."""
        engine = self._engine()
        engine.clear_requests()
        engine.free_kv_cache()

    def clear(self, shutdown_comm_groups: bool | None = None) -> float:
        return self._manager().clear_parameters(shutdown_comm_groups)

    def restart(self) -> float:
        m = self._manager()
        return m.restart_communication_group() + m.recreate_ep_buffer()

    def prepare(self, spec: TransportSpec, check_after_write: bool = False) -> PrepareReport:
        """Open `spec`'s source and check everything about it that can be known before
        writing; nothing changes and the rank keeps serving. The coordinator lets ranks
        write (`load`) only once every rank said yes here.

        With `check_after_write` (the coordinator can roll back), checksums are taken of the
        written bytes instead of reading the source twice (see DynamicWeightManager)."""
        self._discard()
        shm.sweep()  # segments of a trainer that died here (ipc) go before anything else
        cuda_ipc.sweep()  # and this rank's mappings of its device memory
        source = self._open(spec)
        try:
            try:
                recorded = source.version()
            except VersionError:
                if spec.version is None:
                    raise  # no version given, and the source names none
                recorded = None
            prepared = self._manager().prepare_load(
                source, spec.version or recorded, check_after_write, spec.partial
            )
        except BaseException:
            source.close()
            raise
        self._prepared = (spec, prepared)
        return PrepareReport(rank=self.rank, recorded_version=recorded, sync_s=prepared.sync_s)

    def load(self) -> LoadReport:
        """Write the source `prepare` checked. A failure before the first write leaves the
        weights as they were (the error as it is); after it, PartialUpdateError."""
        if self._prepared is None:
            raise StateError(f"rank {self.rank}: load without a prepared source")
        (spec, prepared), self._prepared = self._prepared, None
        try:
            report = self._manager().write_prepared(prepared)
        except PartialUpdateError:
            self._fingerprint = None
            raise
        self._manager().alloc_kv_cache()  # unless it sleeps
        self._fingerprint = None
        self._pending = prepared.source.received(spec).with_version(report.version)
        if prepared.partial:  # not the whole model: a restore needs a peer's copy of it
            self._pending = VersionOnly(report.version)
        return report

    def _discard(self) -> None:
        """Close a prepared source that will not be loaded (the update was refused)."""
        if self._prepared is not None:
            self._prepared[1].source.close()
            self._prepared = None

    def _open(self, spec: TransportSpec) -> WeightSource:
        node = ray.get_runtime_context().get_node_id()
        ctx = RankContext(self.rank, self.parallel, self.load, self._engine().shard_plan(), node)
        return open_source(spec, ctx)

    def verify(self, fingerprint: bool = True) -> dict:
        """Every parameter loaded; this rank's fingerprint (the whole model's slice) and,
        after a partial load, `written`: the fingerprint of only what it wrote (what the
        trainer computed)."""
        m = self._manager()
        m.verify_parameters("update")
        self._fingerprint = m.fingerprint() if fingerprint else None
        version = self._pending.version if self._pending else None
        written = m.written_fingerprint() if fingerprint else None
        return {
            "rank": self.rank,
            "version": version,
            "fingerprint": self._fingerprint,
            "written": written,
        }

    def commit(self, keep: bool = True, fingerprints: dict[int, str | None] | None = None) -> None:
        """Serve the loaded version. `fingerprints` (every rank's, as verified) are kept with
        it: a restarted coordinator checks restores against them."""
        self._manager().finalize_update()
        pending = self._pending
        if pending is not None and not keep:
            pending = pending.without_data()
        if pending is not None:
            self.committed, self.committed_fingerprints = pending, dict(fingerprints or {})
        self._pending = None

    def rollback(self) -> dict:
        """Undo a partial update on this rank: the tensors it overwrote get their committed
        values back (DynamicWeightManager.rollback), then serve as before. Returns this
        rank's fingerprint, for the coordinator to check against the committed one."""
        m = self._manager()
        self._discard()
        self._pending = None
        restored = m.rollback()
        m.alloc_kv_cache()  # unless it sleeps
        self._fingerprint = m.fingerprint()
        return {
            "rank": self.rank,
            "version": m.version,
            "fingerprint": self._fingerprint,
            "restored": restored,
        }

    def resume(self) -> None:
        """Serve again after an update that changed nothing on this rank."""
        m = self._manager()
        self._discard()
        shm.sweep()  # an update aborted because its trainer died: its shared memory goes
        cuda_ipc.sweep()
        self._pending = None
        if m.status == ModelWeightsStatus.UPDATING:
            m.finalize_update()
        if m.kv_cache_status != KVCacheStatus.NORMAL:
            m.alloc_kv_cache()  # unless it sleeps

    def export_layout(self, version: str) -> tuple[BucketMeta, ...]:
        """How `export_bucket` groups this rank's parameters (names, local shapes, dtypes;
        no data read), for a peer replica's restore (`fd_ray_sync.sources.peer`): only
        while serving `version`."""
        m = self._manager()
        if m.status != ModelWeightsStatus.NORMAL or m.version != version:
            raise StateError(
                f"rank {self.rank} cannot export version {version}: weights {m.status.name}, "
                f"version {m.version}"
            )
        sizes = {
            n: math.prod(param_shape(p)) * storage_dtype(param_dtype(p)).itemsize
            for n, p in m.params.items()
        }
        self._export = []
        metas = []
        for i, names in enumerate(plan_parts(sizes, self.load.bucket_bytes)):
            self._export.append(names)
            tensors = tuple(
                TensorMeta(
                    name=n,
                    shape=param_shape(m.params[n]),
                    dtype=param_dtype(m.params[n]),
                    nbytes=sizes[n],
                )
                for n in names
            )
            metas.append(BucketMeta(index=i, tensors=tensors))
        return tuple(metas)

    def export_bucket(self, version: str, index: int) -> list:
        """Bucket `index` of the layout: its parameters' values. Returned, not put, so the
        caller owns the object (it outlives this process, which a restore may rebuild)."""
        m = self._manager()
        if m.version != version:
            raise StateError(f"rank {self.rank} holds version {m.version}, not {version}")
        return [contiguous(read_param(m.params[n])) for n in self._export[index]]

    # --- sleep ---------------------------------------------------------------------------

    def sleep(self, level: int = 1, tags: Tags = None) -> dict:
        """Free this rank's weights (kept in host memory at level 1, discarded at 2) and/or
        KV cache (see DynamicWeightManager.sleep)."""
        m = self._manager()
        seconds = m.sleep(level, tags)
        if m.version is None:
            self._fingerprint = None  # discarded
        return {"rank": self.rank, "asleep": m.asleep, "seconds": seconds}

    def wake_up(self, tags: Tags = None) -> dict:
        """Bring back what sleeps among `tags` (see DynamicWeightManager.wake_up)."""
        m = self._manager()
        seconds = m.wake_up(tags)
        return {"rank": self.rank, "asleep": m.asleep, "seconds": seconds}

    # --- serving -------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> dict:
        m = self._manager()
        if m.asleep:
            raise StateError(f"rank {self.rank} is {describe(m.asleep)}")
        if m.status != ModelWeightsStatus.NORMAL or m.version is None:
            raise StateError(
                f"rank {self.rank} is not serving: weights {m.status.name}, version {m.version}"
            )
        self._stop.clear()  # an interrupt meant for an earlier call
        texts = self._engine().generate(list(prompts), max_new_tokens, self._stop.is_set)
        return {"texts": texts, "version": m.version, "rank": self.rank}

    @ray.method(concurrency_group="status")
    def interrupt(self) -> None:
        """End the running `generate` early (its answer is dropped by the front): the
        replica's ranks stop together at the next token (see InferenceEngine.generate)."""
        self._stop.set()

    @ray.method(concurrency_group="status")
    def status(self) -> dict:
        m = self.manager
        return {
            "rank": self.rank,
            "tp_rank": self.parallel.tp_rank,
            "replica": self.parallel.dp_rank,
            "set_up": m is not None,
            "weights": m.status.name if m else None,
            "kv_cache": m.kv_cache_status.name if m else None,
            "asleep": m.asleep if m else {},
            "version": m.version if m else None,
            "committed": self.committed.version if self.committed else None,
            "fingerprint": self._fingerprint,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],  # Ray's ids of this rank's GPU
            "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    @ray.method(concurrency_group="status")
    def committed_state(self) -> tuple[TransportSpec | None, dict[int, str | None]]:
        """The committed version's source and every rank's fingerprint of it."""
        return self.committed, self.committed_fingerprints

    @ray.method(concurrency_group="status")
    def incarnation(self) -> int | None:
        """This process's pid once it is set up (None before): the coordinator tells a rank
        it set up from a dead or replaced one by it."""
        return os.getpid() if self.manager is not None else None

    @ray.method(concurrency_group="status")
    def hold_after_writes(self, count: int, marker: str) -> None:
        """Fault-test hook: in the next load, after `count` parameters are written, create
        the file `marker` and hang there (a test then kills this process mid-write)."""
        written = 0

        def hold(name: str) -> None:
            nonlocal written
            written += 1
            if written == count:
                with open(marker, "w") as f:
                    f.write(name)
                threading.Event().wait()

        self._manager().on_write = hold

    @ray.method(concurrency_group="status")
    def fail_after_writes(self, count: int) -> None:
        """Fault-test hook: the next load fails (OSError) right after its `count`-th parameter
        write, this process alive (a rollback test)."""
        written = 0

        def fail(name: str) -> None:
            nonlocal written
            written += 1
            if written == count:
                self._manager().on_write = None
                raise OSError(f"fault injected after writing {name}")

        self._manager().on_write = fail

    @ray.method(concurrency_group="status")
    def memory(self) -> dict:
        """This process's memory in bytes (see fd_ray_sync.memwatch.memory_now)."""
        return memory_now()

    @ray.method(concurrency_group="status")
    def device_memory(self) -> dict[str, float]:
        """The device allocator's figures (GiB) for this rank's parameters; empty on CPU."""
        return device_memory(self._manager().params.values())

    @ray.method(concurrency_group="status")
    def watch_memory(self) -> None:
        """Start sampling this process's private memory (for benchmarks)."""
        self._watch = AnonPeak()

    @ray.method(concurrency_group="status")
    def peak_extra_memory(self) -> int:
        """Peak growth of private memory since `watch_memory()` (bytes)."""
        if self._watch is None:
            raise StateError(f"rank {self.rank}: watch_memory() was not called")
        return self._watch.stop()
