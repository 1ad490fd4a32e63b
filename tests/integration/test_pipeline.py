"""Pipelined updates: ranks write buckets while the trainer still puts the next ones, the
trainer stays at most `buckets_in_flight` ahead, and a stream that breaks mid-way changes
nothing a reader can see."""

import time

import numpy as np
import pytest
import ray
from test_fleet import expected_fingerprints

from fd_ray_sync.buckets import iter_buckets
from fd_ray_sync.config import FleetConfig, LoadConfig
from fd_ray_sync.engine.reference import init_full_state_dict
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.errors import RankFailed
from fd_ray_sync.fleet import Fleet
from fd_ray_sync.messages import TensorMeta
from fd_ray_sync.push import _StoreRoom
from fd_ray_sync.ray_stats import local_store_room

pytestmark = pytest.mark.slow

TINY = preset("tiny")
AHEAD = 2
BUCKET = 48 << 10  # the tiny model (629 KB) in ~16 buckets


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    config = FleetConfig(
        name="pipeline-fleet",
        tp=2,
        dp=1,
        buckets_in_flight=AHEAD,
        phase_timeout_s=20,
        load=LoadConfig(load_strategy="object_store", bucket_bytes=BUCKET),
    )
    fleet = Fleet.launch(config)
    yield fleet
    fleet.shutdown()


def announce(state):
    return [TensorMeta(name=n, shape=a.shape, dtype=str(a.dtype)) for n, a in state.items()]


def buckets_of(fleet, state):
    plans = fleet.shard_plans()
    return iter_buckets(state, BUCKET, True, [plans[0], plans[1]])


def assert_holds(fleet, state, version):
    status = fleet.status()
    assert status["version"] == str(version) and status["update"] is None
    got = {r["rank"]: r["fingerprint"] for r in status["ranks"]}
    assert got == expected_fingerprints(fleet, state)
    assert fleet.generate(["x"], 4)[0].version == str(version)


def test_ranks_write_while_the_trainer_puts_and_the_trainer_waits_for_them(fleet):
    state = init_full_state_dict(TINY, seed=1)
    seen = []

    def watched():
        for meta, arrays in buckets_of(fleet, state):
            if meta.index:  # the update (and its feed) exists once bucket 0 was fed
                seen.append((meta.index, fleet.status()["update"]))
            yield meta, arrays

    report = fleet.push_buckets(watched(), 1, announce(state))
    assert report.version == "1" and len(seen) >= 10
    for index, progress in seen:
        # Backpressure: bucket i is packed while the trainer waits for every rank to
        # have written bucket i - AHEAD, and put only after.
        assert progress["buckets_put"] == index
        assert index - min(progress["written"]) <= AHEAD, (index, progress)
    # Pipelining: ranks had written buckets before the trainer packed the last one.
    assert min(seen[-1][1]["written"]) >= 1
    assert_holds(fleet, state, 1)


def test_a_trainer_failing_mid_stream_leaves_the_committed_version(fleet):
    state = init_full_state_dict(TINY, seed=2)
    fleet.update(state, version=2)

    def crashing():
        for meta, arrays in buckets_of(fleet, init_full_state_dict(TINY, seed=3)):
            if meta.index == 5:
                raise RuntimeError("trainer crashed while packing")
            yield meta, arrays

    with pytest.raises(RuntimeError, match="trainer crashed"):
        fleet.push_buckets(crashing(), 3, announce(state))
    assert_holds(fleet, state, 2)


def test_a_stream_missing_an_announced_tensor_is_rolled_back(fleet):
    state = init_full_state_dict(TINY, seed=4)
    fleet.update(state, version=4)
    new = init_full_state_dict(TINY, seed=5)
    last = list(new)[-1]
    short = {n: a for n, a in new.items() if n != last}
    with pytest.raises(RankFailed, match=f"without 1 announced parameter.*{last}"):
        fleet.push_buckets(buckets_of(fleet, short), 5, announce(new))
    assert_holds(fleet, state, 4)


def test_an_iterator_is_gathered_then_checked_whole(fleet):
    """Names not known up front: no bucket is written before the last one is put."""
    state = init_full_state_dict(TINY, seed=6)
    seen = []

    def watched():
        for meta, arrays in buckets_of(fleet, state):
            if meta.index:
                seen.append(fleet.status()["update"])
            yield meta, arrays

    fleet.push_buckets(watched(), 6)
    assert seen and all(max(p["written"]) == 0 for p in seen)
    assert_holds(fleet, state, 6)


def test_a_trainer_that_connects_feeds_as_the_fleet_was_configured(fleet):
    other = Fleet.connect("pipeline-fleet")
    assert other.config.buckets_in_flight == AHEAD
    assert other.config.load.bucket_bytes == BUCKET
    state = init_full_state_dict(TINY, seed=7)
    assert len(other.update(state, version=7).ranks) == 2
    assert_holds(fleet, state, 7)


def test_the_trainer_waits_for_store_room_then_gives_up_and_lets_ray_spill(fleet):
    # This node's store, as Ray counts it. Objects of earlier tests are freed
    # asynchronously meanwhile, so put far more than they could free.
    room = local_store_room()
    ref = ray.put(np.zeros(256 << 20, np.uint8))
    assert room - local_store_room() >= 192 << 20
    del ref
    waiter = _StoreRoom()
    waiter.deadline = time.monotonic() + 0.3
    started = time.monotonic()
    waiter.wait_for(1 << 20)  # there is room: one query, no wait
    assert time.monotonic() - started < 0.25
    waiter.wait_for(local_store_room() + (1 << 30))  # no room: waits until the deadline
    assert 0.2 < time.monotonic() - started < 5
