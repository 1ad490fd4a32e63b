"""Per-rank snapshot files (FastDeploy's `ipc_snapshot` strategy), reader and writer.

A rank looks for its weights in this order, and takes the first that exists:

1. numbered part files  `model_state.tp{rank}.{id}.part{N}.<ext>`, loaded in numeric order;
2. one full file        `model_state.tp{rank}.{id}.<ext>`;
3. the legacy name      `model_state.tp0{id}.<ext>`;
4. the full file in the shared fallback folder.

`<ext>` is `safetensors` or FastDeploy's `pdparams`; either way the content must be
safetensors (a pickle is refused, never loaded). `{rank}` is the rank's TP rank: replicas of
a data-parallel fleet hold the same slices and share files. `{id}` is FastDeploy's per-rank
id (the rank's GPU id there): by default the TP rank, so the folder a FastDeploy replica on
GPUs 0..tp-1 writes (`model_state.tp0.0`, `model_state.tp1.1`, ...) loads as it is. Part
numbers must run 0..N-1; files that look like parts but are misnamed are warned about and
ignored.

Each file's safetensors metadata holds the checksum of every tensor in it, under
`CHECKSUM_KEY` ("fd_ray_sync.xxh3": name -> `fd_ray_sync.checksum.digest`). Files written
before xxh3 carry CRC-32s under `LEGACY_CRC_KEY` instead: `verify()` still checks those (with
`legacy_crc32`), but they are not offered in the manifest, whose checksums are all digests,
so such a file is checked before it is written rather than after.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fd_ray_sync.buckets import plan_parts
from fd_ray_sync.checksum import digest, legacy_crc32
from fd_ray_sync.config import LoadConfig, ParallelConfig
from fd_ray_sync.errors import ChecksumError, SnapshotError
from fd_ray_sync.log import get_logger
from fd_ray_sync.messages import TensorMeta
from fd_ray_sync.safetensors_io import SafetensorsFile, write_safetensors
from fd_ray_sync.sharding import REPLICATED, ShardPlan, take_shard
from fd_ray_sync.sources.base import (
    Chunk,
    RankContext,
    TransportSpec,
    WeightSource,
    register_source,
)
from fd_ray_sync.tensors import contiguous, to_host
from fd_ray_sync.version import read_version_file, write_version_file

EXTENSIONS = ("safetensors", "pdparams")
CHECKSUM_KEY = "fd_ray_sync.xxh3"
LEGACY_CRC_KEY = "fd_ray_sync.crc32"


def snapshot_id_of(tp_rank: int, snapshot_id: int | None) -> int:
    """The `{id}` of a rank's file names: `snapshot_id`, or by default the TP rank."""
    return tp_rank if snapshot_id is None else snapshot_id


def base_name(tp_rank: int, snapshot_id: int | None = None) -> str:
    return f"model_state.tp{tp_rank}.{snapshot_id_of(tp_rank, snapshot_id)}"


def find_snapshot_files(
    folder: Path,
    tp_rank: int,
    snapshot_id: int | None = None,
    fallback_dir: Path | None = None,
    log=None,
) -> list[Path]:
    """The files holding `tp_rank`'s weights, by FastDeploy's priority order."""
    log = log or get_logger(__name__, tp_rank)
    base = base_name(tp_rank, snapshot_id)
    if not folder.is_dir():
        raise SnapshotError(f"snapshot folder {folder} does not exist")

    parts = _part_files(folder, base, log)
    if parts:
        return [_inside(p, folder) for p in parts]
    candidates = [folder / f"{base}.{ext}" for ext in EXTENSIONS]
    legacy = f"model_state.tp0{snapshot_id_of(tp_rank, snapshot_id)}"
    candidates += [folder / f"{legacy}.{ext}" for ext in EXTENSIONS]
    if fallback_dir is not None:
        candidates += [fallback_dir / f"{base}.{ext}" for ext in EXTENSIONS]
    for path in candidates:
        if path.is_file():
            if fallback_dir is not None and path.parent == fallback_dir:
                log.info("no local snapshot in %s, falling back to %s", folder, path)
            return [_inside(path, path.parent)]
    checked = f"{folder} (parts, full, legacy)"
    if fallback_dir is not None:
        checked += f" and {fallback_dir}"
    raise SnapshotError(f"no snapshot found for {base}: checked {checked}")


