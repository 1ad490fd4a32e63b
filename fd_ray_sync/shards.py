"""Sharded trainers: several processes each hold a piece of each parameter and push one
update together; no process ever holds the whole model.

A trainer describes each piece it holds as a `Shard` of the full parameter:

    Shard(w[128:256], full_shape=(512, 64), axis=0, start=128)   # rows 128..255 (Megatron)
    Shard(flat[4096:8192], full_shape=(512, 64), flat=True, start=4096)   # FSDP flat shard

and puts its pieces in its node's object store (`put_shards`, run in the trainer's own
process); the driver hands every trainer's `ShardSet` to `Fleet.update_shards`. Each rank
then assembles its TP slice / EP experts from the pieces that overlap it and only those.

Geometry: everything is a box of the full tensor (an origin and a shape). An axis piece is
one box; a flat range of the C-ordered tensor is at most 2 * ndim - 1 boxes, each of them
contiguous in the range, e.g. elements [5, 23) of a (4, 6) tensor:

    row 0: . . . . . #      box (0, 5) shape (1, 1)
    row 1: # # # # # #      box (1, 0) shape (2, 6)
    row 2: # # # # # #
    row 3: # # # # # .      box (3, 0) shape (1, 5)

A rank's slice is a box too (`ShardSpec`); it copies the intersection of each piece box
with it. The pieces of a parameter must cover it exactly once (`check_cover`, run by the
driver and by every rank before anything is written). Pure numpy, apart from `put_shards`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from fd_ray_sync.buckets import BucketMeta, iter_buckets
from fd_ray_sync.errors import WeightMismatchError
from fd_ray_sync.sharding import ShardSpec
from fd_ray_sync.tensors import shape_and_dtype


class Box(NamedTuple):
    origin: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Region:
    """Where a piece sits in its full parameter: a block along `axis` starting at `start`,
    or (`flat`) elements [start, start + n) of the flattened parameter."""

    full_shape: tuple[int, ...]
    axis: int | None = 0
    start: int = 0
    flat: bool = False


@dataclass(frozen=True)
class Shard:
    """One trainer's piece of one parameter (any framework's tensor, on the host)."""

    tensor: Any
    full_shape: tuple[int, ...]
    axis: int | None = 0
    start: int = 0
    flat: bool = False

    @property
    def region(self) -> Region:
        return Region(tuple(self.full_shape), self.axis, self.start, self.flat)


@dataclass(frozen=True)
class ShardSet:
    """What one trainer put: its buckets (`metas[i]` in `refs[i]`, piece shapes) and where
    each piece sits in its parameter."""

    trainer: int
    metas: tuple[BucketMeta, ...]
    refs: tuple = field(repr=False)
    regions: Mapping[str, Region] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.metas)


def flat_boxes(shape: Sequence[int], lo: int, hi: int) -> list[Box]:
    """Elements [lo, hi) of a C-ordered tensor of `shape`, as boxes in order."""
    shape = tuple(shape)
    if lo >= hi:
        return []
    if not shape:
        return [Box((), ())]
    inner = math.prod(shape[1:])
    rest = len(shape) - 1
    out: list[Box] = []

    def row(r: int, a: int, b: int) -> list[Box]:
        return [Box((r, *s.origin), (1, *s.shape)) for s in flat_boxes(shape[1:], a, b)]

    first = lo // inner
    if lo % inner:  # a partial first row
        end = min(hi, (first + 1) * inner)
        out += row(first, lo - first * inner, end - first * inner)
        first, lo = first + 1, end
    full_end = hi // inner
    if full_end > first:
        out.append(Box((first, *(0,) * rest), (full_end - first, *shape[1:])))
    if hi % inner and full_end * inner >= lo:  # a partial last row
        out += row(full_end, 0, hi - full_end * inner)
    return out


def region_boxes(region: Region, piece_shape: Sequence[int]) -> list[tuple[Box, int]]:
    """The boxes a piece covers, each with its first element's index in the piece's data."""
    full = region.full_shape
    if region.flat:
        n = math.prod(piece_shape)
        out, at = [], 0
        for box in flat_boxes(full, region.start, region.start + n):
            out.append((box, at))
            at += box.size
        return out
    if region.axis is None:
        return [(Box((0,) * len(full), tuple(full)), 0)]
    origin = tuple(region.start if a == region.axis else 0 for a in range(len(full)))
    return [(Box(origin, tuple(piece_shape)), 0)]


def slice_box(spec: ShardSpec, full_shape: Sequence[int]) -> Box:
    """The box of the full tensor a rank holds."""
    start, _ = spec.bounds(full_shape) if not spec.is_replicated else (0, 0)
    origin = tuple(
        start if (not spec.is_replicated and a == spec.axis) else 0 for a in range(len(full_shape))
    )
    return Box(origin, spec.local_shape(full_shape))


def intersect(a: Box, b: Box) -> Box | None:
    lo = [max(x, y) for x, y in zip(a.origin, b.origin)]
    hi = [min(x + n, y + m) for x, n, y, m in zip(a.origin, a.shape, b.origin, b.shape)]
    if any(h <= x for x, h in zip(lo, hi)):
        return None
    return Box(tuple(lo), tuple(h - x for x, h in zip(lo, hi)))


def _within(box: Box, outer: Box) -> tuple[slice, ...]:
    return tuple(slice(o - p, o - p + n) for o, p, n in zip(box.origin, outer.origin, box.shape))


def check_cover(name: str, full_shape: Sequence[int], boxes: Sequence[tuple[Box, str]]) -> None:
    """Raise WeightMismatchError unless the boxes (each with who holds it) cover the
    parameter exactly once."""
    full = Box((0,) * len(full_shape), tuple(full_shape))
    for box, who in boxes:
        if intersect(box, full) != box:
            raise WeightMismatchError(
                f"parameter {name!r}: the piece of {who} at {box.origin} with shape "
                f"{box.shape} lies outside its shape {tuple(full_shape)}"
            )
    for i, (a, who_a) in enumerate(boxes):
        for b, who_b in boxes[i + 1 :]:
            if intersect(a, b) is not None:
                raise WeightMismatchError(
                    f"parameter {name!r}: the pieces of {who_a} and {who_b} overlap at "
                    f"{intersect(a, b).origin}"
                )
    covered = sum(box.size for box, _ in boxes)
    if covered != full.size:
        raise WeightMismatchError(
            f"parameter {name!r}: the trainers' pieces cover {covered} of its {full.size} elements"
        )


def assemble(
    out: np.ndarray, local: Box, pieces: Iterable[tuple[Box, int, np.ndarray]]
) -> np.ndarray:
    """Copy into `out` (shape `local.shape`) the part of each piece box that falls in
    `local`: `(box, first, data)` is a box, the index of its first element in the piece's
    flat data, and that data."""
    for box, first, data in pieces:
        inter = intersect(box, local)
        if inter is None:
            continue
        src = data.reshape(-1)[first : first + box.size].reshape(box.shape)
        out[_within(inter, local)] = src[_within(inter, box)]
    return out


def plan_of(sets: Sequence[ShardSet]) -> dict[str, list[tuple[ShardSet, int, int]]]:
    """Parameter -> [(set, bucket index, tensor index in the bucket)] of its pieces."""
    out: dict[str, list[tuple[ShardSet, int, int]]] = {}
    for s in sets:
        for b, meta in enumerate(s.metas):
            for k, t in enumerate(meta.tensors):
                out.setdefault(t.name, []).append((s, b, k))
    return out


def check_sets(sets: Sequence[ShardSet]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every parameter's full shape and dtype, once every check passed: one dtype and full
    shape per parameter across trainers, each piece where its region says, and the pieces
    covering each parameter exactly once."""
    trainers = [s.trainer for s in sets]
    if len(set(trainers)) != len(trainers):
        raise WeightMismatchError(f"two shard sets come from the same trainer: {trainers}")
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, pieces in plan_of(sets).items():
        boxes = []
        for s, b, k in pieces:
            t, region = s.metas[b].tensors[k], s.regions[name]
            who = f"trainer {s.trainer}"
            got = (tuple(region.full_shape), t.dtype)
            if found.setdefault(name, got) != got:
                raise WeightMismatchError(
                    f"parameter {name!r}: {who} says {got[1]}{list(got[0])}, another "
                    f"{found[name][1]}{list(found[name][0])}"
                )
            boxes += [(box, who) for box, _ in region_boxes(region, t.shape)]
        check_cover(name, found[name][0], boxes)
    return found


