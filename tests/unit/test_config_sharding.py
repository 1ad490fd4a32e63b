import numpy as np
import pydantic
import pytest

from fd_ray_sync.config import LoadConfig, ParallelConfig
from fd_ray_sync.errors import WeightMismatchError
from fd_ray_sync.sharding import ShardSpec, shard_state_dict, take_shard
from fd_ray_sync.status import KVCacheStatus, ModelWeightsStatus


def test_statuses_keep_fastdeploy_values():
    for enum in (ModelWeightsStatus, KVCacheStatus):
        assert (enum.NORMAL, enum.UPDATING, enum.CLEARING, enum.CLEARED) == (0, 1, -1, -2)


def test_load_config_rejects_bad_values_by_field():
    with pytest.raises(pydantic.ValidationError, match="unknown load_strategy 'nope'"):
        LoadConfig(load_strategy="nope")
    with pytest.raises(pydantic.ValidationError, match="bucket_bytes"):
        LoadConfig(bucket_bytes=0)
    with pytest.raises(pydantic.ValidationError, match="extra"):
        LoadConfig(bucket_size=1)
    assert LoadConfig(load_strategy="ipc_snapshot").load_strategy == "snapshot"


def test_parallel_config_layout_and_errors():
    p = ParallelConfig(tp=2, dp=3, rank=5, enable_expert_parallel=True)
    assert (p.world_size, p.tp_rank, p.dp_rank, p.ep_rank, p.ep_size) == (6, 1, 2, 1, 2)
    assert p.replica_ranks(2) == [4, 5]
    assert p.for_rank(2).dp_rank == 1
    with pytest.raises(pydantic.ValidationError, match="rank 6 is outside the world of 6"):
        ParallelConfig(tp=2, dp=3, rank=6)
    with pytest.raises(pydantic.ValidationError, match="tp"):
        ParallelConfig(tp=0)
    with pytest.raises(pydantic.ValidationError, match="backend"):
        ParallelConfig(backend="mpi")


def test_shard_spec_slices_and_errors():
    full = np.arange(24).reshape(4, 6)
    col = ShardSpec(axis=1, parts=2, index=1)
    assert col.local_shape(full.shape) == (4, 3)
    np.testing.assert_array_equal(take_shard(full, col), full[:, 3:])
    row = ShardSpec(axis=0, parts=4, index=2)
    np.testing.assert_array_equal(take_shard(full, row), full[2:3])
    assert ShardSpec().local_shape((4, 6)) == (4, 6)
    with pytest.raises(WeightMismatchError, match="does not split into 4 equal parts"):
        ShardSpec(axis=1, parts=4, index=0).bounds((4, 6))
    with pytest.raises(pydantic.ValidationError, match="shard index 2 >= parts 2"):
        ShardSpec(axis=0, parts=2, index=2)
    local = shard_state_dict({"w": full, "b": np.ones(6)}, {"w": col})
    assert local["w"].flags.c_contiguous and local["b"].shape == (6,)
