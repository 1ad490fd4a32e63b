"""Serving through the replicas' fronts: concurrent, batched, gated by pauses of each mode."""

import threading
import time

import pytest
import ray

from fd_ray_sync.config import FleetConfig
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.errors import ConfigError, RequestAborted, StateError, WeightSyncError
from fd_ray_sync.fleet import Fleet

pytestmark = pytest.mark.slow
TINY = preset("tiny")
SLOW = ["The trainer "] * 8  # 8 prompts x 100 tokens over tp=2: about a second in flight


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    fleet = Fleet.launch(FleetConfig(name="serving", tp=2, dp=2))
    fleet.update(init_full_state_dict(TINY, seed=1), version=1)
    yield fleet
    fleet.shutdown()


def text_of(version: int, prompt: str, tokens: int) -> str:
    engine = ReferenceEngine(TINY)
    engine.load_full_state_dict(init_full_state_dict(TINY, seed=version))
    return engine.generate([prompt], tokens)[0]


def gates(fleet):
    return {g["replica"]: g for g in fleet.status()["gates"]}


def in_background(call):
    """Run `call` in a thread; the returned dict gets its "result" or "error"."""
    out = {}

    def run():
        try:
            out["result"] = call()
        except Exception as e:  # noqa: BLE001 - the test reads it
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    out["thread"] = thread
    return out


