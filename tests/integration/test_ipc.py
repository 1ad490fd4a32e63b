"""The co-located (ipc) transport through the public Fleet API: a trainer on the ranks' node
shares its memory (a ring of shared-memory slots, or its own registered tensors) and the
ranks copy their slices out of it, all-or-nothing like every other transport."""

import os
import signal
import time

import pytest
import ray
import torch
from fleet_checks import assert_serves, kill_rank0_mid_write, over_object_store
from procs import start_driver

from fd_ray_sync import ipc, shm
from fd_ray_sync.config import FleetConfig, LoadConfig
from fd_ray_sync.engine.reference import init_full_state_dict
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.errors import StateError
from fd_ray_sync.fleet import Fleet

pytestmark = pytest.mark.slow
TINY = preset("tiny")
TIMEOUT_S = 60.0
SLOT = 64 << 10  # small slots: the tiny model spans several buckets, so the ring turns over


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    config = FleetConfig(
        name="ipc-fleet",
        tp=2,
        dp=2,
        phase_timeout_s=TIMEOUT_S,
        load=LoadConfig(load_strategy="ipc", bucket_bytes=SLOT),
    )
    fleet = Fleet.launch(config)
    yield fleet
    fleet.shutdown()


def my_segments():
    return shm.segments_of(os.getpid())


def test_ring_updates_land_bit_identical_and_reuse_the_same_segments(fleet):
    state = init_full_state_dict(TINY, seed=1)
    report = fleet.update(state, version=1)
    assert report.nbytes == sum(a.nbytes for a in state.values())
    assert {r.source for r in report.ranks} == {"ipc"}
    assert_serves(fleet, state, 1)
    segments = my_segments()
    state = init_full_state_dict(TINY, seed=2)
    fleet.update(state, version=2)
    assert_serves(fleet, state, 2)
    assert my_segments() == segments  # allocated once, shared once


class SlowRing(ipc.BucketRing):
    """A ring whose pack first scribbles over the slot, waits, then packs: a rank reading a
    slot before the trainer said it is ready would copy garbage and fail its checksums."""

    def pack(self, index, named, plans=None):
        slot = self.segments[index % len(self.segments)]
        slot.buffer[:] = 0xFF
        time.sleep(0.2)
        return super().pack(index, named, plans)


def test_a_rank_never_reads_a_bucket_the_trainer_is_still_packing(fleet):
    state = init_full_state_dict(TINY, seed=3)
    slot = max(SLOT, *(ipc.aligned(a.nbytes) for a in state.values()))
    fleet._ring = SlowRing(fleet.config.buckets_in_flight, slot)  # the ring the update uses
    report = fleet.update(state, version=3)
    assert len(fleet._ring.plan(state)) > 2 * len(fleet._ring)  # every slot reused
    assert report.phase_s["load"] > 0.2 * len(fleet._ring.plan(state))  # ranks waited
    assert_serves(fleet, state, 3)


def test_registered_storage_is_copied_in_place_and_a_reallocated_tensor_is_refused(fleet):
    shared = ipc.share(init_full_state_dict(TINY, seed=4))
    registered = fleet.register(shared)
    fleet.update(registered, version=4)
    assert_serves(fleet, shared, 4)
    for array in shared.values():  # a training step, in place
        array *= 0.5
    fleet.update(registered, version=5)
    assert_serves(fleet, shared, 5)
    name = "layers.0.attn.qkv.weight"
    shared[name] = shared[name].copy()  # the trainer reallocated it
    with pytest.raises(StateError, match=f"{name} was reallocated"):
        fleet.update(registered, version=6)
    shared = ipc.share(shared)
    fleet.update(fleet.register(shared), version=6)  # registered again: fine
    assert_serves(fleet, shared, 6)


