"""Refusals are immediate and whole, restores are verified, a dead trainer or a restarted
rank is noticed: each through the public Fleet API, on a local Ray cluster."""

import json
import os
import signal
import struct
import textwrap
import time

import numpy as np
import pytest
import ray
from fleet_checks import assert_serves
from procs import start_driver

from fd_ray_sync.config import FleetConfig
from fd_ray_sync.engine.reference import init_full_state_dict
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.errors import RankFailed, SnapshotError, VersionError, WeightMismatchError
from fd_ray_sync.fleet import Fleet
from fd_ray_sync.sources.snapshot import write_snapshot

pytestmark = pytest.mark.slow
TINY = preset("tiny")
TIMEOUT_S = 60.0  # each phase's; a refusal or a dead trainer must cost far less


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    fleet = Fleet.launch(FleetConfig(name="hardening", tp=2, dp=2, phase_timeout_s=TIMEOUT_S))
    yield fleet
    fleet.shutdown()


def pids(fleet):
    return {r["rank"]: r["pid"] for r in fleet.status()["ranks"]}


# --- 1. a refusal on one rank is immediate, names it, and changes nothing ---------------


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def _huge_header(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2**40, 2**40]  # beyond int64 bytes
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])


def _part_gap(path):
    parts = sorted(path.parent.glob("model_state.tp1.1.part*"))
    parts[1].unlink()


def _symlink_out(path):
    outside = path.parent.parent / f"outside-{path.name}"
    path.rename(outside)
    path.symlink_to(outside)


@pytest.mark.parametrize(
    "corrupt, cause",
    [
        (_truncate, "truncated"),
        (_huge_header, "more than any file can hold"),
        (_part_gap, "have a gap"),
        (_symlink_out, "outside the snapshot folder"),
    ],
    ids=["truncated", "huge-header", "part-gap", "symlink-out"],
)
def test_one_rank_refusing_a_snapshot_fails_fast_and_leaves_every_rank_serving(
    fleet, tmp_path, corrupt, cause
):
    state = init_full_state_dict(TINY, seed=1)
    fleet.update(state, version=f"1{corrupt.__name__}", force=True)
    version = fleet.status()["version"]
    before = pids(fleet)
    folder = tmp_path / "snap"
    plans = fleet.shard_plans()
    write_snapshot(folder, init_full_state_dict(TINY, 2), plans.__getitem__, 2, "99", 16 << 10)
    corrupt(sorted(folder.glob("model_state.tp1.1.part*"))[0])
    started = time.monotonic()
    with pytest.raises(RankFailed) as err:
        fleet.update_from_snapshot(folder, version="99")
    elapsed = time.monotonic() - started
    print(f"refusal ({corrupt.__name__}) in {elapsed:.2f}s")  # docs/reliability.md
    # Only TP rank 1 (ranks 1 and 3) refused, by name and cause, in the prepare phase.
    assert err.value.phase == "prepare" and sorted(err.value.failures) == [1, 3]
    assert all(isinstance(e, SnapshotError) for e in err.value.errors.values())
    assert cause in str(err.value)
    assert elapsed < TIMEOUT_S / 4, f"the refusal took {elapsed:.1f}s (a timeout?)"
    assert pids(fleet) == before  # nothing was rebuilt
    assert_serves(fleet, state, version)


def test_unknown_names_and_unsplittable_shapes_are_refused_by_name(fleet):
    state = init_full_state_dict(TINY, seed=3)
    fleet.update(state, version=3)
    extra = dict(state, **{"layers.0.not_a_param": np.ones(3, np.float32)})
    with pytest.raises(RankFailed, match="not in the model: layers.0.not_a_param") as err:
        fleet.update(extra, version=4)
    assert err.value.phase == "prepare"
    odd = dict(state)
    odd["layers.0.attn.qkv.weight"] = np.ones((TINY.d_model, 3 * TINY.d_model + 1), np.float32)
    with pytest.raises(WeightMismatchError, match="'layers.0.attn.qkv.weight'"):
        fleet.update(odd, version=4)
    assert_serves(fleet, state, 3)


def test_a_stale_version_yaml_is_refused_before_anything_is_written(fleet, tmp_path):
    state = init_full_state_dict(TINY, seed=5)
    fleet.update(state, version=50)
    before = pids(fleet)
    plans = fleet.shard_plans()
    write_snapshot(tmp_path, init_full_state_dict(TINY, 6), plans.__getitem__, 2, "40", 1 << 20)
    with pytest.raises(VersionError, match="not newer"):
        fleet.update_from_snapshot(tmp_path)  # the folder says 40
    with pytest.raises(VersionError, match="records \\['40'\\].*stale"):
        fleet.update_from_snapshot(tmp_path, version="51")
    assert pids(fleet) == before
    assert_serves(fleet, state, 50)


# --- 2. a restore is verified against the committed fingerprints -------------------------


