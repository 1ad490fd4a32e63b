"""Sharded trainers' geometry on numpy: pieces as boxes, a rank's slice assembled from the
pieces that overlap it, exactly-once coverage."""

import math

import numpy as np
import pytest

from fd_ray_sync import shards
from fd_ray_sync.errors import WeightMismatchError
from fd_ray_sync.sharding import ShardSpec, take_shard


@pytest.mark.parametrize("shape", [(4, 6), (3, 4, 5), (7,), (2, 3, 4, 5)])
def test_a_flat_range_is_boxes_in_order_covering_exactly_it(shape):
    n = math.prod(shape)
    full = np.arange(n).reshape(shape)
    rng = np.random.default_rng(0)
    for lo, hi in [(0, n), (5, n - 1), *(sorted(rng.integers(0, n + 1, 2)) for _ in range(20))]:
        boxes = shards.flat_boxes(shape, int(lo), int(hi))
        assert len(boxes) <= 2 * len(shape) - 1
        got = (
            np.concatenate(
                [
                    full[shards._within(b, shards.Box((0,) * len(shape), shape))].ravel()
                    for b in boxes
                ]
            )
            if boxes
            else np.empty(0, int)
        )
        assert got.tolist() == list(range(lo, hi))


def _pieces(full, sets):
    """(box, first, data) for every piece of `full` as (region, data) pairs."""
    out = []
    for region, data in sets:
        out += [(box, first, data) for box, first in shards.region_boxes(region, data.shape)]
    return out


@pytest.mark.parametrize("axis", [0, 1])
def test_a_rank_slice_is_assembled_from_row_and_flat_pieces(axis):
    full = np.random.default_rng(1).standard_normal((8, 12)).astype(np.float32)
    rows = [  # trainer 0: rows 0..2, trainer 1: rows 3..7 (not the TP split)
        (shards.Region((8, 12), 0, 0), full[:3]),
        (shards.Region((8, 12), 0, 3), full[3:]),
    ]
    flat = [  # FSDP: an uneven flat split
        (shards.Region((8, 12), None, 0, flat=True), full.ravel()[:41]),
        (shards.Region((8, 12), None, 41, flat=True), full.ravel()[41:]),
    ]
    for pieces in (rows, flat):
        for index in range(2):
            spec = ShardSpec(axis=axis, parts=2, index=index)
            local = shards.slice_box(spec, full.shape)
            out = np.zeros(local.shape, np.float32)
            shards.assemble(out, local, _pieces(full, pieces))
            np.testing.assert_array_equal(out, take_shard(full, spec))
        boxes = [(b, "t") for r, d in pieces for b, _ in shards.region_boxes(r, d.shape)]
        shards.check_cover("w", full.shape, boxes)


def test_coverage_gaps_overlaps_and_strays_are_named():
    box = shards.Box
    with pytest.raises(WeightMismatchError, match="cover 48 of its 96"):
        shards.check_cover("w", (8, 12), [(box((0, 0), (4, 12)), "trainer 0")])
    with pytest.raises(WeightMismatchError, match="trainer 0 and trainer 1 overlap"):
        shards.check_cover(
            "w", (8, 12), [(box((0, 0), (5, 12)), "trainer 0"), (box((4, 0), (4, 12)), "trainer 1")]
        )
    with pytest.raises(WeightMismatchError, match="outside its shape"):
        shards.check_cover("w", (8, 12), [(box((6, 0), (4, 12)), "trainer 1")])


def test_a_shard_that_does_not_fit_its_parameter_is_refused():
    bad = shards.Shard(np.zeros((3, 5), np.float32), (8, 12), axis=0, start=0)
    with pytest.raises(WeightMismatchError, match="shard of 'w'"):
        shards._check_shard("w", bad)
    with pytest.raises(WeightMismatchError, match="flat offset 90"):
        shards._check_shard("w", shards.Shard(np.zeros(10, np.float32), (8, 12), None, 90, True))
