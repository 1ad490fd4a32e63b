"""Sharded trainers through the public API: two trainer actors each hold a piece of every
parameter (rows split unevenly, or an FSDP-style flat split: not the fleet's TP split), put
their own pieces, and the fleet loads one version from both, all-or-nothing. Each trainer
computes only its own pieces' values; no process builds the whole model but this test's
checker."""

import sys
import zlib

import numpy as np
import pytest
import ray
from fleet_checks import assert_serves
from ray import cloudpickle

from fd_ray_sync.config import FleetConfig
from fd_ray_sync.engine.reference import init_full_state_dict
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.errors import WeightMismatchError
from fd_ray_sync.fleet import Fleet

pytestmark = pytest.mark.slow
TINY = preset("tiny")
SHAPES = {n: a.shape for n, a in init_full_state_dict(TINY, seed=0).items()}
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the trainer actors' code


def values(name: str, seed: int, lo: int, hi: int) -> np.ndarray:
    """Elements [lo, hi) of parameter `name` (flat, C order) at training step `seed`."""
    f = np.arange(lo, hi, dtype=np.int64)
    mixed = (f * 2654435761 + seed * 97 + zlib.crc32(name.encode())) % 1000
    return (mixed / 1000.0 - 0.5).astype(np.float32)


def full_state(seed: int) -> dict[str, np.ndarray]:
    return {n: values(n, seed, 0, int(np.prod(s))).reshape(s) for n, s in SHAPES.items()}


def cut(name: str, shape: tuple, k: int) -> tuple[int, int, bool]:
    """Trainer k's part of `name`: (lo, hi, by rows) of rows or of flat elements."""
    by_rows = len(shape) >= 2 and shape[0] >= 3 and zlib.crc32(name.encode()) % 2 == 0
    n = shape[0] if by_rows else int(np.prod(shape))
    split = n // 3 if by_rows else (n * 2) // 5  # uneven: never the TP split
    return ((0, split) if k == 0 else (split, n)) + (by_rows,)


@ray.remote(num_cpus=0)
class ShardTrainer:
    def __init__(self, k: int):
        self.k = k

    def push(self, seed: int, skip: str | None = None):
        from fd_ray_sync.shards import Shard, put_shards

        pieces = {}
        for name, shape in SHAPES.items():
            if name == skip:
                continue
            lo, hi, by_rows = cut(name, shape, self.k)
            inner = int(np.prod(shape[1:]))
            if by_rows:
                rows = values(name, seed, lo * inner, hi * inner).reshape(hi - lo, *shape[1:])
                pieces[name] = Shard(rows, shape, axis=0, start=lo)
            else:
                pieces[name] = Shard(values(name, seed, lo, hi), shape, flat=True, start=lo)
        return put_shards(pieces, trainer=self.k, bucket_bytes=32 << 10)


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    fleet = Fleet.launch(FleetConfig(name="sharded-fleet", tp=2, dp=1, phase_timeout_s=60))
    yield fleet
    fleet.shutdown()


def test_two_sharded_trainers_push_one_version(fleet):
    trainers = [ShardTrainer.remote(k) for k in range(2)]
    for seed in (1, 2):
        report = fleet.update_shards([t.push.remote(seed) for t in trainers], version=seed)
        assert {r.source for r in report.ranks} == {"sharded"}
        assert_serves(fleet, full_state(seed), seed)


def test_a_gap_in_the_pieces_is_refused_before_any_rank_sees_it(fleet):
    trainers = [ShardTrainer.remote(k) for k in range(2)]
    fleet.update_shards([t.push.remote(3) for t in trainers], version=3)
    name = "layers.0.attn.qkv.weight"
    parts = [trainers[0].push.remote(4, skip=name), trainers[1].push.remote(4)]
    with pytest.raises(WeightMismatchError, match=f"parameter '{name}'.* cover"):
        fleet.update_shards(parts, version=4)
    assert_serves(fleet, full_state(3), 3)