def test_a_restore_from_a_changed_snapshot_folder_keeps_that_replica_down(fleet, tmp_path):
    plans = fleet.shard_plans()
    state = init_full_state_dict(TINY, seed=7)
    write_snapshot(tmp_path, state, plans.__getitem__, 2, "70", 1 << 20)
    fleet.update_from_snapshot(tmp_path)
    # Someone rewrites the committed folder in place (same version.yaml, other weights).
    write_snapshot(tmp_path, init_full_state_dict(TINY, 8), plans.__getitem__, 2, "70", 1 << 20)
    # One replica lost: it is rebuilt from the other one, not from the changed folder.
    os.kill(pids(fleet)[3], signal.SIGKILL)
    assert fleet.generate(["x"], 4, replica=1)[0].version == "70"
    assert_serves(fleet, state, 70)
    # Both lost: no replica serves version 70, so each restore reads the folder, which no
    # longer holds what was committed: both stay down, saying why.
    victims = pids(fleet)
    os.kill(victims[1], signal.SIGKILL)
    os.kill(victims[3], signal.SIGKILL)
    ray.get(fleet.coordinator.heal.remote())
    status = fleet.status()
    assert status["replicas_serving"] == [False, False]
    for replica in (0, 1):
        assert "differ from version 70 as committed" in status["replica_errors"][replica]
    fleet.update(state, version=71)  # the next update brings them back
    assert_serves(fleet, state, 71)


# --- 3. a dead trainer is noticed in seconds ------------------------------------------------

TRAINER = textwrap.dedent(
    """
    import sys, threading
    import ray
    from fd_ray_sync.engine.spec import preset
    from fd_ray_sync.engine.reference import init_full_state_dict
    from fd_ray_sync.fleet import Fleet
    from fd_ray_sync.messages import TensorMeta

    ray.init(address=sys.argv[1], namespace="fd_ray_sync", log_to_driver=False)
    fleet = Fleet.connect("hardening")
    state = init_full_state_dict(preset("tiny"), seed=9)
    fleet.update(state, version=90)  # committed: its buckets are this process's
    announced = [TensorMeta(name=n, shape=a.shape, dtype="float32") for n, a in state.items()]

    def stalled():  # the trainer dies before it packs its first bucket
        print("feeding", flush=True)
        threading.Event().wait()
        yield

    fleet.push_buckets(stalled(), 91, announced)
    """
)


def test_a_trainer_killed_mid_feed_aborts_in_seconds_and_ranks_keep_their_weights(fleet, tmp_path):
    trainer = start_driver(tmp_path, TRAINER, "feeding")
    try:
        time.sleep(2.0)  # ranks are in the load phase now, waiting for bucket 0
        before = pids(fleet)
        trainer.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        # A request waits for the running update: it returns once the update is aborted.
        result = fleet.generate(["x"], 4)[0]
        waited = time.monotonic() - killed
        print(f"trainer killed -> update aborted, request served: {waited:.2f}s")
    finally:
        trainer.kill()
        trainer.wait()
    assert result.version == "90"
    assert waited < TIMEOUT_S / 4, f"the dead trainer held the fleet {waited:.1f}s"
    assert pids(fleet) == before  # no rank was rebuilt: none had written a byte
    assert_serves(fleet, init_full_state_dict(TINY, seed=9), 90)


# --- 4. a rank that died while the fleet was idle ------------------------------------------


def test_a_rank_lost_while_idle_is_reported_and_healed_by_the_next_update(fleet):
    state = init_full_state_dict(TINY, seed=11)
    fleet.update(state, version=110)
    os.kill(pids(fleet)[1], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "error" not in fleet.status()["ranks"][1]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    status = fleet.status()
    assert status["replicas_serving"] == [False, True]  # the truth, before anyone asks
    assert "rank 1" in status["replica_errors"][0]
    new = init_full_state_dict(TINY, seed=12)
    fleet.update(new, version=111)  # rebuilds replica 0 first, then updates everyone
    assert_serves(fleet, new, 111)


# --- 6. comm groups torn down on clear, through the fleet -----------------------------------


def test_comm_groups_shut_down_on_clear_come_back_with_the_next_update(ray_cluster):
    fleet = Fleet.launch(
        FleetConfig(name="shutdown-groups", tp=2, dp=1, shutdown_comm_groups_on_clear=True)
    )
    try:
        state = init_full_state_dict(TINY, seed=13)
        fleet.update(state, version=1)
        fleet.clear()
        assert {r["weights"] for r in fleet.status()["ranks"]} == {"CLEARED"}
        report = fleet.update(state, version=2)
        assert report.phase_s["restart"] > 0  # the groups were created again
        assert_serves(fleet, state, 2)
    finally:
        fleet.shutdown()


# --- 6. a non-detached fleet goes with its driver -------------------------------------------

DRIVER = textwrap.dedent(
    """
    import sys, time
    import ray
    from fd_ray_sync.config import FleetConfig
    from fd_ray_sync.fleet import Fleet

    ray.init(address=sys.argv[1], namespace="fd_ray_sync", log_to_driver=False)
    fleet = Fleet.launch(FleetConfig(name="orphan", tp=2, dp=1))  # keep the handle
    print("up", flush=True)
    time.sleep(600)
    """
)


def _leftovers(name):
    """The fleet's actors still alive (or coming back) and its placement groups."""
    from ray._private.state import state

    actors = [
        a["Name"]
        for a in state.actor_table(None).values()
        if (a["Name"] == name or a["Name"].startswith(f"{name}.")) and a["State"] != "DEAD"
    ]
    groups = [
        g["name"]
        for g in ray.util.placement_group_table().values()
        if g["name"].startswith(f"{name}.") and g["state"] != "REMOVED"
    ]
    return actors, groups


def test_a_fleet_whose_driver_dies_leaves_no_actor_and_no_reservation(ray_cluster, tmp_path):
    driver = start_driver(tmp_path, DRIVER, "up")
    try:
        actors, groups = _leftovers("orphan")
        assert len(actors) == 4 and len(groups) == 1  # coordinator, 2 ranks, front; one replica
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 60
    while _leftovers("orphan") != ([], []):
        assert time.monotonic() < deadline, _leftovers("orphan")
        time.sleep(0.5)
