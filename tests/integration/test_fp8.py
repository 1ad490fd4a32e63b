"""FP8 weights through every transport of one tp=2 (EP over both ranks) fleet of the tiny_fp8
preset: object store, snapshot, ipc ring and collective broadcast each land bit-identical
(each rank's fingerprint equals the one computed here from the pushed FP8 bits and scales)
and the fleet generates what a local reference engine holding the same FP8 weights does."""

import numpy as np
import paddle
import pytest
import torch

from fd_ray_sync.checksum import fingerprint
from fd_ray_sync.config import FleetConfig, LoadConfig
from fd_ray_sync.engine.model import preset
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.fleet import Fleet
from fd_ray_sync.sharding import take_shard
from fd_ray_sync.sources.snapshot import write_snapshot
from fd_ray_sync.tensors import BITS_DTYPES, tagged, to_host

pytestmark = pytest.mark.slow
TINY_FP8 = preset("tiny_fp8")
PROMPTS = ["fp8 ", "weights"]


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    config = FleetConfig(
        name="fp8-fleet",
        model="tiny_fp8",
        tp=2,
        dp=1,
        enable_expert_parallel=True,
        # Small buckets: the model spans several.
        load=LoadConfig(load_strategy="object_store", bucket_bytes=64 << 10),
    )
    fleet = Fleet.launch(config)
    yield fleet
    fleet.shutdown()


def over(fleet, strategy):
    """Another handle on the same ranks that pushes with `strategy`."""
    load = fleet.config.load.model_copy(update={"load_strategy": strategy})
    return Fleet(fleet.coordinator, fleet.config.model_copy(update={"load": load}))


def close(handle):
    """What the handle's transport holds in this process (the ring, the group); the ranks
    and the coordinator stay up for the next test."""
    for held in (handle._ring, handle._end):
        if held is not None:
            held.close()


def expected_fingerprints(fleet, state):
    """From the pushed tensors' own bits and dtype strings and each rank's plan."""
    host = map_host(state)
    return {
        rank: fingerprint((n, dtype, take_shard(a, plan[n])) for n, (a, dtype) in host.items())
        for rank, plan in fleet.shard_plans().items()
    }


def map_host(state):
    return {n: to_host(t) for n, t in state.items()}


def assert_lands(fleet, state, version, report=None):
    status = fleet.status()
    assert status["version"] == str(version) and status["serving"]
    got = {r["rank"]: r["fingerprint"] for r in status["ranks"]}
    want = expected_fingerprints(fleet, state)
    assert got == want and want[0] != want[1]
    if report is not None:
        assert report.fingerprints == want
    local = ReferenceEngine(TINY_FP8)
    local.load_full_state_dict(
        {n: tagged(a, d) if d in BITS_DTYPES else a for n, (a, d) in map_host(state).items()}
    )
    results = fleet.generate(PROMPTS, 10)
    assert [r.version for r in results] == [str(version)] * 2
    assert [r.text for r in results] == local.generate(PROMPTS, 10)


def as_frameworks(state):
    """The same FP8 state as a trainer of each framework holds it: FP8 weights alternately as
    torch and paddle float8 tensors, the rest as torch float32."""
    out = {}
    for i, (name, array) in enumerate(state.items()):
        dtype = getattr(array, "bits_dtype", "")
        if dtype and i % 2:
            out[name] = paddle.to_tensor(np.asarray(array)).view(getattr(paddle, dtype))
        elif dtype:
            out[name] = torch.from_numpy(np.asarray(array).copy()).view(getattr(torch, dtype))
        else:
            out[name] = torch.from_numpy(np.asarray(array).copy())
    return out


def test_object_store_then_snapshot_land_fp8_bit_identical(fleet, tmp_path):
    state = init_full_state_dict(TINY_FP8, seed=1)  # FP8 bits as tagged numpy arrays
    report = fleet.update(state, version=1)
    assert report.nbytes == sum(a.nbytes for a in state.values())
    assert_lands(fleet, state, 1, report)
    state = init_full_state_dict(TINY_FP8, seed=2)
    plans = fleet.shard_plans()
    write_snapshot(tmp_path, state, plans.__getitem__, tp=2, version="2", part_bytes=64 << 10)
    report = fleet.update_from_snapshot(tmp_path)
    assert {r.source for r in report.ranks} == {"snapshot"}
    assert_lands(fleet, state, 2, report)


def test_ipc_from_torch_and_paddle_fp8_tensors(fleet):
    handle = over(fleet, "ipc")
    try:
        state = as_frameworks(init_full_state_dict(TINY_FP8, seed=3))
        dtypes = {str(t.dtype) for t in state.values()}
        assert {"torch.float8_e4m3fn", "paddle.float8_e4m3fn"} <= dtypes
        report = handle.update(state, version=3)
        assert {r.source for r in report.ranks} == {"ipc"}
        assert_lands(fleet, state, 3, report)
    finally:
        close(handle)


def test_collective_broadcast_of_fp8_bits(fleet):
    handle = over(fleet, "collective")
    try:
        state = init_full_state_dict(TINY_FP8, seed=4)
        report = handle.update(state, version=4)
        assert {r.source for r in report.ranks} == {"collective"}
        assert_lands(fleet, state, 4, report)
    finally:
        close(handle)
