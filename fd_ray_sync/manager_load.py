"""Loading one rank's weights (part of `DynamicWeightManager`): check, then write.

`prepare_load` checks everything a source will deliver while the rank keeps serving (names,
shapes, dtypes, checksums; finiteness when asked); `write_prepared` writes it in place,
hashing each parameter's bytes as they land when the caller can roll back. A partial load
keeps what it overwrites (`rollback`). The fleet runs the prepare on every rank first and
writes only once every rank said yes (actors/transaction.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fd_ray_sync import cuda_hash
from fd_ray_sync.checksum import combine_digests, copy_and_digest, digest, tensor_digest
from fd_ray_sync.errors import (
    ChecksumError,
    PartialUpdateError,
    StateError,
    WeightMismatchError,
)
from fd_ray_sync.messages import LoadReport, TensorMeta
from fd_ray_sync.params import (
    empty_device_cache,
    host_view,
    is_initialized,
    param_digests,
    param_dtype,
    param_shape,
    param_strides,
    read_param,
    write_param,
)
from fd_ray_sync.sources.base import Chunk, WeightSource
from fd_ray_sync.status import ModelWeightsStatus
from fd_ray_sync.tensors import all_finite, element_strides, host_array, on_cuda
from fd_ray_sync.version import validate_version


class RankLoad:
    """The load of a `DynamicWeightManager` (its state: `params`, `load`, `version`,
    `_status`, `_checksums`, `_undo`, `_asleep`, `on_write`, `log`)."""

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
            self._undo = Undo(self.version, dict(self._checksums), {})
        undo = self._undo.tensors if self._undo is not None else None
        self._checksums = {}
        sums: dict[str, int] = {}
        touched = written = nbytes = 0
        later: list[str] = []  # names of this chunk's parameters to digest after its writes
        launched = False  # a batched-copy kernel ran (LoadConfig.device_copies)
        try:
            for label, chunk in source.chunks():
                if streaming:
                    if self.load.verify_checksum and not check_after_write:
                        self._check_checksums(label, chunk, source)
                    if self.load.check_finite:
                        self._check_finite([(label, chunk)], wanted)
                batched = self._batch(chunk, wanted) if self.load.device_copies == "batched" else {}
                if batched:
                    touched += len(batched)  # from here on a failure leaves mixed weights
                    launched = True
                    self._copy_batched(label, batched, undo)
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
                    got = None  # a device parameter: digested after the chunk, in one launch
                    if name in batched:  # copied by the chunk's kernel
                        pass
                    elif view is not None and view.flags.c_contiguous:  # hashed while copied
                        got = copy_and_digest(view, host_array(array, dtype))
                    else:  # a device (or cleared, or strided) parameter
                        write_param(param, array, dtype)
                        if check_after_write and not on_cuda(param):
                            got = digest(read_param(param))
                    written += 1
                    if self.on_write is not None:
                        self.on_write(name)
                    nbytes += array.nbytes
                    if check_after_write:
                        if got is None:
                            later.append(name)
                        else:
                            sums[name] = self._written(label, name, got, expected, source)
                if later:  # device parameters: hashed where they are, in one launch
                    for name, got in zip(later, param_digests([self.params[n] for n in later])):
                        sums[name] = self._written(label, name, got, expected, source)
                    later = []
                self.log.debug("wrote %s", label)
            if launched:  # a kernel's fault shows at the next sync: here, inside the handling
                import torch

                torch.cuda.current_stream().synchronize()
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

    def _batch(self, chunk: Chunk, wanted: set[str]) -> dict:
        """name -> (parameter, source) for a chunk that is all torch device views going into
        torch parameters on this process's current device, which one batched-copy kernel
        can write; {} otherwise (the per-tensor copies then run, as when the kernel cannot
        be built here: logged once)."""
        pairs = {}
        for name, (array, _) in chunk.items():
            param = self.params.get(name)
            if (
                name not in wanted
                or param is None
                or not on_cuda(array)
                or not on_cuda(param)
                or not is_initialized(param)
                or array.device != param.device
            ):
                return {}
            source = array if array.dtype == param.dtype else array.view(param.dtype)
            pairs[name] = (param.detach(), source)
        if not pairs:
            return {}
        import torch

        from fd_ray_sync import cuda_copy

        here = torch.cuda.current_device()
        if any(p.device.index != here for p, _ in pairs.values()):
            return {}
        return pairs if cuda_copy.available(self.log) else {}

    def _copy_batched(self, label: str, pairs: dict, undo: dict | None) -> None:
        """Launch one batched-copy kernel for `pairs` (`_batch`) on the current stream, after
        keeping the old values a partial load may have to put back."""
        from fd_ray_sync.cuda_copy import BatchedCopy

        for name in pairs if undo is not None else ():
            if name not in undo:
                undo[name] = np.array(read_param(self.params[name]), copy=True)
        BatchedCopy(list(pairs.values()), next(iter(pairs.values()))[0].device).launch()
        self.log.debug("%s: %d tensors copied by one kernel", label, len(pairs))

    def _check_finite(self, chunks: Iterable[tuple[str, Chunk]], wanted: set[str]) -> None:
        for label, chunk in chunks:
            for name, (array, dtype) in chunk.items():
                if name in wanted and not all_finite(array, dtype):
                    raise WeightMismatchError(f"{name} (from {label}) holds NaN or Inf")

    @staticmethod
    def _written(label: str, name: str, got: int, expected: dict, source: WeightSource) -> int:
        """`got` (the digest of what was written), or ChecksumError when the source's
        checksum of `name` says otherwise."""
        want = source.checksum(name) if source.streaming else expected[name]
        if want is not None and got != want:
            raise ChecksumError(f"{label}: parameter {name!r} does not match its checksum")
        return got

    @staticmethod
    def _check_checksums(label: str, chunk: Chunk, source: WeightSource) -> None:
        names = list(chunk)
        arrays = [a if on_cuda(a) else host_array(a, d) for a, d in chunk.values()]
        for name, got in zip(names, cuda_hash.digests(arrays)):
            want = source.checksum(name)
            if want is not None and got != want:
                raise ChecksumError(f"{label}: parameter {name!r} does not match its checksum")

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
        missing = [n for n in named if n not in self._checksums]
        sums = {**dict(zip(missing, param_digests([named[n] for n in missing]))), **self._checksums}
        return combine_digests(
            (n, tensor_digest(n, param_dtype(p), param_shape(p), sums[n])) for n, p in named.items()
        )


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
class Undo:
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
