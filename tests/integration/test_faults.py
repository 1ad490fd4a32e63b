"""Faults during and between updates: dead ranks, hung ranks, a dead coordinator, corrupt
buckets. After each, the fleet serves its last committed version on every rank."""

import gc
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import ray
from fleet_checks import assert_serves, kill_rank0_mid_write
from ray import cloudpickle

from fd_ray_sync.buckets import iter_buckets
from fd_ray_sync.config import FleetConfig, LoadConfig
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.errors import (
    ChecksumError,
    PartialUpdateError,
    PhaseTimeout,
    RankFailed,
    StateError,
    WeightMismatchError,
)
from fd_ray_sync.fleet import Fleet
from fd_ray_sync.messages import TensorMeta
from fd_ray_sync.ray_stats import object_store_bytes_used

pytestmark = pytest.mark.slow
TINY = preset("tiny")
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class HangingEngine(ReferenceEngine):
    """Hangs in the load phase while `marker` exists (and removes it: it hangs once)."""

    def __init__(self, marker, *args):
        super().__init__(*args)
        self.marker = marker

    def alloc_kv_cache(self):
        if os.path.exists(self.marker):
            os.remove(self.marker)
            time.sleep(3600)
        super().alloc_kv_cache()


def hanging_factory(marker, hang_rank):
    def build(parallel, groups):
        if parallel.rank == hang_rank:
            return HangingEngine(marker, TINY, parallel, groups)
        return ReferenceEngine(TINY, parallel, groups)

    return build


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    fleet = Fleet.launch(
        FleetConfig(
            name="fault-fleet",
            tp=2,
            dp=2,
            phase_timeout_s=20,
            load=LoadConfig(load_strategy="object_store", check_finite=True),
        )
    )
    yield fleet
    fleet.shutdown()


def test_a_rank_killed_between_updates_comes_back_with_the_committed_version(fleet):
    state = init_full_state_dict(TINY, seed=1)
    fleet.update(state, version=1)
    victim = fleet.status()["ranks"][3]
    os.kill(victim["pid"], signal.SIGKILL)
    # The next request to its replica finds the rank dead, rebuilds the replica and retries.
    assert fleet.generate(["x"], 4, replica=1)[0].version == "1"
    assert fleet.status()["ranks"][3]["pid"] != victim["pid"]
    assert_serves(fleet, state, 1)


def test_a_rank_killed_mid_write_aborts_the_update_everywhere(fleet, tmp_path):
    state = init_full_state_dict(TINY, seed=2)
    fleet.update(state, version=2)
    errors = kill_rank0_mid_write(
        fleet, tmp_path, lambda: fleet.update(init_full_state_dict(TINY, seed=3), version=3)
    )
    assert errors and errors[0].phase == "load" and 0 in errors[0].lost
    assert_serves(fleet, state, 2)


def test_a_rank_that_hangs_turns_into_a_timeout_naming_it(ray_cluster, tmp_path):
    marker = tmp_path / "hang"
    fleet = Fleet.launch(
        FleetConfig(name="hang-fleet", tp=2, dp=1, phase_timeout_s=8),
        engine_factory=hanging_factory(str(marker), hang_rank=1),
    )
    try:
        state = init_full_state_dict(TINY, seed=4)
        fleet.update(state, version=1)
        marker.touch()
        started = time.monotonic()
        with pytest.raises(PhaseTimeout, match=r"phase 'load'.*rank 1: no answer within 8s"):
            fleet.update(init_full_state_dict(TINY, seed=5), version=2)
        assert time.monotonic() - started < 60
        assert_serves(fleet, state, 1)
    finally:
        fleet.shutdown()


