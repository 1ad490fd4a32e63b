"""FP8 weights through every transport of one tp=2 (EP over both ranks) fleet of the tiny_fp8
preset: object store, snapshot, ipc ring, collective broadcast, registered ipc storage and
sharded trainers' pieces each land bit-identical (each rank's fingerprint equals the one
computed here from the pushed FP8 bits and scales) and the fleet generates what a local
reference engine holding the same FP8 weights does; a replica added afterwards loads them
from its peer, bit for bit."""

import numpy as np
import paddle
import pytest
import ray
import torch
from fleet_checks import close, over, put_in_pieces

from fd_ray_sync import ipc
from fd_ray_sync.checksum import fingerprint
from fd_ray_sync.config import FleetConfig, LoadConfig
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.spec import preset
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
    for replica in range(fleet.config.dp):
        results = fleet.generate(PROMPTS, 10, replica=replica)
        assert [r.version for r in results] == [str(version)] * 2
        assert [r.text for r in results] == local.generate(PROMPTS, 10)


def as_frameworks(state, paddle_too=True):
    """The same FP8 state as a trainer of each framework holds it: FP8 weights alternately as
    torch and paddle float8 tensors (`paddle_too`, else all torch), the rest as torch
    float32."""
    out = {}
    for i, (name, array) in enumerate(state.items()):
        dtype = getattr(array, "bits_dtype", "")
        if dtype and i % 2 and paddle_too:
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


def test_registered_storage_of_torch_fp8_tensors(fleet):
    shared = ipc.share(as_frameworks(init_full_state_dict(TINY_FP8, seed=5), paddle_too=False))
    assert "torch.float8_e4m3fn" in {str(t.dtype) for t in shared.values()}  # kept as FP8
    report = fleet.update(fleet.register(shared), version=5)
    assert {r.source for r in report.ranks} == {"ipc"}
    assert report.nbytes == sum(to_host(t)[0].nbytes for t in shared.values())
    assert_lands(fleet, shared, 5, report)


def test_sharded_trainers_put_fp8_pieces(fleet):
    state = init_full_state_dict(TINY_FP8, seed=6)
    sets = put_in_pieces(state)
    assert {t.dtype for s in sets for m in s.metas for t in m.tensors} >= {"float8_e4m3fn"}
    report = fleet.update_shards(sets, version=6)
    assert {r.source for r in report.ranks} == {"sharded"}
    assert report.nbytes == sum(a.nbytes for a in state.values())
    assert_lands(fleet, state, 6, report)


def test_a_replica_added_loads_the_fp8_weights_from_its_peer(fleet):
    """Replica 1 loads version 6 from replica 0's export (a serving peer comes first): its
    fingerprints equal the committed ones, checked by the restore and here, and it
    generates the same text."""
    state = init_full_state_dict(TINY_FP8, seed=6)
    assert fleet.scale(2)["replicas_serving"] == [True, True]
    assert set(ray.get(fleet.coordinator.heal.remote())["restore_s"]) == {1}
    assert_lands(fleet, state, 6)
