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
from dataclasses import dataclass
from typing import Any

import numpy as np

from fd_ray_sync.checksum import (
    combine_digests,
    copy_and_digest,
    digest,
    fingerprint,
    tensor_digest,
)
from fd_ray_sync.config import LoadConfig
from fd_ray_sync.engine.base import InferenceEngine
from fd_ray_sync.errors import (
    ChecksumError,
    PartialUpdateError,
    StateError,
    VerificationError,
    WeightMismatchError,
)
from fd_ray_sync.log import get_logger
from fd_ray_sync.manager_sleep import RankSleep
from fd_ray_sync.memwatch import memory_now
from fd_ray_sync.messages import LoadReport, TensorMeta
from fd_ray_sync.params import (
    clear_param,
    device_memory,
    empty_device_cache,
    host_view,
    is_initialized,
    model_parameters,
    param_dtype,
    param_shape,
    param_strides,
    read_param,
    write_param,
)
from fd_ray_sync.sources.base import Chunk, WeightSource
from fd_ray_sync.sources.memory import StateDictSource
from fd_ray_sync.status import WEIGHT_TRANSITIONS, KVCacheStatus, ModelWeightsStatus
from fd_ray_sync.tensors import all_finite, as_storage, element_strides
from fd_ray_sync.version import read_version_file, validate_version