def test_a_restarted_coordinator_rebuilds_its_state_from_the_ranks(fleet):
    state = init_full_state_dict(TINY, seed=6)
    fleet.update(state, version=6)
    ray.kill(fleet.coordinator, no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            status = fleet.status()
            break
        except ray.exceptions.RayActorError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert status["version"] == "6"
    assert_serves(fleet, state, 6)
    with pytest.raises(Exception, match="not newer"):
        fleet.update(state, version=5)


def test_requests_are_served_while_the_coordinator_restarts(fleet):
    """The fronts and ranks outlive a coordinator crash: a client keeps being served, by
    the same fronts and from the committed version, while the coordinator restarts and
    adopts them (the coordinator is not on the request path)."""
    state = init_full_state_dict(TINY, seed=9)
    fleet.update(state, version="6.5")  # between its neighbours' versions
    engine = ReferenceEngine(TINY)
    engine.load_full_state_dict(state)
    want = engine.generate(["x"], 4)[0]
    fronts = [f._actor_id for f in ray.get(fleet.coordinator.fronts.remote())]
    served, errors, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                served.append((time.monotonic(), fleet.generate(["x"], 4)[0]))
            except Exception as e:  # noqa: BLE001 - every error is a finding here
                errors.append(e)
                time.sleep(0.1)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(0.5)
        killed = time.monotonic()
        ray.kill(fleet.coordinator, no_restart=False)
        deadline = killed + 60
        while True:
            try:
                fleet.status()
                break
            except ray.exceptions.RayActorError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        back = time.monotonic()
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert errors == []
    assert any(killed < t < back for t, _ in served), "nothing served while it restarted"
    assert {(r.version, r.text) for _, r in served} == {("6.5", want)}
    assert [f._actor_id for f in ray.get(fleet.coordinator.fronts.remote())] == fronts
    assert_serves(fleet, state, "6.5")


@pytest.mark.parametrize(
    "per_slice,pipelined",
    [(False, False), (True, False), (True, True)],
    ids=["whole-tensor", "per-slice", "per-slice-pipelined"],
)
def test_a_corrupt_bucket_is_caught_by_checksum_and_the_version_stands(fleet, per_slice, pipelined):
    """Whole-tensor checksums of a gathered update are checked before writing (nothing
    changes); per-slice ones, as Fleet.update sends them, after writing, and the committed
    version is restored. A pipelined update checks each bucket as it arrives."""
    state = init_full_state_dict(TINY, seed=7)
    version = ["7", "8", "8.5"][per_slice + pipelined]
    fleet.update(state, version=version)
    plans = fleet.shard_plans()
    slice_plans = [plans[0], plans[1]] if per_slice else None
    new = init_full_state_dict(TINY, 8)
    announced = None
    if pipelined:
        announced = [TensorMeta(name=n, shape=a.shape, dtype=str(a.dtype)) for n, a in new.items()]

    def corrupted():
        for meta, arrays in iter_buckets(new, 64 << 10, True, slice_plans):
            arrays = [a.copy() for a in arrays]
            if meta.index == 1:
                arrays[0].reshape(-1)[0] += 1.0  # flipped after the checksum was taken
            yield meta, arrays

    with pytest.raises(RankFailed, match="bucket 1: parameter .* does not match its checksum") as e:
        fleet.push_buckets(corrupted(), f"{version}.1", announced, verify_fingerprints=False)
    errors = e.value.errors.values()
    wanted = PartialUpdateError if per_slice else ChecksumError
    assert errors and all(isinstance(err, wanted) for err in errors)
    assert_serves(fleet, state, version)


def test_nan_is_refused_when_the_fleet_checks_values(fleet):
    state = init_full_state_dict(TINY, seed=9)
    fleet.update(state, version=9)
    bad = dict(init_full_state_dict(TINY, seed=10))
    bad["layers.1.mlp.w1"] = bad["layers.1.mlp.w1"].copy()
    bad["layers.1.mlp.w1"][0, 0, 0] = np.inf
    with pytest.raises(RankFailed, match="layers.1.mlp.w1 .*NaN or Inf") as err:
        fleet.update(bad, version=10)
    # A pipelined update checks each bucket before writing it: a rank whose bad bucket came
    # first refuses outright, one that wrote earlier buckets reports a partial update.
    for e in err.value.errors.values():
        assert isinstance(e, WeightMismatchError) or (
            isinstance(e, PartialUpdateError) and "WeightMismatchError" in str(e)
        )
    assert_serves(fleet, state, 9)


def test_object_store_use_returns_to_one_committed_copy_after_each_commit(fleet):
    state = init_full_state_dict(TINY, seed=11)
    model_bytes = sum(a.nbytes for a in state.values())
    bound = model_bytes * 1.5  # the committed copy, kept for rollback: one, never two
    bad = dict(state)
    bad["logit_scale"] = np.array(np.nan, dtype=bad["logit_scale"].dtype)  # check_finite
    gc.collect()  # what earlier tests left; from here on, no collection may help
    gc.disable()
    try:
        # A failed update's buckets go with it: no reference cycle in this process (its
        # error, the error's traceback, the frames that held the bucket refs) keeps them.
        with pytest.raises(RankFailed, match="NaN"):
            fleet.update(bad, version=19)
        for version in range(20, 24):
            fleet.update(state, version=version)
            # Borrowers report dropped refs to the owner asynchronously: allow a few seconds.
            deadline = time.monotonic() + 10
            while (used := object_store_bytes_used()) > bound and time.monotonic() < deadline:
                time.sleep(0.1)
            assert used <= bound, (version, used, model_bytes)
    finally:
        gc.enable()


def test_a_fleet_shut_down_leaves_nothing_in_the_store(ray_cluster):
    gc.collect()
    gc.disable()  # the fleet's copy must go at shutdown, not at a garbage collection
    before = object_store_bytes_used()  # other tests' fleets keep their own copies
    try:
        fleet = Fleet.launch(FleetConfig(name="gone", tp=1, dp=1))
        state = init_full_state_dict(TINY, seed=13)
        fleet.update(state, version=1)
        kept = before + sum(a.nbytes for a in state.values())  # the copy kept for rollback
        deadline = time.monotonic() + 10  # the store's figures lag a little
        while object_store_bytes_used() < kept and time.monotonic() < deadline:
            time.sleep(0.1)
        assert object_store_bytes_used() >= kept
        fleet.generate(["x"], 4)  # its router now knows the fronts
        fleet.shutdown()
        deadline = time.monotonic() + 10
        while object_store_bytes_used() > before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert object_store_bytes_used() <= before
    finally:
        gc.enable()
    # A request to the fleet shut down is refused at once, not after the request timeout
    # a restarting coordinator would be given (phase_timeout_s, 120 s here).
    started = time.monotonic()
    with pytest.raises(StateError, match="coordinator is gone"):
        fleet.generate(["x"], 4)
    assert time.monotonic() - started < 30


def test_without_a_kept_copy_the_store_empties_and_a_lost_replica_stays_down(ray_cluster):
    before = object_store_bytes_used()  # other tests' fleets keep their own copies
    fleet = Fleet.launch(FleetConfig(name="no-keep", tp=2, dp=1, keep_committed=False))
    try:
        state = init_full_state_dict(TINY, seed=12)
        fleet.update(state, version=1)
        deadline = time.monotonic() + 10
        while object_store_bytes_used() > before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert object_store_bytes_used() <= before  # nothing kept for rollback
        os.kill(fleet.status()["ranks"][1]["pid"], signal.SIGKILL)
        with pytest.raises(StateError, match="not serving"):
            fleet.generate(["x"], 4)  # rebuilt, but there is nothing to load
        status = fleet.status()
        assert status["replicas_serving"] == [False]
        fleet.update(state, version=2)  # the next update brings it back
        assert fleet.generate(["x"], 4)[0].version == "2"
    finally:
        fleet.shutdown()