def _inside(path: Path, root: Path) -> Path:
    """`path`, unless it resolves (through symlinks) to a file outside `root`."""
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        raise SnapshotError(f"{path} resolves to {real}, outside the snapshot folder {root}")
    return path


def _part_files(folder: Path, base: str, log) -> list[Path]:
    good = re.compile(rf"^{re.escape(base)}\.part(\d+)\.({'|'.join(EXTENSIONS)})$")
    by_index: dict[int, Path] = {}
    misnamed = []
    for path in sorted(folder.glob(f"{base}.part*")):
        match = good.match(path.name)
        if not match:
            misnamed.append(path.name)
            continue
        index = int(match.group(1))
        if index in by_index:
            raise SnapshotError(
                f"snapshot part {index} of {base} exists twice: {by_index[index].name}, {path.name}"
            )
        by_index[index] = path
    if misnamed:
        log.warning(
            "ignoring snapshot files in %s whose names do not match %s.part<N>.<ext>: %s",
            folder,
            base,
            ", ".join(misnamed),
        )
    if by_index and sorted(by_index) != list(range(len(by_index))):
        missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
        raise SnapshotError(
            f"snapshot parts of {base} in {folder} have a gap: part(s) {missing} missing "
            f"(found {sorted(by_index)})"
        )
    return [by_index[i] for i in sorted(by_index)]


@dataclass(frozen=True)
class SnapshotSpec(TransportSpec):
    """A snapshot folder every rank reads its own files from (all nodes can read it)."""

    transport = "snapshot"
    folder: str | None = None

    @property
    def restorable(self) -> bool:
        return True

    @property
    def where(self) -> str:
        return f" in {self.folder}" if self.folder else ""

    def without_data(self) -> SnapshotSpec:
        return self  # the files stay where they are


@register_source("snapshot")
class SnapshotSource(WeightSource):
    """One rank's snapshot, opened header-first: nothing is read until `chunks()`."""

    def __init__(
        self,
        folder: str | os.PathLike,
        tp_rank: int,
        snapshot_id: int | None = None,
        fallback_dir: str | os.PathLike | None = None,
        rank: int | None = None,
    ):
        self.folder = Path(folder)
        self._log = get_logger(__name__, tp_rank if rank is None else rank)
        fallback = Path(fallback_dir) if fallback_dir is not None else None
        self.paths = find_snapshot_files(self.folder, tp_rank, snapshot_id, fallback, self._log)
        self._files = [SafetensorsFile(p) for p in self.paths]
        self._owner: dict[str, SafetensorsFile] = {}
        for f in self._files:
            for name in f.entries:
                if name in self._owner:
                    raise SnapshotError(
                        f"tensor {name!r} appears in both {self._owner[name].path.name} "
                        f"and {f.path.name}"
                    )
                self._owner[name] = f

    @classmethod
    def from_config(
        cls, load: LoadConfig, parallel: ParallelConfig, folder: str | os.PathLike | None = None
    ) -> SnapshotSource:
        folder = folder if folder is not None else load.model_dir
        if folder is None:
            raise SnapshotError("no snapshot folder: set LoadConfig.model_dir or pass a folder")
        return cls(folder, parallel.tp_rank, load.snapshot_id, load.fallback_dir, parallel.rank)

    @classmethod
    def open(cls, spec: SnapshotSpec, ctx: RankContext) -> SnapshotSource:
        return cls.from_config(ctx.load, ctx.parallel, spec.folder)

    def manifest(self) -> dict[str, TensorMeta]:
        out = {}
        for f in self._files:
            sums = _checksums(f, CHECKSUM_KEY)
            for name, e in f.entries.items():
                out[name] = TensorMeta(
                    name=name,
                    shape=e.shape,
                    dtype=e.dtype,
                    nbytes=e.nbytes,
                    checksum=sums.get(name),
                )
        return out

    def verify(self) -> None:
        checked = 0
        for f in self._files:
            key, check = CHECKSUM_KEY, digest
            sums = _checksums(f, key)
            if not sums:  # written before xxh3: CRC-32s, checked the old way
                key, check = LEGACY_CRC_KEY, legacy_crc32
                sums = _checksums(f, key)
            for name, want in sums.items():
                if name not in f.entries:
                    raise SnapshotError(f"{f.path}: checksum listed for missing tensor {name!r}")
                if check(f.array(name)) != want:
                    raise ChecksumError(
                        f"{f.path}: tensor {name!r} does not match its checksum ({key})"
                    )
                checked += 1
        self._log.debug("verified %d checksums in %d file(s)", checked, len(self._files))

    def chunks(self) -> Iterator[tuple[str, Chunk]]:
        for i, f in enumerate(self._files):
            self._log.debug("loading snapshot file %d/%d: %s", i + 1, len(self._files), f.path)
            yield f.path.name, {name: (f.array(name), e.dtype) for name, e in f.entries.items()}
            f.close()  # drop the mapping: extra memory stays about one part

    def version(self) -> str:
        return read_version_file(self.folder)

    def close(self) -> None:
        for f in self._files:
            f.close()


