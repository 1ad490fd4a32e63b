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


def test_a_shape_that_does_not_split_names_its_parameter():
    from fd_ray_sync.buckets import iter_buckets
    from fd_ray_sync.errors import WeightMismatchError

    plans = [{"mlp.up.weight": ShardSpec(axis=1, parts=2, index=r)} for r in range(2)]
    weights = {"mlp.up.weight": np.zeros((4, 5), np.float32)}
    with pytest.raises(WeightMismatchError, match="parameter 'mlp.up.weight': axis 1"):
        list(iter_buckets(weights, 1 << 20, True, plans))


def test_bfloat16_nan_and_inf_are_seen_in_their_bits():
    from fd_ray_sync.tensors import all_finite

    ones = np.full(4, 0x3F80, np.uint16)  # 1.0 in bfloat16
    assert all_finite(ones, "bfloat16")
    for bits in (0x7F80, 0xFF80, 0x7FC0):  # +Inf, -Inf, NaN
        bad = ones.copy()
        bad[2] = bits
        assert not all_finite(bad, "bfloat16")