def test_a_torch_trainer_registers_its_module_and_trains_in_place(fleet):
    state = init_full_state_dict(TINY, seed=7)
    module = torch.nn.Module()
    for i, array in enumerate(state.values()):
        module.register_buffer(f"t{i}", torch.from_numpy(array.copy()))
    names = dict(zip((f"t{i}" for i in range(len(state))), state))
    module.load_state_dict(ipc.share(module.state_dict()), assign=True)

    class Renamed:  # the fleet's names for the module's tensors
        def state_dict(self):
            return {names[k]: v for k, v in module.state_dict().items()}

    registered = fleet.register(Renamed())
    for step, version in enumerate((7, 8)):
        for t in module.buffers():
            t.add_(step * 0.25)  # in place, as an optimizer step
        fleet.update(registered, version=version)
        assert_serves(fleet, {n: t.numpy() for n, t in Renamed().state_dict().items()}, version)


def test_a_rank_killed_mid_write_rolls_back_to_the_version_kept_in_the_store(fleet, tmp_path):
    state = init_full_state_dict(TINY, seed=9)
    over_object_store(fleet).update(state, version=9)  # kept: a restore can reload it
    errors = kill_rank0_mid_write(
        fleet, tmp_path, lambda: fleet.update(init_full_state_dict(TINY, seed=10), version=10)
    )
    assert errors and errors[0].phase == "load" and 0 in errors[0].lost
    assert_serves(fleet, state, 9)


TRAINER = """
import sys, threading
import ray
from fd_ray_sync import ipc
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.engine.reference import init_full_state_dict
from fd_ray_sync.fleet import Fleet

ray.init(address=sys.argv[1], namespace="fd_ray_sync", log_to_driver=False)
fleet = Fleet.connect("ipc-fleet")
stall_at = STALL_AT

class StallingRing(ipc.BucketRing):
    def pack(self, index, named, plans=None):
        if index == stall_at:
            print("feeding", flush=True)
            threading.Event().wait()
        return super().pack(index, named, plans)

state = init_full_state_dict(preset("tiny"), seed=99)
slot = max(ipc.aligned(a.nbytes) for a in state.values())  # several buckets
fleet._ring = StallingRing(fleet.config.buckets_in_flight, slot)
fleet.update(state, version=VERSION)
"""


@pytest.mark.parametrize("stall_at", [0, 2], ids=["before-any-bucket", "after-two-buckets"])
def test_a_trainer_killed_mid_feed_aborts_in_seconds_and_leaves_no_shared_memory(
    fleet, tmp_path, stall_at
):
    state = init_full_state_dict(TINY, seed=11 + stall_at)
    version = 11 + stall_at
    over_object_store(fleet).update(state, version=version)
    source = TRAINER.replace("STALL_AT", str(stall_at)).replace("VERSION", str(version + 1))
    trainer = start_driver(tmp_path, source, "feeding")
    try:
        time.sleep(1.0)
        assert shm.segments_of(trainer.pid)  # its ring, attached by the ranks
        trainer.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        result = fleet.generate(["x"], 4)[0]  # waits for the update's abort
        waited = time.monotonic() - killed
    finally:
        trainer.kill()
        trainer.wait()
    assert result.version == str(version)
    assert waited < TIMEOUT_S / 4, f"the dead trainer held the fleet {waited:.1f}s"
    assert shm.segments_of(trainer.pid) == []  # swept by the ranks moving on
    assert_serves(fleet, state, version)


def test_a_restarted_coordinator_makes_the_rollback_copy_again(fleet):
    """The copy of an ipc version that a replica's ranks make after the commit is owned by
    the coordinator and dies with it. A restarted coordinator makes it again, so a failure
    that leaves no replica serving still has the version to restore (a chaos run found both
    replicas down with "nothing to restore" after a coordinator restart)."""
    state = init_full_state_dict(TINY, seed=20)
    fleet.update(state, version=20)  # after the versions of the tests above
    ray.kill(fleet.coordinator, no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            ranks = fleet.status()["ranks"]
            break
        except ray.exceptions.RayActorError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    tp = fleet.config.tp
    for r in ranks:  # one rank of each replica: none is left to restore from
        if r["rank"] % tp == 0:
            os.kill(r["pid"], signal.SIGKILL)
    ray.get(fleet.coordinator.heal.remote())
    assert_serves(fleet, state, 20)
