"""WeightManagerActor: one per rank (GPU). Owns an engine and its DynamicWeightManager.

Each transaction phase is one remote method, called by the coordinator on every rank at once
(the join is the barrier). Status questions run in their own concurrency group, so they are
answered while a phase is running.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence

import ray

from fd_ray_sync.buckets import BucketMeta
from fd_ray_sync.comm import CommGroups, init_world
from fd_ray_sync.config import LoadConfig, ParallelConfig
from fd_ray_sync.engine.base import InferenceEngine
from fd_ray_sync.errors import REFUSED_BEFORE_WRITE, StateError
from fd_ray_sync.log import get_logger
from fd_ray_sync.manager import DynamicWeightManager
from fd_ray_sync.messages import LoadReport
from fd_ray_sync.sources.object_store import ObjectStoreSource
from fd_ray_sync.sources.snapshot import SnapshotSource
from fd_ray_sync.status import ModelWeightsStatus

EngineFactory = Callable[[ParallelConfig, CommGroups], InferenceEngine]


def _free_endpoint() -> str:
    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((ip, 0))
        return f"{ip}:{s.getsockname()[1]}"


@ray.remote(concurrency_groups={"status": 1})
class WeightManagerActor:
    def __init__(self, parallel: ParallelConfig, load: LoadConfig, engine_factory: EngineFactory):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        self.parallel, self.load, self._factory = parallel, load, engine_factory
        self.rank = parallel.rank
        self.log = get_logger(__name__, self.rank)
        self.engine: InferenceEngine | None = None
        self.manager: DynamicWeightManager | None = None
        self.endpoint = _free_endpoint()
        self._fingerprint: str | None = None
        self._pending_version: str | None = None

    # --- setup ---------------------------------------------------------------------------

    def get_endpoint(self) -> str:
        return self.endpoint

    def setup(self, endpoints: Sequence[str]) -> dict:
        """Join the world and the TP/EP groups, build the engine and its manager."""
        init_world(self.parallel, endpoints)
        groups = CommGroups(self.parallel)
        groups.start()
        self.engine = self._factory(self.parallel, groups)
        self.manager = DynamicWeightManager(self.engine, self.load)
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
        }

    def shard_plan(self) -> dict:
        return {n: s.model_dump() for n, s in self._engine().shard_plan().items()}

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
        """Stop serving: drop requests and caches (nothing is queued between remote calls)."""
        self._engine().clear_requests()

    def clear(self, shutdown_comm_groups: bool | None = None) -> float:
        return self._manager().clear_parameters(shutdown_comm_groups)

    def restart(self) -> float:
        m = self._manager()
        return m.restart_communication_group() + m.recreate_ep_buffer()

    def load_buckets(self, metas: Sequence[BucketMeta], refs: list, version: str) -> LoadReport:
        source = ObjectStoreSource(metas, refs, self._engine().shard_plan(), version)
        return self._load(source, version)

    def load_snapshot(self, folder: str, version: str | None) -> LoadReport:
        source = SnapshotSource.from_config(self.load, self.parallel, folder)
        return self._load(source, version)

    def _load(self, source, version: str | None) -> LoadReport:
        try:
            report = self._manager().update_parameters(source, version)
        except REFUSED_BEFORE_WRITE:
            raise  # nothing was written: the weights and their fingerprint still stand
        except Exception:
            self._fingerprint = None
            raise
        self._fingerprint = None
        self._pending_version = report.version
        return report

    def verify(self) -> dict:
        m = self._manager()
        m.verify_parameters("update")
        self._fingerprint = m.fingerprint()
        return {
            "rank": self.rank,
            "version": self._pending_version,
            "fingerprint": self._fingerprint,
        }

    def commit(self) -> None:
        self._manager().finalize_update()

    def resume(self) -> None:
        """Serve again after an update that changed nothing (refused before any write)."""
        m = self._manager()
        if m.status == ModelWeightsStatus.UPDATING:
            m.finalize_update()

    # --- serving -------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> dict:
        m = self._manager()
        if m.status != ModelWeightsStatus.NORMAL or m.version is None:
            raise StateError(
                f"rank {self.rank} is not serving: weights {m.status.name}, version {m.version}"
            )
        texts = self._engine().generate(list(prompts), max_new_tokens)
        return {"texts": texts, "version": m.version, "rank": self.rank}

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
            "version": m.version if m else None,
            "fingerprint": self._fingerprint,
            "pid": os.getpid(),
        }
