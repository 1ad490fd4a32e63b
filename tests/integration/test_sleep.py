"""Sleep and wake of a fleet on a local Ray cluster: level 1 comes back without the trainer,
level 2 needs an update, requests and updates wait for the wake, memory stays flat."""

import pytest
import ray

from fd_ray_sync.config import FleetConfig
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.errors import ConfigError, StateError
from fd_ray_sync.fleet import Fleet

pytestmark = pytest.mark.slow

PROMPTS = ["The trainer ", "fleet"]
TINY = preset("tiny")
MiB = 1 << 20


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    fleet = Fleet.launch(FleetConfig(name="test-sleep", tp=2, dp=1, enable_expert_parallel=True))
    fleet.update(init_full_state_dict(TINY, seed=1), version=1)
    yield fleet
    fleet.shutdown()


def reference_generation(state):
    engine = ReferenceEngine(TINY)
    engine.load_full_state_dict(state)
    return engine.generate(PROMPTS, 12)


def fingerprints(status):
    return {r["rank"]: r["fingerprint"] for r in status["ranks"]}


def test_level_1_wakes_on_the_same_version_bit_identical_without_an_update(fleet):
    before, texts = fleet.status(), [r.text for r in fleet.generate(PROMPTS, 12)]
    assert fleet.sleep()["asleep"] == {"weights": 1, "kv_cache": 1}
    status = fleet.status()
    assert not status["serving"] and status["asleep"] == {"weights": 1, "kv_cache": 1}
    assert "asleep" in status["replica_errors"][0] and "wake_up()" in status["replica_errors"][0]
    assert {(r["weights"], r["kv_cache"]) for r in status["ranks"]} == {("CLEARED", "CLEARED")}
    with pytest.raises(StateError, match="asleep: weights in host memory.*wake_up()"):
        fleet.generate(PROMPTS, 12)
    with pytest.raises(StateError, match="wake_up"):  # nothing lost: refused before any rank
        fleet.update(init_full_state_dict(TINY, seed=2), version=2)
    fleet.wake_up()
    results = fleet.generate(PROMPTS, 12)
    assert [r.version for r in results] == [before["version"]] * 2 == ["1", "1"]
    assert [r.text for r in results] == texts
    after = fleet.status()
    assert after["serving"] and after["asleep"] == {} and after["replica_errors"] == {}
    assert fingerprints(after) == fingerprints(before)


def test_level_2_needs_an_update_and_wake_kv_cache_then_serves(fleet):
    fleet.sleep(level=2)
    fleet.wake_up("weights")  # nothing to give back: the weights stay empty
    with pytest.raises(
        StateError, match=r"update the weights, then wake_up\(tags=\['kv_cache'\]\)"
    ):
        fleet.generate(PROMPTS, 12)
    # The RLHF loop: the update loads into the sleeping fleet, the KV cache wakes after it.
    state = init_full_state_dict(TINY, seed=3)
    fleet.update(state, version=3)
    status = fleet.status()
    assert not status["serving"] and status["asleep"] == {"kv_cache": 2}
    assert {r["kv_cache"] for r in status["ranks"]} == {"CLEARED"}  # the update left it asleep
    fleet.wake_up(["kv_cache"])
    results = fleet.generate(PROMPTS, 12)
    assert [r.version for r in results] == ["3", "3"]
    assert [r.text for r in results] == reference_generation(state)
    # Level 2 and a full wake with no update: the fleet says it needs one.
    fleet.sleep(2)
    fleet.wake_up()
    status = fleet.status()
    assert not status["serving"] and status["asleep"] == {}
    assert "update it" in status["replica_errors"][0]
    with pytest.raises(StateError, match="update it"):
        fleet.generate(PROMPTS, 12)
    fleet.update(state, version=4)
    assert [r.version for r in fleet.generate(PROMPTS, 12)] == ["4", "4"]


def test_bad_tags_and_levels_are_refused_and_change_nothing(fleet):
    before = fleet.status()
    with pytest.raises(ConfigError, match="sleep level 3"):
        fleet.sleep(level=3)
    with pytest.raises(ConfigError, match="'weight'"):
        fleet.sleep(tags="weight,kv_cache")
    # The coordinator checks too, whoever calls it.
    with pytest.raises(ray.exceptions.RayTaskError, match="'gpu_cache'"):
        ray.get(fleet.coordinator.wake_up.remote(["gpu_cache"]))
    with pytest.raises(ray.exceptions.RayTaskError, match="sleep level 0"):
        ray.get(fleet.coordinator.sleep.remote(0, None))
    after = fleet.status()
    assert after["serving"] and after["asleep"] == {} and after["version"] == before["version"]
    assert {r["weights"] for r in after["ranks"]} == {"NORMAL"}


def test_ten_sleep_wake_cycles_keep_every_ranks_memory_flat(fleet):
    ranks = ray.get(fleet.coordinator.rank_handles.remote())
    texts = [r.text for r in fleet.generate(PROMPTS, 12)]
    rss = []  # per cycle, each rank's resident memory once awake again
    for _ in range(10):
        fleet.sleep()
        fleet.wake_up()
        rss.append([m["rss"] for m in ray.get([r.memory.remote() for r in ranks])])
    first, last = rss[0], rss[-1]
    for rank, (a, b) in enumerate(zip(first, last)):
        assert b - a < max(0.05 * a, 8 * MiB), f"rank {rank} RSS per cycle (MiB): " + ", ".join(
            f"{c[rank] / MiB:.1f}" for c in rss
        )
    assert [r.text for r in fleet.generate(PROMPTS, 12)] == texts
