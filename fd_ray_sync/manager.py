"""DynamicWeightManager: one rank's weights, cleared, restarted, reloaded and verified.

The behaviours of FastDeploy's `fastdeploy/rl/dynamic_weight_manager.py`, made safe: every
name, shape, dtype and checksum is checked before the first byte is written, nothing is ever
unpickled, and failures raise one small hierarchy (`fd_ray_sync.errors`). Status lives in
this object (read over Ray by the coordinator) instead of a shared-memory flag that workers
poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fd_ray_sync.checksum import (
    combine_digests,
    tensor_digest,
)
from fd_ray_sync.config import LoadConfig
from fd_ray_sync.engine.base import InferenceEngine
from fd_ray_sync.errors import (
    StateError,
    VerificationError,
)
from fd_ray_sync.log import get_logger
from fd_ray_sync.manager_load import RankLoad, Undo
from fd_ray_sync.manager_sleep import RankSleep
from fd_ray_sync.memwatch import memory_now
from fd_ray_sync.messages import LoadReport
from fd_ray_sync.params import (
    clear_param,
    device_memory,
    empty_device_cache,
    is_initialized,
    model_parameters,
    param_digests,
    param_dtype,
    param_shape,
)
from fd_ray_sync.sources.base import WeightSource
from fd_ray_sync.sources.memory import StateDictSource
from fd_ray_sync.status import WEIGHT_TRANSITIONS, KVCacheStatus, ModelWeightsStatus
from fd_ray_sync.version import read_version_file


class DynamicWeightManager(RankLoad, RankSleep):
    """Owns the parameters of one rank's engine (one or several models)."""

    def __init__(self, engine: InferenceEngine, load: LoadConfig):
        self.engine = engine
        self.load = load
        self.parallel = engine.parallel
        self.groups = engine.groups
        self.rank = self.parallel.rank
        self.log = get_logger(__name__, self.rank)
        self.first_load = True
        self.version: str | None = None
        self._status = ModelWeightsStatus.NORMAL
        self.params: dict[str, Any] = self._capture(engine.models())
        # Checksums of the parameters' bytes as the last load wrote them (see load_weights).
        self._checksums: dict[str, int] = {}
        # Called with each parameter's name right after it is written (fault tests hold a
        # rank mid-write with it, then kill it).
        self.on_write: Callable[[str], None] | None = None
        # Sleep (see fd_ray_sync.sleep): tag -> level of what sleeps; for weights asleep at
        # level 1, their host copies and (fingerprint, checksums) from before sleeping.
        self._asleep: dict[str, int] = {}
        self._host: dict[str, Any] = {}
        self._slept: tuple[str, dict[str, int]] | None = None
        # A partial load's undo: the committed values of the parameters it overwrote (only
        # those), kept until the update commits or `rollback` puts them back.
        self._undo: Undo | None = None

    # --- state ---------------------------------------------------------------------------

    @property
    def status(self) -> ModelWeightsStatus:
        return self._status

    @property
    def kv_cache_status(self) -> KVCacheStatus:
        return self.engine.kv_cache_status

    def _set_status(self, new: ModelWeightsStatus) -> None:
        if new != self._status and new not in WEIGHT_TRANSITIONS[self._status]:
            raise StateError(
                f"rank {self.rank}: weight status cannot go from {self._status.name} to {new.name}"
            )
        self._status = new

    def _capture(self, models: Iterable[Any]) -> dict[str, Any]:
        """Every model's parameters (and persistent buffers) by state-dict name: paddle
        Layers and torch Modules alike."""
        params: dict[str, Any] = {}
        for model in models:
            for name, param in model_parameters(model).items():
                if name in params:
                    raise StateError(f"parameter {name!r} is owned by two of the engine's models")
                params[name] = param
                self.log.debug(
                    "captured %s shape=%s dtype=%s", name, param_shape(param), param_dtype(param)
                )
        if not params:
            raise StateError(f"rank {self.rank}: the engine's models have no parameters")
        return params

    def _timed(self, what: str, fn, *args) -> float:
        start = time.perf_counter()
        fn(*args)
        seconds = time.perf_counter() - start
        self.log.info("%s in %.3fs", what, seconds)
        return seconds

    # --- clear ---------------------------------------------------------------------------

    def clear_parameters(self, shutdown_comm_groups: bool | None = None) -> float:
        """Drop requests and KV cache, release the EP buffer, free every parameter's storage,
        verify, then barrier (and optionally shut the TP/EP groups down). Returns seconds."""
        if shutdown_comm_groups is None:
            shutdown_comm_groups = self.parallel.shutdown_comm_groups_on_clear
        if self._asleep.get("weights") == 1:  # a clear discards: the host copy goes too
            self._drop_host_copy()
        if self._status == ModelWeightsStatus.CLEARED:
            return 0.0
        start = time.perf_counter()
        self._set_status(ModelWeightsStatus.CLEARING)
        self.engine.clear_requests()
        self.engine.free_kv_cache()
        if self.parallel.enable_expert_parallel:
            self.engine.clear_ep_buffer()
            self.groups.barrier("ep")
        self._clear_storage()
        self.verify_parameters("clearance")
        self.groups.barrier("tp")
        self.groups.barrier("ep")
        if shutdown_comm_groups:
            self.groups.shutdown()
        self._set_status(ModelWeightsStatus.CLEARED)
        empty_device_cache(self.params.values())
        seconds = time.perf_counter() - start
        self.log.info("cleared parameters in %.3fs", seconds)
        return seconds

    def _clear_storage(self) -> None:
        self._checksums, self._undo = {}, None
        for param in self.params.values():
            clear_param(param)

    def clear_model_weight(self) -> float:
        """Free every parameter's storage (no barriers)."""
        return self._timed("cleared model weight", self._clear_storage)

    def clear_ep_buffer(self) -> float:
        """Release the engine's expert-parallel buffer."""
        return self._timed("cleared EP buffer", self.engine.clear_ep_buffer)

    def clear_communication_group(self) -> float:
        """Barrier over, then shut down, the EP and TP groups."""

        def run():
            self.groups.barrier("ep")
            self.groups.barrier("tp")
            self.groups.shutdown()

        return self._timed("cleared communication groups", run)

    # --- restart -------------------------------------------------------------------------

    def restart_communication_group(self) -> float:
        """Bring the TP/EP groups back (skipped on the first load, as in FastDeploy)."""
        if self.first_load:
            return 0.0
        return self._timed("restarted communication groups", self.groups.restart)

    def recreate_ep_buffer(self) -> float:
        """Allocate the EP buffer again and barrier over EP (skipped on the first load)."""
        if self.first_load or not self.parallel.enable_expert_parallel:
            return 0.0

        def run():
            self.engine.recreate_ep_buffer()
            self.groups.barrier("ep")

        return self._timed("recreated EP buffer", run)

    # --- load ----------------------------------------------------------------------------

    def update_parameters(
        self, source: WeightSource, version: str | None = None, check_after_write: bool = False
    ) -> LoadReport:
        """Restart groups and the EP buffer (not on the first load), load `source`, and
        re-allocate the KV cache. `finalize_update()` then verifies and commits."""
        self.restart_communication_group()
        self.recreate_ep_buffer()
        report = self.load_weights(source, version, check_after_write)
        self.alloc_kv_cache()
        return report

    def alloc_kv_cache(self) -> None:
        """Allocate the KV cache after a load, unless it sleeps (only `wake_up` brings a
        sleeping one back: sleep(2), update, wake_up(["kv_cache"]) keeps it out of the way of
        the load, as RLHF loops do)."""
        if "kv_cache" not in self._asleep:
            self.engine.alloc_kv_cache()

    def reload_model_weights(self, source: WeightSource, version: str | None = None) -> LoadReport:
        """Only the weight load step of `update_parameters`."""
        return self.load_weights(source, version)

    def update_from_state_dict(
        self,
        tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
        version: str,
        checksums: Mapping[str, int] | None = None,
    ) -> LoadReport:
        """Load a mapping or a stream of `(name, tensor)` pairs already cut to this rank."""
        return self.load_weights(StateDictSource(tensors, checksums), version)

    def read_model_version_from_file(self) -> str:
        """`step` of `<model_dir>/version.yaml` (bootstrap loads take their version from it)."""
        if self.load.model_dir is None:
            raise StateError("LoadConfig.model_dir is not set: no version.yaml to read")
        return read_version_file(self.load.model_dir)

    # --- verify / finalize ---------------------------------------------------------------

    def verify_parameters(self, operation: str) -> None:
        """After "update" every parameter holds storage; after "clearance" none does."""
        if operation not in ("update", "clearance"):
            raise ValueError(f"unknown operation {operation!r}; known: 'update', 'clearance'")
        expected = operation == "update"
        wrong = sorted(n for n, p in self.params.items() if is_initialized(p) != expected)
        if wrong:
            state = "uninitialized" if expected else "still holding storage"
            raise VerificationError(
                f"rank {self.rank}: after {operation}, {len(wrong)} parameter(s) {state}: "
                + ", ".join(wrong[:5])
            )
        self.log.debug("parameter %s verified", operation)

    def finalize_update(self) -> None:
        """Verify every parameter is loaded, barrier over TP and EP, and go NORMAL (a
        partial load's undo copies go: the new values are the committed ones now)."""
        self.verify_parameters("update")
        self.groups.barrier("tp")
        self.groups.barrier("ep")
        self._set_status(ModelWeightsStatus.NORMAL)
        self.first_load = False
        self._undo = None

    def fingerprint(self) -> str:
        """A digest of this rank's parameters (names, dtypes, shapes and bytes).

        Right after a load checked after writing, the checksums taken of the written bytes
        are reused instead of reading every parameter again.
        """
        uninitialized = [n for n, p in self.params.items() if not is_initialized(p)]
        if uninitialized:
            raise StateError(
                f"rank {self.rank}: cannot fingerprint cleared parameters ({uninitialized[0]}...)"
            )
        sums = self._checksums
        if sums.keys() != self.params.keys():  # device parameters are hashed on the device
            sums = dict(zip(self.params, param_digests(list(self.params.values()))))
        return combine_digests(
            (n, tensor_digest(n, param_dtype(p), param_shape(p), sums[n]))
            for n, p in self.params.items()
        )

    def memory_stats(self) -> dict[str, float]:
        """Host memory of this process, and the device allocator's figures where there is one
        (the allocator of the parameters' framework)."""
        host = memory_now()
        stats = {"max_rss_gb": host["peak_rss"] / 1e9, "rss_anon_gb": host["rss_anon"] / 1e9}
        stats.update(device_memory(self.params.values()))
        return stats
