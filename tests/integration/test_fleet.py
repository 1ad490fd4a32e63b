"""The Ray fleet end to end on a local cluster: launch, update, verify, generate, clear."""

import subprocess
import sys

import pytest

from fd_ray_sync.checksum import fingerprint
from fd_ray_sync.config import FleetConfig
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.errors import RankFailed, StateError, VersionError, WeightMismatchError
from fd_ray_sync.fleet import Fleet
from fd_ray_sync.sharding import take_shard
from fd_ray_sync.sources.snapshot import write_snapshot

pytestmark = pytest.mark.slow

PROMPTS = ["The trainer ", "fleet"]
TINY = preset("tiny")


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    fleet = Fleet.launch(FleetConfig(name="test-fleet", tp=2, dp=1, enable_expert_parallel=True))
    yield fleet
    fleet.shutdown()


def reference_generation(state, prompts=PROMPTS, tokens=12):
    engine = ReferenceEngine(TINY)
    engine.load_full_state_dict(state)
    return engine.generate(prompts, tokens)


def expected_fingerprints(fleet, state):
    """Computed here from the full weights and each rank's plan, independently of Fleet."""
    return {
        rank: fingerprint((n, "float32", take_shard(a, plan[n])) for n, a in state.items())
        for rank, plan in fleet.shard_plans().items()
    }


def test_update_reaches_every_rank_with_the_trainers_fingerprints(fleet):
    state = init_full_state_dict(TINY, seed=1)
    report = fleet.update(state, version=1)
    assert report.version == "1"
    assert set(report.phase_s) == {"prepare", "pause", "restart", "load", "verify", "commit"}
    assert report.nbytes == sum(a.nbytes for a in state.values())
    assert [r.rank for r in report.ranks] == [0, 1]
    status = fleet.status()
    assert status["version"] == "1" and status["serving"]
    want = expected_fingerprints(fleet, state)
    assert want[0] != want[1]  # the ranks really hold different slices
    for rank in status["ranks"]:
        assert rank["version"] == "1"
        assert rank["weights"] == "NORMAL" and rank["kv_cache"] == "NORMAL"
        assert rank["fingerprint"] == want[rank["rank"]] == report.fingerprints[rank["rank"]]


def test_generation_equals_the_single_process_model_at_that_version(fleet):
    for version, seed in ((2, 2), (3, 3)):
        state = init_full_state_dict(TINY, seed=seed)
        fleet.update(iter(state.items()), version=version)  # a stream, not a mapping
        results = fleet.generate(PROMPTS, 12)
        assert [r.version for r in results] == [str(version)] * 2
        assert [r.text for r in results] == reference_generation(state)


def test_refused_updates_leave_the_fleet_serving_its_version(fleet):
    state = init_full_state_dict(TINY, seed=4)
    fleet.update(state, version=10)
    before = fleet.status()
    with pytest.raises(VersionError, match="not newer"):
        fleet.update(state, version=9)
    bad = dict(state)
    bad["lm_head.weight"] = bad["lm_head.weight"][:, :100]
    with pytest.raises(RankFailed, match="lm_head.weight: shape") as err:
        fleet.update(bad, version=11)
    assert err.value.phase == "prepare" and sorted(err.value.errors) == [0, 1]
    assert all(isinstance(e, WeightMismatchError) for e in err.value.errors.values())
    after = fleet.status()
    assert after["version"] == "10" and after["serving"]
    assert [r["fingerprint"] for r in after["ranks"]] == [r["fingerprint"] for r in before["ranks"]]
    assert fleet.generate(PROMPTS[:1], 12)[0].text == reference_generation(state, PROMPTS[:1])[0]


def test_clear_then_reload_from_a_snapshot(fleet, tmp_path):
    state = init_full_state_dict(TINY, seed=5)
    plans = fleet.shard_plans()
    write_snapshot(tmp_path, state, plans.__getitem__, tp=2, version="20", part_bytes=64 << 10)
    assert len(list(tmp_path.glob("model_state.tp0.0.part*.safetensors"))) > 1
    fleet.clear()
    status = fleet.status()
    assert not status["serving"]
    assert {r["weights"] for r in status["ranks"]} == {"CLEARED"}
    assert {r["kv_cache"] for r in status["ranks"]} == {"CLEARED"}
    with pytest.raises(StateError, match="not serving"):
        fleet.generate(PROMPTS, 4)
    report = fleet.update_from_snapshot(tmp_path)  # version from version.yaml
    assert report.version == "20"
    assert fleet.status()["ranks"][1]["fingerprint"] == expected_fingerprints(fleet, state)[1]
    assert [r.text for r in fleet.generate(PROMPTS, 12)] == reference_generation(state)


def test_cli_status_finds_the_fleet_by_name(fleet):
    out = subprocess.run(
        [sys.executable, "-m", "fd_ray_sync.cli", "status", "--name", "test-fleet", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert '"name": "test-fleet"' in out.stdout and '"tp": 2' in out.stdout


def test_data_parallel_replicas_serve_the_same_version(ray_cluster):
    fleet = Fleet.launch(FleetConfig(name="test-dp", tp=1, dp=2, enable_expert_parallel=False))
    try:
        state = init_full_state_dict(TINY, seed=6)
        fleet.update(state, version=1)
        a, b = fleet.generate(PROMPTS[:1], 10, replica=0), fleet.generate(PROMPTS[:1], 10, 1)
        assert (a[0].replica, b[0].replica) == (0, 1)
        assert a[0].text == b[0].text == reference_generation(state, PROMPTS[:1], 10)[0]
        assert {r["fingerprint"] for r in fleet.status()["ranks"]} == set(
            expected_fingerprints(fleet, state).values()
        )
    finally:
        fleet.shutdown()


def test_snapshot_dirs_must_exist(fleet, tmp_path):
    with pytest.raises(RankFailed, match="missing does not exist"):
        fleet.update_from_snapshot(tmp_path / "missing", version=99)
    assert fleet.status()["serving"]
