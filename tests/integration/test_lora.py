"""Partial updates of LoRA adapters on a tp=2 fleet of the `tiny_lora` preset: the base once,
then adapter-only updates over the object store, a snapshot folder, the ipc ring, the
collective broadcast, registered ipc storage and sharded trainers' pieces; each lands bit
for bit (fingerprints computed here from base + adapters), generation follows the adapter
version, and a partial update that fails mid-write rolls back exactly."""

import numpy as np
import pytest
import ray
from fleet_checks import (
    assert_serves,
    close,
    kill_rank0_mid_write,
    over,
    put_in_pieces,
)

from fd_ray_sync import ipc
from fd_ray_sync.config import FleetConfig
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.spec import lora_names, preset
from fd_ray_sync.errors import RankFailed, StateError, WeightMismatchError
from fd_ray_sync.fleet import Fleet
from fd_ray_sync.sources.snapshot import write_snapshot

pytestmark = pytest.mark.slow

LORA = preset("tiny_lora")
PROMPT = ["The adapter "]


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    fleet = Fleet.launch(FleetConfig(name="lora-fleet", tp=2, dp=1, model="tiny_lora"))
    yield fleet
    fleet.shutdown()


@pytest.fixture(scope="module")
def base():
    return init_full_state_dict(LORA, seed=7)  # zero lora_B: the base model as it is


def adapters(step: int) -> dict[str, np.ndarray]:
    """Adapter weights as a trainer's step `step` might hold them (B no longer zero)."""
    rng = np.random.default_rng(100 + step)
    shapes = {n: a.shape for n, a in init_full_state_dict(LORA, seed=7).items()}
    return {n: (0.3 * rng.standard_normal(shapes[n])).astype(np.float32) for n in lora_names(LORA)}


def local_text(state) -> str:
    engine = ReferenceEngine(LORA)
    engine.load_full_state_dict(state)
    return engine.generate(PROMPT, 12)[0]


def test_adapter_only_updates_land_bit_identical_and_change_the_text(fleet, base, tmp_path):
    report = fleet.update(base, version=1)
    assert report.nbytes == sum(a.nbytes for a in base.values())
    assert_serves(fleet, base, 1)
    texts = {1: fleet.generate(PROMPT, 12)[0].text}
    assert texts[1] == local_text(base)
    adapter_bytes = sum(a.nbytes for a in adapters(0).values())
    assert adapter_bytes < report.nbytes / 20

    def via_snapshot(weights, version):
        folder = tmp_path / f"v{version}"
        plans = fleet.shard_plans()
        write_snapshot(folder, weights, plans.__getitem__, 2, str(version), 1 << 20)
        return fleet.update_from_snapshot(folder, version, partial=True)

    pushes = {
        2: lambda w, v: fleet.update(w, v, partial=True),  # object store, pipelined
        3: lambda w, v: fleet.update(iter(w.items()), v, partial=True),  # gathered first
        4: via_snapshot,
        5: lambda w, v: over(fleet, "ipc").update(w, v, partial=True),
    }
    for version, push in pushes.items():
        new = adapters(version)
        report = push(new, version)
        state = {**base, **new}
        if push is not via_snapshot:  # (a snapshot's report counts what the ranks read)
            assert report.nbytes == adapter_bytes
        assert {r.params_updated for r in report.ranks} == {len(new)}
        assert sum(r.nbytes for r in report.ranks) < 2 * adapter_bytes  # slices, replicated A/B
        assert_serves(fleet, state, version)  # the whole model's fingerprints, bit for bit
        texts[version] = fleet.generate(PROMPT, 12)[0].text
        assert texts[version] == local_text(state)
    assert len(set(texts.values())) > 2, texts  # the text follows the adapter version


def test_without_the_flag_a_subset_is_refused_naming_the_missing(fleet):
    with pytest.raises(RankFailed, match="missing from the update: embed.weight") as err:
        fleet.update(adapters(9), version=9)
    assert err.value.phase == "prepare"
    assert all(isinstance(e, WeightMismatchError) for e in err.value.errors.values())
    with pytest.raises(RankFailed, match="not in the model: typo.lora_A"):
        fleet.update({**adapters(9), "typo.lora_A": np.ones(2, np.float32)}, 9, partial=True)
    assert fleet.status()["version"] == "5"


def test_a_partial_update_failing_mid_write_rolls_back_exactly(fleet, base):
    served = {**base, **adapters(5)}
    ranks = fleet.status()["ranks"]
    rank1 = ray.get(fleet.coordinator.rank_handles.remote())[1]
    ray.get(rank1.fail_after_writes.remote(3))
    with pytest.raises(RankFailed, match="fault injected") as err:
        fleet.update(adapters(6), version=6, partial=True)
    assert err.value.phase == "load"
    assert_serves(fleet, served, 5)  # the old adapters, bit for bit
    after = fleet.status()
    assert [r["pid"] for r in after["ranks"]] == [r["pid"] for r in ranks]
    # The touched tensors were put back in place: no restore ran (heal reports restores).
    assert ray.get(fleet.coordinator.heal.remote())["restore_s"] == {}
    assert fleet.generate(PROMPT, 12)[0].text == local_text(served)


def test_a_rank_lost_mid_partial_update_is_rebuilt_from_the_whole_model(fleet, base, tmp_path):
    # After a partial commit the committed source is replica 0's export of the whole model
    # (dp=1: no peer serves), not the adapters alone.
    served = {**base, **adapters(5)}
    errors = kill_rank0_mid_write(
        fleet, tmp_path, lambda: fleet.update(adapters(7), version=7, partial=True)
    )
    assert len(errors) == 1
    assert_serves(fleet, served, 5)
    assert set(ray.get(fleet.coordinator.heal.remote())["restore_s"]) == {0}  # restored whole


def test_adapter_only_updates_over_collective_registered_storage_and_shards(fleet, base):
    """The same checks through the other transports, on the model rebuilt above."""
    adapter_bytes = sum(a.nbytes for a in adapters(0).values())
    collective = over(fleet, "collective")
    pushes = {
        10: lambda w, v: collective.update(w, v, partial=True),
        11: lambda w, v: fleet.update(fleet.register(ipc.share(w)), v, partial=True),
        12: lambda w, v: fleet.update_shards(put_in_pieces(w, 4 << 10), v, partial=True),
    }
    try:
        for version, push in pushes.items():
            new = adapters(version)
            report = push(new, version)
            state = {**base, **new}
            assert report.nbytes == adapter_bytes  # what the trainer(s) sent: the adapters
            assert {r.params_updated for r in report.ranks} == {len(new)}
            assert_serves(fleet, state, version)
            assert fleet.generate(PROMPT, 12)[0].text == local_text(state)
    finally:
        close(collective)


def test_partial_updates_need_committed_weights(fleet):
    fleet.clear()
    with pytest.raises(StateError, match="holds none"):
        fleet.update(adapters(13), version=13, partial=True)
