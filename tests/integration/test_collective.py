"""The collective transport through the public Fleet API: buckets broadcast along a gloo
weight-sync group of the trainer and every rank (a chain, pieces forwarded as they land),
all-or-nothing like every other transport."""

import os
import signal
import time

import pytest
import ray
from fleet_checks import assert_serves, kill_rank0_mid_write, over_object_store
from procs import start_driver

from fd_ray_sync import collective
from fd_ray_sync.config import FleetConfig, LoadConfig
from fd_ray_sync.engine.reference import init_full_state_dict
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.errors import PhaseTimeout, RankFailed, WeightMismatchError
from fd_ray_sync.fleet import Fleet
from fd_ray_sync.shm import pid_alive

pytestmark = pytest.mark.slow
TINY = preset("tiny")
TIMEOUT_S = 60.0
BUCKET = 64 << 10  # small buckets: the tiny model spans several, both slots turn over


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    config = FleetConfig(
        name="collective-fleet",
        tp=2,
        dp=2,
        phase_timeout_s=TIMEOUT_S,
        load=LoadConfig(load_strategy="collective", bucket_bytes=BUCKET),
    )
    fleet = Fleet.launch(config)
    yield fleet
    fleet.shutdown()


def test_updates_are_broadcast_bit_identical_over_one_kept_group(fleet):
    state = init_full_state_dict(TINY, seed=1)
    report = fleet.update(state, version=1)
    assert report.nbytes == sum(a.nbytes for a in state.values())
    assert {r.source for r in report.ranks} == {"collective"}
    assert_serves(fleet, state, 1)
    key = fleet._end.info.key
    state = init_full_state_dict(TINY, seed=2)
    fleet.update(state, version=2)
    assert_serves(fleet, state, 2)
    assert fleet._end.info.key == key  # formed once, reused


def test_a_refused_update_changes_nothing_and_the_next_one_forms_a_new_group(fleet):
    state = init_full_state_dict(TINY, seed=3)
    fleet.update(state, version=3)
    key = fleet._end.info.key
    bad = dict(init_full_state_dict(TINY, seed=4))
    name = "layers.0.attn.qkv.weight"
    bad[name] = bad[name][:, :-2].copy()  # still splits over tp=2, but not the model's
    with pytest.raises(RankFailed, match=name) as e:
        fleet.update(bad, version=4)
    assert e.value.phase == "prepare"
    assert isinstance(next(iter(e.value.errors.values())), WeightMismatchError)
    assert_serves(fleet, state, 3)
    state = init_full_state_dict(TINY, seed=5)
    fleet.update(state, version=5)
    assert_serves(fleet, state, 5)
    assert fleet._end.info.key != key


def test_a_rank_killed_mid_write_aborts_and_the_fleet_rolls_back(fleet, tmp_path):
    """Every replica writes a collective update at once, so none is left untouched to
    restore from: they roll back to the copy replica 0's ranks exported after the last
    commit (keep_committed), which the trainer never held."""
    state = init_full_state_dict(TINY, seed=6)
    fleet.update(state, version=6)
    errors = kill_rank0_mid_write(
        fleet, tmp_path, lambda: fleet.update(init_full_state_dict(TINY, seed=7), version=7)
    )
    assert errors and errors[0].phase == "load" and 0 in errors[0].lost
    assert_serves(fleet, state, 6)
    state = init_full_state_dict(TINY, seed=8)
    fleet.update(state, version=8)  # a new group, with rank 0's new process
    assert_serves(fleet, state, 8)


def test_the_chain_runs_through_each_node_once():
    nodes = {0: "b", 1: "b", 2: "a", 3: "c", 4: "a", 5: "c"}
    assert collective.chain_order(nodes, "a") == (2, 4, 0, 1, 3, 5)
    assert collective.chain_order(nodes, "elsewhere") == (0, 1, 2, 4, 3, 5)
    assert collective.pieces(10, 4) == [(0, 4), (4, 4), (8, 2)]


