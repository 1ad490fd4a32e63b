"""Every verb of the `fd-ray-sync` command against the test session's Ray cluster, as a
user runs them: a detached fleet booted from a snapshot folder, updated, cleared, shut down;
and the demo."""

import json
import subprocess
import sys

import pytest
import ray

from fd_ray_sync.checksum import fingerprint
from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.engine.model import ModelConfig, full_shapes, preset, shard_plan
from fd_ray_sync.engine.reference import init_full_state_dict
from fd_ray_sync.sharding import take_shard
from fd_ray_sync.sources.snapshot import write_snapshot

pytestmark = pytest.mark.slow
TINY: ModelConfig = preset("tiny")
NAME = "cli-fleet"


def cli(*args, timeout=180):
    address = ray.get_runtime_context().gcs_address
    out = subprocess.run(
        [sys.executable, "-m", "fd_ray_sync.cli", *args, "--address", address],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def plan_for(tp_rank):
    return shard_plan(TINY, ParallelConfig(tp=2, enable_expert_parallel=True, rank=tp_rank))


def fingerprints(state):
    return {
        r: fingerprint((n, "float32", take_shard(a, plan_for(r)[n])) for n, a in state.items())
        for r in range(2)
    }


def test_launch_from_a_snapshot_update_clear_update_shutdown(ray_cluster, tmp_path):
    assert set(full_shapes(TINY)) == set(init_full_state_dict(TINY, 1))
    v1, v2 = init_full_state_dict(TINY, 21), init_full_state_dict(TINY, 22)
    write_snapshot(tmp_path / "v1", v1, plan_for, tp=2, version="1", part_bytes=1 << 20)
    write_snapshot(tmp_path / "v2", v2, plan_for, tp=2, version="2", part_bytes=1 << 20)
    fleet = ["--name", NAME]
    cli("launch", *fleet, "--snapshot", str(tmp_path / "v1"), "--phase-timeout", "60",
        "--shutdown-comm-groups-on-clear")  # fmt: skip
    try:
        status = json.loads(cli("status", *fleet))
        assert status["version"] == "1" and status["serving"]  # booted from model_dir
        got = {r["rank"]: r["fingerprint"] for r in status["ranks"]}
        assert got == fingerprints(v1)
        report = json.loads(cli("update", *fleet, "--snapshot", str(tmp_path / "v2")))
        assert report["version"] == "2"
        assert report["fingerprints"] == {str(r): f for r, f in fingerprints(v2).items()}
        assert "cleared" in cli("clear", *fleet)
        status = json.loads(cli("status", *fleet))
        assert not status["serving"] and {r["weights"] for r in status["ranks"]} == {"CLEARED"}
        cli("update", *fleet, "--snapshot", str(tmp_path / "v2"), "--force")
        assert json.loads(cli("status", *fleet))["serving"]
    finally:
        assert "shut down" in cli("shutdown", *fleet)
    with pytest.raises(ValueError):
        ray.get_actor(NAME, namespace="fd_ray_sync")


def test_demo_runs_on_a_given_cluster():
    out = cli("demo", "--steps", "1", "--iters", "2", "--tokens", "4", timeout=300)
    assert "step  1/1" in out and "demo done" in out