def _check_shard(name: str, shard: Shard) -> None:
    shape, _ = shape_and_dtype(shard.tensor)
    full = tuple(shard.full_shape)
    if shard.flat:
        ok = len(shape) == 1 and 0 <= shard.start and shard.start + shape[0] <= math.prod(full)
    elif shard.axis is None:
        ok = shape == full
    else:
        ok = (
            len(shape) == len(full)
            and 0 <= shard.axis < len(full)
            and all(s == f for a, (s, f) in enumerate(zip(shape, full)) if a != shard.axis)
            and 0 <= shard.start
            and shard.start + shape[shard.axis] <= full[shard.axis]
        )
    if not ok:
        raise WeightMismatchError(
            f"shard of {name!r}: a {list(shape)} piece does not fit {list(full)} at "
            f"{'flat ' if shard.flat else f'axis {shard.axis} '}offset {shard.start}"
        )


def put_shards(
    shards: Mapping[str, Shard], trainer: int, bucket_bytes: int = 256 << 20
) -> ShardSet:
    """Put this trainer's pieces in its node's object store (call it in the trainer's own
    process: it owns the buckets, which live while it does or until the update's spec is
    dropped). Checksums of each piece are taken while packing."""
    import ray

    for name, shard in shards.items():
        _check_shard(name, shard)
    metas, refs = [], []
    tensors = ((name, shard.tensor) for name, shard in shards.items())
    for meta, arrays in iter_buckets(tensors, bucket_bytes, checksum=True):
        metas.append(meta)
        refs.append(ray.put(arrays))
    regions = {name: shard.region for name, shard in shards.items()}
    return ShardSet(trainer, tuple(metas), tuple(refs), regions)