class DynamicWeightManager(RankSleep):
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
        self._undo: _Undo | None = None

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

    def load_weights(
        self, source: WeightSource, version: str | None = None, check_after_write: bool = False
    ) -> LoadReport:
        """`prepare_load` then `write_prepared`: check everything, then write it."""
        return self.write_prepared(self.prepare_load(source, version, check_after_write))

    def prepare_load(
        self,
        source: WeightSource,
        version: str | None = None,
        check_after_write: bool = False,
        partial: bool = False,
    ) -> PreparedLoad:
        """Check everything `source` will deliver, changing nothing (the rank keeps serving).

        Every name the model has must be present with the right shape and dtype, and no
        other name; every checksum must match and (when on) every value be finite. Without
        `version`, the source's own (version.yaml) is used. The fleet runs this on every
        rank first and writes only once every rank said yes.

        `partial`: the source may carry a subset of the parameters (the layers that changed,
        an adapter); the others keep the values they hold, which must be loaded ones. Unknown
        names are refused all the same. The write keeps the old values of what it overwrites
        (`rollback`).

        `check_after_write` moves the checksum check into the write: each parameter's bytes
        are hashed once, block by block as they land (CPU parameters; device parameters right
        after the write), instead of reading the source twice. Only for callers that can roll
        back (the fleet keeps the committed version): a mismatch then raises
        PartialUpdateError, the weights being already half new.
        """
        if self._asleep.get("weights") == 1:
            raise StateError(
                f"rank {self.rank}: the weights sleep in host memory (level 1); call wake_up() "
                "before updating (an update would drop them), or sleep(level=2) to discard them"
            )
        start = time.perf_counter()
        version = validate_version(version) if version is not None else source.version()
        streaming = source.streaming
        manifest = source.manifest()
        wanted = self._check_manifest(manifest, source.name, partial)
        expected = {n: manifest[n].checksum for n in wanted}
        # Checksums that only fit the whole tensor (a rank holding a slice) are checked
        # before writing; a source whose checksums come after the load (the trainer's
        # fingerprint) is hashed as it lands all the same, for that fingerprint.
        check_after_write &= self.load.verify_checksum and (
            streaming or source.deferred_checksums or None not in expected.values()
        )
        # A streaming source's data is not there yet: its chunks are checked one by one.
        if self.load.verify_checksum and not check_after_write and not streaming:
            source.verify()
        if self.load.check_finite and not streaming:
            self._check_finite(source.chunks(), wanted)
        return PreparedLoad(
            source,
            version,
            wanted,
            expected,
            check_after_write,
            time.perf_counter() - start,
            partial,
        )

    def write_prepared(self, prepared: PreparedLoad) -> LoadReport:
        """Write a prepared source into the parameters (status UPDATING meanwhile).

        A failure before the first parameter was touched re-raises as it is, the old weights
        (and status) standing; after it, PartialUpdateError: this rank holds mixed weights.
        A partial load first copies each parameter it overwrites (`rollback` puts them back).
        """
        source, wanted, expected = prepared.source, prepared.wanted, prepared.expected
        check_after_write, streaming = prepared.check_after_write, source.streaming
        start = time.perf_counter()
        previous = self._status
        self._set_status(ModelWeightsStatus.UPDATING)
        # The checksums of what a partial load leaves alone still hold (a later fingerprint
        # reuses them); a full load replaces every one.
        kept = {n: c for n, c in self._checksums.items() if n not in wanted}
        self._undo = None
        if prepared.partial:
            self._undo = _Undo(self.version, dict(self._checksums), {})
        undo = self._undo.tensors if self._undo is not None else None
        self._checksums = {}
        sums: dict[str, int] = {}
        touched = written = nbytes = 0
        try:
            for label, chunk in source.chunks():
                if streaming:
                    if self.load.verify_checksum and not check_after_write:
                        self._check_checksums(label, chunk, source)
                    if self.load.check_finite:
                        self._check_finite([(label, chunk)], wanted)
                for name, (array, dtype) in chunk.items():
                    if name not in wanted:  # sources check this; a new one might not
                        raise WeightMismatchError(f"{label}: {name!r} was not in the manifest")
                    param = self.params[name]
                    if is_initialized(param) and _layout(element_strides(array)) != _layout(
                        param_strides(param)
                    ):
                        self.log.warning(
                            "%s: source strides %s lay memory out differently from the "
                            "parameter's %s (copied element by element)",
                            name,
                            element_strides(array),
                            list(param_strides(param)),
                        )
                    touched += 1
                    if undo is not None and name not in undo:
                        undo[name] = np.array(read_param(param), copy=True)
                    view = host_view(param) if check_after_write else None
                    if view is not None and view.flags.c_contiguous:  # hashed while copied
                        got = copy_and_digest(view, as_storage(array, dtype))
                    else:
                        write_param(param, array, dtype)
                        if check_after_write:  # a device (or cleared) parameter: read back
                            got = digest(read_param(param))
                    written += 1
                    if self.on_write is not None:
                        self.on_write(name)
                    nbytes += array.nbytes
                    if check_after_write:
                        want = expected[name] if not streaming else source.checksum(name)
                        if want is not None and got != want:
                            raise ChecksumError(
                                f"{label}: parameter {name!r} does not match its checksum"
                            )
                        sums[name] = got
                self.log.debug("wrote %s", label)
        except Exception as e:
            if not touched:
                self._status = previous  # nothing was written: the old weights still stand
                raise
            raise PartialUpdateError(
                f"rank {self.rank}: {source.name} update failed after writing {written} of "
                f"{len(wanted)} parameters: {type(e).__name__}: {e}"
            ) from e
        finally:
            source.close()  # files and mappings go, whatever happened
        self._checksums = {**kept, **sums} if prepared.partial else sums
        self._asleep.pop("weights", None)  # discarded at level 2: the update brought them back
        empty_device_cache(self.params.values())  # blocks freed where a load reallocated
        update_s = time.perf_counter() - start
        self.version = prepared.version
        report = LoadReport(
            rank=self.rank,
            version=prepared.version,
            source=source.name,
            sync_s=prepared.sync_s,
            update_s=update_s,
            total_s=prepared.sync_s + update_s,
            nbytes=nbytes,
            params_updated=written,
        )
        self.log.info(
            "loaded %d/%d parameters (%.1f MB) from %s, version %s, in %.3fs",
            written,
            len(self.params),
            nbytes / 1e6,
            source.name,
            prepared.version,
            report.total_s,
        )
        return report

    def _check_manifest(
        self, manifest: Mapping[str, TensorMeta], src: str, partial: bool = False
    ) -> set[str]:
        """The names to write; raises WeightMismatchError naming every bad parameter.

        A name the model lacks is refused too: writing the rest would commit weights that
        are not what the trainer meant to send (a renamed or misspelled parameter). A name
        the source lacks is refused unless the update is `partial`, and then only when the
        parameter holds nothing to keep (cleared, or discarded by a level-2 sleep).
        """
        if not manifest:
            raise WeightMismatchError(f"no parameter found in the {src} source")
        problems = []
        wanted = set()
        unknown = sorted(set(manifest) - set(self.params))
        if unknown:
            problems.append(f"not in the model: {_some(unknown)}")
        for name, meta in manifest.items():
            param = self.params.get(name)
            if param is None:
                continue
            if meta.dtype != param_dtype(param):
                problems.append(f"{name}: dtype {meta.dtype}, model has {param_dtype(param)}")
            elif tuple(meta.shape) != param_shape(param):
                problems.append(
                    f"{name}: shape {tuple(meta.shape)}, model has {param_shape(param)}"
                )
            wanted.add(name)
        missing = sorted(set(self.params) - set(manifest))
        if partial:
            empty = [n for n in missing if not is_initialized(self.params[n])]
            if empty:
                problems.append(
                    f"a partial update keeps the other parameters, but these hold nothing "
                    f"(cleared): {_some(empty)}"
                )
        elif missing:
            problems.append(f"missing from the update: {_some(missing)}")
        if problems:
            more = f"; and {len(problems) - 8} more" if problems[8:] else ""
            raise WeightMismatchError(
                f"rank {self.rank}: {src} update does not fit the model: "
                + "; ".join(problems[:8])
                + more
            )
        return wanted

    def _check_finite(self, chunks: Iterable[tuple[str, Chunk]], wanted: set[str]) -> None:
        for label, chunk in chunks:
            for name, (array, dtype) in chunk.items():
                if name in wanted and not all_finite(array, dtype):
                    raise WeightMismatchError(f"{name} (from {label}) holds NaN or Inf")

    @staticmethod
    def _check_checksums(label: str, chunk: Chunk, source: WeightSource) -> None:
        for name, (array, _) in chunk.items():
            want = source.checksum(name)
            if want is not None and digest(array) != want:
                raise ChecksumError(f"{label}: parameter {name!r} does not match its checksum")

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

    def rollback(self) -> list[str]:
        """Undo the last partial load: the parameters it overwrote get their old values
        back, in place, and the version and checksums are those from before it. Only the
        touched tensors are written; no barrier (the groups stay as they are), so each rank
        rolls back on its own, then its weights are NORMAL again. Returns the names
        restored; StateError when no partial load is there to undo."""
        undo = self._undo
        if undo is None:
            raise StateError(f"rank {self.rank}: no partial load to roll back")
        for name, old in undo.tensors.items():
            param = self.params[name]
            write_param(param, old, param_dtype(param))
        self.version, self._checksums, self._undo = undo.version, undo.checksums, None
        self.verify_parameters("update")
        self._set_status(ModelWeightsStatus.NORMAL)
        self.log.info("rolled back %d parameter(s) to version %s", len(undo.tensors), self.version)
        return sorted(undo.tensors)

    def written_fingerprint(self) -> str | None:
        """The fingerprint of only the parameters the last partial load wrote (what its
        trainer computed: it saw nothing else), or None after any other load."""
        if self._undo is None:
            return None
        named = {n: self.params[n] for n in self._undo.tensors}
        return combine_digests(
            (
                n,
                tensor_digest(
                    n,
                    param_dtype(p),
                    param_shape(p),
                    self._checksums[n] if n in self._checksums else digest(read_param(p)),
                ),
            )
            for n, p in named.items()
        )

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
        if self._checksums.keys() == self.params.keys():
            return combine_digests(
                (n, tensor_digest(n, param_dtype(p), param_shape(p), self._checksums[n]))
                for n, p in self.params.items()
            )
        return fingerprint((name, param_dtype(p), read_param(p)) for name, p in self.params.items())

    def memory_stats(self) -> dict[str, float]:
        """Host memory of this process, and the device allocator's figures where there is one
        (the allocator of the parameters' framework)."""
        host = memory_now()
        stats = {"max_rss_gb": host["peak_rss"] / 1e9, "rss_anon_gb": host["rss_anon"] / 1e9}
        stats.update(device_memory(self.params.values()))
        return stats


@dataclass
class PreparedLoad:
    """A source every check passed on (`prepare_load`), ready for `write_prepared`."""

    source: WeightSource
    version: str
    wanted: set[str]
    expected: dict[str, int | None]  # name -> checksum of this rank's bytes, where known
    check_after_write: bool
    sync_s: float  # seconds the checks took
    partial: bool = False  # a subset of the parameters; the rest keep their values


@dataclass
class _Undo:
    """What a partial load overwrote: the version, checksums and values from before it."""

    version: str | None
    checksums: dict[str, int]
    tensors: dict[str, np.ndarray]  # name -> host copy of its old values (touched ones only)


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if names[5:] else "")


def _layout(strides) -> list[int]:
    """Axes from outermost to innermost in memory. A slice of a full tensor keeps the full
    tensor's strides, so only a different order (e.g. a transposed source) is a mismatch."""
    return sorted(range(len(strides)), key=lambda ax: -strides[ax])