def _checksums(f: SafetensorsFile, key: str) -> dict[str, int]:
    """name -> checksum from a file's metadata under `key` (empty when the key is absent)."""
    raw = f.metadata.get(key)
    if raw is None:
        return {}
    try:
        sums = json.loads(raw)
        return {str(k): int(v) for k, v in sums.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise SnapshotError(f"{f.path}: corrupt {key} metadata: {e}") from e


# --- writer -----------------------------------------------------------------------------


def write_rank_snapshot(
    folder: str | os.PathLike,
    tp_rank: int,
    tensors: Mapping[str, Any],
    part_bytes: int,
    snapshot_id: int | None = None,
    ext: str = "safetensors",
) -> list[Path]:
    """Write one rank's (already sliced) paddle/torch/numpy tensors as snapshot files."""
    host = {name: to_host(t) for name, t in tensors.items()}
    return _write_rank_files(Path(folder), tp_rank, host, part_bytes, snapshot_id, ext)


def _write_rank_files(
    folder: Path, tp_rank: int, host: Chunk, part_bytes: int, snapshot_id: int | None, ext: str
) -> list[Path]:
    """Part files of at most `part_bytes` each (one part: the full file), with checksums.

    Older files of this rank are removed afterwards, so a shorter snapshot never leaves stale
    parts behind.
    """
    if ext not in EXTENSIONS:
        raise SnapshotError(f"unknown snapshot extension {ext!r}; known: {', '.join(EXTENSIONS)}")
    folder.mkdir(parents=True, exist_ok=True)
    groups = plan_parts({n: a.nbytes for n, (a, _) in host.items()}, part_bytes)
    base = base_name(tp_rank, snapshot_id)
    if len(groups) == 1:
        names = [f"{base}.{ext}"]
    else:
        names = [f"{base}.part{i}.{ext}" for i in range(len(groups))]
    for file_name, group in zip(names, groups):
        chunk = {n: host[n] for n in group}
        sums = {n: digest(a) for n, (a, _) in chunk.items()}
        write_safetensors(folder / file_name, chunk, {CHECKSUM_KEY: json.dumps(sums)})
    keep = set(names)
    for stale in folder.glob(f"{base}.*"):
        if stale.name not in keep and stale.suffix.lstrip(".") in EXTENSIONS:
            stale.unlink()
    return [folder / n for n in names]


def write_snapshot(
    folder: str | os.PathLike,
    full_state: Mapping[str, Any],
    plan_for: Callable[[int], ShardPlan],
    tp: int,
    version: str,
    part_bytes: int,
    snapshot_id: int | None = None,
    ext: str = "safetensors",
) -> dict[int, list[Path]]:
    """Cut a full state dict into each TP rank's slice, write the files, then version.yaml.

    `plan_for(tp_rank)` is that rank's shard plan. version.yaml is written last, so a reader
    that sees the new version sees complete files.
    """
    folder = Path(folder)
    host = {name: to_host(t) for name, t in full_state.items()}
    written = {}
    for tp_rank in range(tp):
        plan = plan_for(tp_rank)
        local = {
            name: (contiguous(take_shard(arr, plan.get(name, REPLICATED))), dtype)
            for name, (arr, dtype) in host.items()
        }
        written[tp_rank] = _write_rank_files(folder, tp_rank, local, part_bytes, snapshot_id, ext)
    write_version_file(folder, version)
    return written