def wait_in_flight(fleet, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(g["in_flight"] for g in gates(fleet).values()):
            return
        time.sleep(0.02)
    raise AssertionError("no request got in flight")


def test_concurrent_requests_are_served_by_every_replica_from_one_version(fleet):
    want = text_of(1, "fleet", 8)
    results = []

    def client():
        for _ in range(3):
            results.extend(fleet.generate(["fleet"], 8))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 18
    assert {r.version for r in results} == {"1"} and {r.text for r in results} == {want}
    assert {r.replica for r in results} == {0, 1}


def test_requests_held_by_a_pause_run_batched_after_resume(fleet):
    before = sum(g["batches"] for g in gates(fleet).values())
    fleet.pause("wait")
    assert fleet.is_paused()
    held = [in_background(lambda: fleet.generate(["held"], 6)) for _ in range(6)]
    time.sleep(1.0)
    assert not any("result" in h or "error" in h for h in held)  # waiting at the gates
    assert sum(g["queued"] for g in gates(fleet).values()) == 6
    fleet.resume()
    for h in held:
        h["thread"].join(timeout=60)
    assert all(h["result"][0].text == text_of(1, "held", 6) for h in held)
    # Six requests, at most one engine call per replica: they waited together.
    assert sum(g["batches"] for g in gates(fleet).values()) - before <= 2
    assert not fleet.is_paused()


def test_pause_abort_answers_the_requests_in_flight_at_once(fleet):
    slow = in_background(lambda: fleet.generate(SLOW, 100))
    wait_in_flight(fleet)
    fleet.pause("abort")
    slow["thread"].join(timeout=60)
    try:
        assert isinstance(slow.get("error"), RequestAborted), slow
        assert "paused (abort)" in str(slow["error"])
        assert all(g["in_flight"] == 0 for g in gates(fleet).values())
    finally:
        fleet.resume()
    assert fleet.generate(["after"], 4)[0].version == "1"


def test_pause_keep_runs_the_request_again_on_the_weights_after_an_update(fleet):
    slow = in_background(lambda: fleet.generate(SLOW[:2], 100))
    wait_in_flight(fleet)
    fleet.pause("keep")
    try:  # updates run while a user's pause holds the gates
        fleet.update(init_full_state_dict(TINY, seed=2), version=2)
        assert "result" not in slow
    finally:
        fleet.resume()
    slow["thread"].join(timeout=60)
    results = slow["result"]
    assert {r.version for r in results} == {"2"}
    assert results[0].text == text_of(2, SLOW[0], 100)


def test_pause_wait_lets_the_request_in_flight_finish_on_its_version(fleet):
    version = fleet.status()["version"]
    slow = in_background(lambda: fleet.generate(SLOW[:2], 100))
    wait_in_flight(fleet)
    fleet.pause("wait")  # returns once the request in flight is done
    try:
        slow["thread"].join(timeout=30)  # its answer is on its way: no resume needed
        assert slow["result"][0].version == version
        held = in_background(lambda: fleet.generate(["x"], 4))
        time.sleep(0.5)
        assert "result" not in held
    finally:
        fleet.resume()
    held["thread"].join(timeout=60)
    assert held["result"][0].version == version


def test_a_replica_that_lost_a_rank_is_skipped_and_repaired(fleet):
    version = fleet.status()["version"]
    ray.kill(ray.get(fleet.coordinator.rank_handles.remote())[2])  # replica 1, TP rank 0
    served = [fleet.generate(["x"], 4)[0] for _ in range(4)]
    assert {r.version for r in served} == {version}
    deadline = time.monotonic() + 120
    while not all(fleet.status()["replicas_serving"]):
        assert time.monotonic() < deadline, fleet.status()["replica_errors"]
        time.sleep(0.5)
    assert fleet.generate(["x"], 4, replica=1)[0].version == version


def test_a_front_that_died_is_replaced_and_its_replica_serves_again(fleet):
    """Ray does not restart a front (it is detached: a restart would wait forever once its
    placement group is gone); the first client to find it gone has the coordinator start
    a new one, told its replica's state."""
    version = fleet.status()["version"]
    old = ray.get(fleet.coordinator.fronts.remote())[1]
    ray.kill(old)
    assert fleet.generate(["x"], 4, replica=1)[0].version == version
    new = ray.get(fleet.coordinator.fronts.remote())[1]
    assert new._actor_id != old._actor_id
    assert {g["replica"]: g["closed"] for g in fleet.status()["gates"]} == {0: {}, 1: {}}


def test_bad_requests_are_refused_by_name(fleet):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        fleet.generate(["x"], 0)
    with pytest.raises(ConfigError, match="prompts"):
        fleet.generate([], 4)
    with pytest.raises(ConfigError, match="pause mode 'later'"):
        fleet.pause("later")
    assert not fleet.is_paused()
    with pytest.raises(StateError, match="no replica 5"):
        fleet.generate(["x"], 4, replica=5)


@pytest.fixture(scope="module")
def rolling(ray_cluster):
    config = FleetConfig(name="rolling", tp=1, dp=3, update_mode="rolling", rolling_replicas=1)
    fleet = Fleet.launch(config)
    fleet.update(init_full_state_dict(TINY, seed=1), version=1)
    yield fleet
    fleet.shutdown()


def test_a_rolling_update_keeps_serving_one_version_per_answer(rolling):
    texts = {v: text_of(v, "roll", 6) for v in (1, 2)}
    seen, versions_seen, stop = [], set(), threading.Event()

    def client():
        while not stop.is_set():
            seen.extend((time.monotonic(), r) for r in rolling.generate(["roll"], 6))

    def watch():
        while not stop.is_set():
            versions_seen.add(tuple(rolling.status()["replica_versions"]))
            time.sleep(0.05)

    threads = [threading.Thread(target=f) for f in (client, client, watch)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    started = time.monotonic()
    report = rolling.update(init_full_state_dict(TINY, seed=2), version=2)
    ended = time.monotonic()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert report.replicas_down == {}
    assert all(r.text == texts[int(r.version)] for _, r in seen)  # never a mix
    during = [r for at, r in seen if started < at < ended]
    assert during, "nothing was served while the rolling update ran"
    assert {"1", "2"} <= {r.version for r in during}  # both versions answered meanwhile
    assert any(len(set(v)) == 2 for v in versions_seen)  # status showed the replicas differ
    status = rolling.status()
    assert status["replica_versions"] == ["2", "2", "2"] and all(status["replicas_serving"])


def test_a_refused_rolling_update_changes_no_replica(rolling):
    version = rolling.status()["version"]
    bad = init_full_state_dict(TINY, seed=3)
    name = next(n for n, a in bad.items() if a.ndim == 2)
    bad[name] = bad[name][..., :-1]
    with pytest.raises(WeightSyncError, match=name):
        rolling.update(bad, version=int(version) + 1)
    status = rolling.status()
    assert status["replica_versions"] == [version] * 3 and all(status["replicas_serving"])
    assert {rolling.generate(["x"], 4)[0].version for _ in range(3)} == {version}