TRAINER = """
import sys
import ray
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.engine.reference import init_full_state_dict
from fd_ray_sync.fleet import Fleet

ray.init(address=sys.argv[1], namespace="fd_ray_sync", log_to_driver=False)
fleet = Fleet.connect("collective-fleet")
fleet.update(init_full_state_dict(preset("tiny"), seed=SEED), version=VERSION)
print("pushed", flush=True)
"""


def test_a_replica_is_rebuilt_from_its_peer_after_the_trainer_is_gone(fleet, tmp_path):
    """A trainer process pushes over the collective transport (no copy kept) and exits;
    then a rank of replica 1 dies. The replica is rebuilt and loads the committed version
    from replica 0's ranks: before peers, it had nothing to restore from."""
    trainer = start_driver(
        tmp_path, TRAINER.replace("SEED", "12").replace("VERSION", "12"), "pushed"
    )
    trainer.wait(timeout=60)
    state = init_full_state_dict(TINY, seed=12)
    victim = fleet.status()["ranks"][3]
    os.kill(victim["pid"], signal.SIGKILL)
    start = time.monotonic()
    assert fleet.generate(["x"], 4, replica=1)[0].version == "12"  # rebuilt first
    print(f"replica 1 rebuilt from its peer in {time.monotonic() - start:.1f}s")
    assert fleet.status()["ranks"][3]["pid"] != victim["pid"]
    assert_serves(fleet, state, 12)


def test_a_stalled_rank_is_named_within_the_phase_timeout_and_the_replica_rolls_back(
    ray_cluster, tmp_path
):
    """Rank 0 hangs mid-write (it never answers and never forwards another bucket): rank 1,
    downstream on the chain, gives up within the phase timeout naming rank 0, rank 0 is
    reported lost, and the replica is rebuilt on the committed version."""
    config = FleetConfig(
        name="collective-stall",
        tp=2,
        dp=1,
        phase_timeout_s=15.0,
        load=LoadConfig(load_strategy="collective", bucket_bytes=BUCKET),
    )
    fleet = Fleet.launch(config)
    try:
        state = init_full_state_dict(TINY, seed=20)
        over_object_store(fleet).update(state, version=20)
        rank0 = ray.get(fleet.coordinator.rank_handles.remote())[0]
        ray.get(rank0.hold_after_writes.remote(5, str(tmp_path / "held")))
        with pytest.raises(PhaseTimeout) as e:  # rank 0 never answers
            fleet.update(init_full_state_dict(TINY, seed=21), version=21)
        assert e.value.phase == "load" and set(e.value.lost) == {0}
        assert "from rank 0" in e.value.failures[1]  # the stalled upstream, by name
        assert_serves(fleet, state, 20)
    finally:
        fleet.shutdown()


def test_scaling_adds_replicas_loaded_from_peers_and_removes_them(fleet):
    """Up: the new replica loads the committed version (pushed over the collective
    transport, so no copy is kept) from a serving replica while the others keep serving;
    the next update forms a group with its ranks. Down: its ranks and group go."""
    state = init_full_state_dict(TINY, seed=30)
    fleet.update(state, version=30)
    out = fleet.scale(3)
    assert out["replicas_serving"] == [True, True, True]
    assert len(fleet.status()["ranks"]) == 6
    assert_serves(fleet, state, 30)
    state = init_full_state_dict(TINY, seed=31)
    fleet.update(state, version=31)  # the group now holds the new ranks too
    assert len(fleet._end.info.ranks) == 6
    assert_serves(fleet, state, 31)
    gone = [r["pid"] for r in fleet.status()["ranks"][4:]]
    fleet.scale(2)
    status = fleet.status()
    assert status["dp"] == 2 and len(status["ranks"]) == 4
    assert_serves(fleet, state, 31)
    deadline = time.monotonic() + 30
    while any(pid_alive(pid) for pid in gone) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(pid_alive(pid) for pid in gone)
    state = init_full_state_dict(TINY, seed=32)
    fleet.update(state, version=32)
    assert_serves(fleet, state, 32)
